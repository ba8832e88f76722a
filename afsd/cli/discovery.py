"""`afsd discovery`: run a discovery replica (gRPC control plane)."""

from __future__ import annotations

import argparse
import asyncio
import logging

from afsd.cli._options import (
    add_registry_options,
    add_tls_options,
    announce_security,
    daemon_tls_from,
    listen_address,
    registry_config,
)
from afsd.errors import UsageError

log = logging.getLogger("afsd.discovery")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "discovery", help="run a discovery replica",
        description="Serve discovery.v1.ServiceDiscovery: layerstores heartbeat here; mounts, afslets and "
                    "the proxy ask which nodes hold an image or a layer and resolve image references. "
                    "Soft state: run several replicas and point every layerstore at all of them.")
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help="gRPC listen address (default 0.0.0.0:60051 with TLS, 127.0.0.1:60051 without)")
    parser.add_argument("--ttl", type=float, default=30.0,
                        help="seconds after its last heartbeat before a node is forgotten (default %(default)s)")
    parser.add_argument("--resolve-ttl", type=float, default=60.0,
                        help="seconds a tag's resolution is reused before asking the registry again (default %(default)s)")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    add_registry_options(parser)
    add_tls_options(parser)
    parser.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    from afsd.api import discovery_pb2_grpc
    from afsd.cluster.discovery import DiscoveryService, expire_periodically
    from afsd.cluster.nodetable import NodeTable
    from afsd.cluster.resolver import ImageResolver
    from afsd.metrics import serve_metrics
    from afsd.oci.client import RegistryClient
    from afsd.rpc import add_port, new_server, run_until_signalled

    if args.ttl <= 0:
        raise UsageError("--ttl must be positive")
    tls = daemon_tls_from(args)
    listen = listen_address(args.listen, 60051, tls)
    if args.metrics_listen:
        serve_metrics(args.metrics_listen)
    async with RegistryClient(registry_config(args)) as client:
        table = NodeTable(ttl=args.ttl)
        service = DiscoveryService(table, ImageResolver(client, tag_ttl=args.resolve_ttl),
                                   authenticated=tls is not None)
        server = new_server(tls)
        discovery_pb2_grpc.add_ServiceDiscoveryServicer_to_server(service, server)
        add_port(server, listen, tls)
        expiry = asyncio.create_task(expire_periodically(table, min(5.0, args.ttl / 3)))
        announce_security(log, "discovery", tls, listen)
        log.warning("discovery listening on %s (ttl %.0fs)", listen, args.ttl)
        try:
            await run_until_signalled(server)
        finally:
            expiry.cancel()
    return 0
