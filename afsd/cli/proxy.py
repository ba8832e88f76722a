"""`afsd proxy`: the scheduling front door — Execute placed on afslets found by DNS (by the strategy
`--strategy` names), execution management over all of them, status, reconcile."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from afsd.cli._options import (
    add_ready_file_option,
    add_tls_options,
    announce_security,
    daemon_tls_from,
    listen_address,
)
from afsd.errors import UsageError

if TYPE_CHECKING:
    from afsd.proxy.config import ProxyConfig

log = logging.getLogger("afsd.proxy")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "proxy", help="run the scheduling proxy in front of the afslets",
        description="Serve afsletpb.Afslet/Execute (wire-compatible with afs-sdk): place each call on an afslet "
                    "with room — afslets are the addresses a DNS name resolves to, looked up again at every "
                    "attempt — by the chosen strategy, retrying with backoff while none has room, and relay "
                    "the call both ways. Also serves afsd.executions.v1.Executions for every afslet (afsd ps, "
                    "logs, stop), afsproxy.v1.AfsProxy (Status, ReconcileImageReplica) and HTTP /status and "
                    "/metrics.")
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help="gRPC listen address; port 0 picks a free one (default 0.0.0.0:62051 with TLS, "
                             "127.0.0.1:62051 without)")
    parser.add_argument("--http-listen", metavar="HOST:PORT",
                        help="HTTP /status and /metrics, read-only and unauthenticated; port 0 picks a free one "
                             "(default 0.0.0.0:62052 with TLS, 127.0.0.1:62052 without)")
    parser.add_argument("--afslet-target", required=True, metavar="NAME:PORT",
                        help="DNS name whose A/AAAA records are the afslets, and their gRPC port")
    parser.add_argument("--discovery-target", default="", metavar="NAME:PORT",
                        help="DNS name of the discovery replicas (needed by Status for layerstores, and by "
                             "ReconcileImageReplica)")
    parser.add_argument("--proxy-peers-target", default="", metavar="NAME:PORT",
                        help="DNS name of every proxy's --http-listen, for the cluster-wide count in /status")
    parser.add_argument("--strategy", default="p2c", metavar="p2c|best-fit|local-first",
                        help="how a call's afslet is picked among those with room: p2c, the less loaded of two "
                             "drawn at random (spreads); best-fit, the one left with the least room (packs); "
                             "local-first, the --prefer afslets while one has room, else the others "
                             "(default %(default)s)")
    parser.add_argument("--prefer", action="append", default=[], metavar="HOST[:PORT]",
                        help="with --strategy local-first: preferred afslets, an address or a DNS name (looked up "
                             "at every attempt); the port defaults to --afslet-target's; repeatable")
    parser.add_argument("--node-id", default="", help="this proxy's name in /status (default HOSTNAME-PID)")
    parser.add_argument("--dial-timeout", type=float, default=3.0, metavar="S",
                        help="reaching the chosen afslet (default %(default)s)")
    parser.add_argument("--status-timeout", type=float, default=2.0, metavar="S",
                        help="each GetRuntimeStatus, discovery FindProvider and peer /status call (default %(default)s)")
    parser.add_argument("--resolve-timeout", type=float, default=300.0, metavar="S",
                        help="discovery's ResolveImage in a reconcile: it may wait for a slow registry "
                             "(default %(default)s)")
    parser.add_argument("--dispatch-backoff-ms", type=int, default=50, metavar="MS",
                        help="first retry backoff when a request does not set proxy_dispatch_backoff_ms; it doubles "
                             "per retry (default %(default)s)")
    parser.add_argument("--dispatch-max-backoff-ms", type=int, default=2000, metavar="MS",
                        help="longest backoff between two attempts (default %(default)s)")
    parser.add_argument("--dispatch-max-retries", type=int, default=20, metavar="N",
                        help="retries when a request does not set proxy_dispatch_max_retries (default %(default)s)")
    parser.add_argument("--graceful-timeout", type=float, default=10.0, metavar="S",
                        help="on SIGTERM, seconds running calls get before they are cancelled (default %(default)s)")
    add_tls_options(parser)
    parser.add_argument("--user-token-file", type=Path, metavar="FILE",
                        help="with TLS: serve users by bearer token instead of client certificate: the port asks for "
                             "no certificate, and every call needs `authorization: Bearer TOKEN` with a token from "
                             "FILE (`NAME TOKEN` per line, mode 0600)")
    add_ready_file_option(parser)
    parser.set_defaults(handler=run)


def _config(args: argparse.Namespace) -> ProxyConfig:
    from afsd.cluster.discovery_client import split_host_port
    from afsd.proxy.config import ProxyConfig
    from afsd.proxy.placement import Strategy
    from afsd.proxy.retry import RetryDefaults
    from afsd.proxy.targets import with_default_port

    for flag in ("afslet_target", "discovery_target", "proxy_peers_target"):
        value = getattr(args, flag)
        if value:
            try:
                split_host_port(value)
            except ValueError as error:
                raise UsageError(f"--{flag.replace('_', '-')}: {error}") from None
    if min(args.dial_timeout, args.status_timeout, args.resolve_timeout) <= 0:
        raise UsageError("--dial-timeout, --status-timeout and --resolve-timeout must be > 0")
    if args.dispatch_backoff_ms <= 0 or args.dispatch_max_backoff_ms < args.dispatch_backoff_ms:
        raise UsageError("--dispatch-backoff-ms must be > 0 and at most --dispatch-max-backoff-ms")
    if args.dispatch_max_retries < 0:
        raise UsageError("--dispatch-max-retries must be >= 0")
    try:
        strategy = Strategy(args.strategy)
    except ValueError:
        raise UsageError(f"--strategy must be one of {', '.join(Strategy)} (got {args.strategy!r})") from None
    if strategy is Strategy.LOCAL_FIRST and not args.prefer:
        raise UsageError("--strategy local-first needs the preferred afslets: --prefer HOST[:PORT] (repeatable)")
    if args.prefer and strategy is not Strategy.LOCAL_FIRST:
        raise UsageError(f"--prefer applies to --strategy local-first only (this proxy's is {strategy})")
    _, afslet_port = split_host_port(args.afslet_target)
    try:
        prefer = tuple(with_default_port(value, afslet_port) for value in args.prefer)
    except ValueError as error:
        raise UsageError(f"--prefer: {error}") from None
    return ProxyConfig(
        afslet_target=args.afslet_target, node_id=args.node_id or f"{socket.gethostname()}-{os.getpid()}",
        discovery_target=args.discovery_target, proxy_peers_target=args.proxy_peers_target,
        dial_timeout=args.dial_timeout, status_timeout=args.status_timeout, resolve_timeout=args.resolve_timeout,
        retry=RetryDefaults(max_retries=args.dispatch_max_retries, backoff_ms=args.dispatch_backoff_ms,
                            max_backoff_ms=args.dispatch_max_backoff_ms), strategy=strategy, prefer=prefer)


async def run(args: argparse.Namespace) -> int:
    from afsd.api import afslet_pb2_grpc, afsproxy_pb2_grpc, executions_pb2_grpc
    from afsd.metrics import parse_listen
    from afsd.proxy.backends import BackendChannels
    from afsd.proxy.dispatch import Dispatcher
    from afsd.proxy.execute import ProxyAfsletService
    from afsd.proxy.executions import ProxyExecutionsService
    from afsd.proxy.http import serve_http
    from afsd.proxy.peers import DispatchCounts, status_report
    from afsd.proxy.retry import RetryPolicy
    from afsd.proxy.service import AfsProxyService
    from afsd.readiness import announce_ready, with_port
    from afsd.rpc import ChannelPool, add_port, new_server, run_until_signalled
    from afsd.trust.tokens import BearerTokens

    config = _config(args)
    tls = daemon_tls_from(args)
    if args.user_token_file is not None and tls is None:
        raise UsageError("--user-token-file needs TLS (--tls-dir): a bearer token must not cross the network in clear")
    tokens = BearerTokens.load(args.user_token_file) if args.user_token_file is not None else None
    listen, http_listen = listen_address(args.listen, 62051, tls), listen_address(args.http_listen, 62052, tls)
    backends, channels, counts = BackendChannels(tls), ChannelPool(tls), DispatchCounts()
    server = new_server(tls, tokens)
    afslet_pb2_grpc.add_AfsletServicer_to_server(
        ProxyAfsletService(Dispatcher(config, backends), backends, counts, config.node_id), server)
    afsproxy_pb2_grpc.add_AfsProxyServicer_to_server(AfsProxyService(config, channels, backends), server)
    executions_pb2_grpc.add_ExecutionsServicer_to_server(ProxyExecutionsService(config, backends), server)
    listening = with_port(listen, add_port(server, listen, tls, client_certificates=tokens is None))

    async def status(include_cluster: bool) -> dict:
        return await status_report(config.node_id, counts, include_cluster=include_cluster,
                                   peers_target=config.proxy_peers_target, timeout=config.status_timeout)

    try:
        http = await serve_http(*parse_listen(http_listen), status)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot listen on --http-listen {http_listen}: {error}") from None
    http_listening = with_port(http_listen, http.sockets[0].getsockname()[1])
    await server.start()
    bound = RetryPolicy(config.retry.max_retries, config.retry.backoff_ms, config.retry.max_backoff_ms)
    strategy = f"{config.strategy} (preferring {', '.join(config.prefer)})" if config.prefer else config.strategy
    announce_security(log, f"proxy {config.node_id}", tls, listening)
    if tokens is not None:
        log.warning("proxy %s: users are served by bearer token (%s), not by client certificate",
                    config.node_id, args.user_token_file)
    log.warning("proxy %s listening on %s (HTTP %s): afslets %s placed by %s, discovery %s, peers %s; by default "
                "%d retries, at most %.1fs of backoff", config.node_id, listening, http_listening,
                config.afslet_target, strategy, config.discovery_target or "-", config.proxy_peers_target or "-",
                bound.max_retries, bound.worst_case_wait())

    try:  # on SIGTERM: no new calls; running ones get the grace, then they (and their afslet calls) are cancelled
        await announce_ready(args.ready_file, listen=listening, http=http_listening)
        await run_until_signalled(server, grace=args.graceful_timeout, started=True)
    finally:
        http.close()
        await http.wait_closed()
        await backends.close()
        await channels.close()
    return 0
