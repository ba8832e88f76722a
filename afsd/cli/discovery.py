"""`afsd discovery`: run a discovery replica (gRPC control plane)."""

from __future__ import annotations

import argparse
import asyncio
import logging

from afsd.cli._options import add_registry_options, registry_config
from afsd.errors import UsageError

log = logging.getLogger("afsd.discovery")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "discovery", help="run a discovery replica",
        description="Serve discovery.v1.ServiceDiscovery: layerstores heartbeat here; mounts, afslets and "
                    "the proxy ask which nodes hold an image or a layer and resolve image references. "
                    "Soft state: run several replicas and point every layerstore at all of them.")
    parser.add_argument("--listen", default="0.0.0.0:60051", help="gRPC listen address (default %(default)s)")
    parser.add_argument("--ttl", type=float, default=30.0,
                        help="seconds after its last heartbeat before a node is forgotten (default %(default)s)")
    parser.add_argument("--resolve-ttl", type=float, default=60.0,
                        help="seconds a tag's resolution is reused before asking the registry again (default %(default)s)")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    add_registry_options(parser)
    parser.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    from afsd.api import discovery_pb2_grpc
    from afsd.cluster.discovery import DiscoveryService, expire_periodically
    from afsd.cluster.nodetable import NodeTable
    from afsd.cluster.resolver import ImageResolver
    from afsd.metrics import serve_metrics
    from afsd.oci.client import RegistryClient
    from afsd.rpc import new_server, run_until_signalled

    if args.ttl <= 0:
        raise UsageError("--ttl must be positive")
    if args.metrics_listen:
        serve_metrics(args.metrics_listen)
    async with RegistryClient(registry_config(args)) as client:
        table = NodeTable(ttl=args.ttl)
        service = DiscoveryService(table, ImageResolver(client, tag_ttl=args.resolve_ttl))
        server = new_server()
        discovery_pb2_grpc.add_ServiceDiscoveryServicer_to_server(service, server)
        port = server.add_insecure_port(args.listen)
        if port == 0:
            raise UsageError(f"cannot listen on {args.listen}")
        expiry = asyncio.create_task(expire_periodically(table, min(5.0, args.ttl / 3)))
        log.warning("discovery listening on %s (ttl %.0fs)", args.listen, args.ttl)
        try:
            await run_until_signalled(server)
        finally:
            expiry.cancel()
    return 0
