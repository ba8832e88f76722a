"""Command-line options shared by subcommands (registry access, platform, mutual TLS, listen defaults)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from afsd.errors import UsageError
from afsd.oci.platform import Platform, parse_platform

if TYPE_CHECKING:
    from afsd.oci.config import RegistryConfig
    from afsd.trust.tls import TlsConfig


def add_registry_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("registry access")
    group.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                       help="allow plain HTTP to this registry (repeatable); everything else uses HTTPS")
    group.add_argument("--registry-mirror", action="append", default=[], metavar="REGISTRY=MIRROR[,MIRROR]",
                       help="try these mirrors, in order, before REGISTRY (repeatable)")
    group.add_argument("--registry-auth", action="append", default=[], metavar="HOST=USER:PASSWORD",
                       help="credentials for one registry host (repeatable); sent to no other host")
    group.add_argument("--docker-config", metavar="PATH",
                       help="Docker config.json to read credentials from "
                            "(default: $DOCKER_CONFIG/config.json, then ~/.docker/config.json)")


def registry_config(args: argparse.Namespace) -> "RegistryConfig":
    from afsd.oci.config import RegistryConfig

    return RegistryConfig.from_options(insecure=args.insecure_registry, mirrors=args.registry_mirror,
                                       auth=args.registry_auth, docker_config=args.docker_config)


def add_platform_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                        help="platform to pick from a multi-platform image (default: this host's)")


def platform_from(args: argparse.Namespace) -> Platform:
    return parse_platform(args.platform)


def add_tls_options(parser: argparse.ArgumentParser, *, client: bool = False) -> None:
    """`--tls-dir DIR` or `--tls-ca/--tls-cert/--tls-key` (read by `tls_from`). `client`: for commands that
    only call a daemon (default from $AFSD_TLS_DIR)."""
    group = parser.add_argument_group(
        "mutual TLS", "this process's certificate from the cluster CA (`afsd certs`, or cert-manager); without "
                      "one, calls are plaintext and unauthenticated (dev mode)")
    group.add_argument("--tls-dir", type=Path, metavar="DIR", default=os.environ.get("AFSD_TLS_DIR") if client else None,
                       help="ca.crt, tls.crt and tls.key (cert-manager's secret layout)"
                            + (" (default $AFSD_TLS_DIR)" if client else ""))
    group.add_argument("--tls-ca", type=Path, metavar="FILE", help="the cluster CA certificate (instead of --tls-dir)")
    group.add_argument("--tls-cert", type=Path, metavar="FILE", help="this process's certificate (chain)")
    group.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key")
    if client:
        from afsd.trust.tokens import token_file_default

        group.add_argument("--token-file", type=Path, metavar="FILE", default=token_file_default(),
                           help="send the bearer token in FILE (for a proxy serving users by token; with "
                                "--tls-ca alone; default $AFSD_TOKEN_FILE)")


def daemon_tls_from(args: argparse.Namespace) -> "TlsConfig | None":
    """`tls_from` for a daemon, whose certificate must be a node's (every peer would refuse another)."""
    tls = tls_from(args)
    if tls is not None and not tls.identity.is_node:
        raise UsageError(f"{tls.cert_path} is the certificate of {tls.identity}: a daemon needs a node certificate "
                         "(`afsd certs issue NAME --host ...`: organization afsd:nodes)")
    return tls


def tls_from(args: argparse.Namespace) -> "TlsConfig | None":
    """The TLS material the options name (loaded and checked), or None for dev mode. A client that shows
    a bearer token may give only --tls-ca (it checks the server, the token stands for it)."""
    from afsd.trust.tls import TlsConfig

    files = (args.tls_ca, args.tls_cert, args.tls_key)
    if args.tls_dir is not None and any(files):
        raise UsageError("give either --tls-dir or --tls-ca/--tls-cert/--tls-key, not both")
    if args.tls_dir is not None:
        return TlsConfig.from_dir(args.tls_dir).check()
    if args.tls_ca is not None and not args.tls_cert and not args.tls_key and getattr(args, "token_file", None):
        return TlsConfig(args.tls_ca).check()
    if any(files) and not all(files):
        raise UsageError("--tls-ca, --tls-cert and --tls-key go together")
    return TlsConfig(*files).check() if all(files) else None


def token_from(args: argparse.Namespace) -> str | None:
    """The bearer token a client command sends (--token-file), or None."""
    from afsd.trust.tokens import read_token

    return read_token(args.token_file) if getattr(args, "token_file", None) else None


def listen_address(given: str | None, port: int, tls: "TlsConfig | None") -> str:
    """`given`, else the default: all interfaces with TLS, loopback only without (dev mode)."""
    return given or (f"0.0.0.0:{port}" if tls is not None else f"127.0.0.1:{port}")


def announce_security(log: logging.Logger, daemon: str, tls: "TlsConfig | None", listen: str = "") -> None:
    """One line at start saying how this daemon authenticates, loud in dev mode."""
    from afsd.trust.tls import security_line

    log.warning("%s", security_line(daemon, tls, listen))


def add_ready_file_option(parser: argparse.ArgumentParser) -> None:
    """`--ready-file`, for every daemon (see afsd/readiness.py)."""
    parser.add_argument("--ready-file", type=Path, metavar="PATH",
                        help="once serving, write PATH (atomically): JSON with the pid and the addresses bound, "
                             "e.g. the ports picked for HOST:0 listeners")
