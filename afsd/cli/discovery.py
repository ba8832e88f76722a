"""`afsd discovery`: run a discovery replica (gRPC control plane)."""

from __future__ import annotations

import argparse
import asyncio
import logging

from afsd.cli._options import (
    add_ready_file_option,
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
                        help="gRPC listen address; port 0 picks a free one (default 0.0.0.0:60051 with TLS, "
                             "127.0.0.1:60051 without)")
    parser.add_argument("--ttl", type=float, default=30.0,
                        help="seconds after its last heartbeat before a node is forgotten (default %(default)s)")
    parser.add_argument("--resolve-ttl", type=float, default=60.0,
                        help="seconds a tag's resolution is reused before asking the registry again (default %(default)s)")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    add_ready_file_option(parser)
    add_registry_options(parser)
    add_tls_options(parser)
    parser.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    from afsd.api import discovery_pb2_grpc
    from afsd.cluster.configs import ClusterConfigSource
    from afsd.cluster.discovery import DiscoveryService, config_holders, expire_periodically
    from afsd.cluster.nodetable import NodeTable
    from afsd.cluster.resolver import ImageResolver
    from afsd.metrics import serve_metrics
    from afsd.oci.client import RegistryClient
    from afsd.readiness import announce_ready, with_port
    from afsd.rpc import ChannelPool, add_port, new_server, run_until_signalled

    if args.ttl <= 0:
        raise UsageError("--ttl must be positive")
    tls = daemon_tls_from(args)
    listen = listen_address(args.listen, 60051, tls)
    metrics = serve_metrics(args.metrics_listen) if args.metrics_listen else None
    table = NodeTable(ttl=args.ttl)
    channels = ChannelPool(tls)
    # Configs of images some layerstore pulled come from that layerstore, not the registry.
    async with RegistryClient(registry_config(args),
                              config_sources=(ClusterConfigSource(config_holders(table), channels),)) as client:
        service = DiscoveryService(table, ImageResolver(client, tag_ttl=args.resolve_ttl),
                                   authenticated=tls is not None)
        server = new_server(tls)
        discovery_pb2_grpc.add_ServiceDiscoveryServicer_to_server(service, server)
        listening = with_port(listen, add_port(server, listen, tls))
        expiry = asyncio.create_task(expire_periodically(table, min(5.0, args.ttl / 3)))
        announce_security(log, "discovery", tls, listening)
        log.warning("discovery listening on %s (ttl %.0fs)", listening, args.ttl)
        try:
            await server.start()
            await announce_ready(args.ready_file, listen=listening, metrics=metrics)
            await run_until_signalled(server, started=True)
        finally:
            expiry.cancel()
            await channels.close()
    return 0
