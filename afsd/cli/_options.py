"""Command-line options shared by subcommands (registry access, platform, output format)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from afsd.oci.platform import Platform, parse_platform

if TYPE_CHECKING:
    from afsd.oci.config import RegistryConfig


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
