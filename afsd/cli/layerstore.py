"""`afsd layerstore`: run a node's layer cache (gRPC), heartbeating to discovery."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from afsd.cli._options import (
    add_ready_file_option,
    add_registry_options,
    add_tls_options,
    announce_security,
    daemon_tls_from,
    registry_config,
)
from afsd.errors import UsageError

if TYPE_CHECKING:
    from afsd.cluster.blobstore import BlobStore
    from afsd.cluster.bytestream_server import ByteStreamServer
    from afsd.trust.tls import TlsConfig

log = logging.getLogger("afsd.layerstore")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "layerstore", help="run a node's layer cache",
        description="Serve layerstore.v1.LayerStore: pull images (from peers when they have them, else "
                    "from the registry), convert layers to erofs blobs, serve byte ranges to readers, and "
                    "keep the cache under its limit (LRU).")
    parser.add_argument("--listen", required=True, metavar="IP:PORT",
                        help="gRPC listen address; also the endpoint advertised to discovery, so use an "
                             "address peers can reach (not 0.0.0.0); port 0 picks a free one")
    parser.add_argument("--advertise", metavar="HOST:PORT",
                        help="endpoint to advertise instead of --listen (e.g. behind NAT)")
    parser.add_argument("--node-id", required=True, help="this node's identity (e.g. the host name)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/lib/afsd/layerstore"),
                        help="cache root (default %(default)s)")
    parser.add_argument("--cache-max-bytes", type=int, default=0,
                        help="cache limit in bytes (default: min(1 TiB, 60%% of the cache filesystem's free space))")
    parser.add_argument("--discovery-endpoint", action="append", default=[], metavar="HOST:PORT",
                        help="a discovery replica (repeatable); a host name is expanded to all its addresses "
                             "at every heartbeat")
    parser.add_argument("--heartbeat-period", type=float, default=10.0,
                        help="seconds between heartbeats (default %(default)s)")
    parser.add_argument("--resolve-ttl", type=float, default=60.0,
                        help="seconds a tag's layer list is reused before it is resolved again (default %(default)s)")
    parser.add_argument("--fetch-concurrency", type=int, default=3,
                        help="layers downloaded and converted at once (default %(default)s)")
    parser.add_argument("--admin-socket", type=Path, default=Path("/run/afsd/layerstore.sock"),
                        help="unix socket (root only) for local requests such as importing blobs assembled by "
                             "this node's mounts (default %(default)s)")
    parser.add_argument("--data-listen", metavar="IP:PORT",
                        help="the byte-stream data listener (raw blob ranges sent with sendfile to readers holding "
                             "a ticket from OpenByteStream; docs/data-path.md). Default: --listen's IP on any free "
                             "port; 'none': no listener, readers use ReadLayer")
    parser.add_argument("--data-plaintext", action="store_true",
                        help="with TLS: the data listener sends blob bytes unencrypted (faster; readers still check "
                             "every chunk against the signed chunk table and need a ticket from the mutual-TLS "
                             "control channel; only confidentiality on the wire is given up)")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    add_ready_file_option(parser)
    add_registry_options(parser)
    add_tls_options(parser)
    parser.set_defaults(handler=run)


def _data_listen(args: argparse.Namespace) -> tuple[str, int] | None:
    """(host, port) of the data listener, or None for 'none'."""
    from afsd.cluster.discovery_client import split_host_port

    value = args.data_listen or f"{split_host_port(args.listen)[0]}:0"
    if value == "none":
        return None
    try:
        host, port = split_host_port(value)
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"--data-listen {value!r}: expected a literal IP:PORT or 'none'") from None
    return host, port


def _check_listen(listen: str) -> None:
    host, sep, port = listen.rpartition(":")
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise UsageError(f"--listen {listen!r}: expected a literal IP:PORT (peers dial this address)") from None
    if not sep or not port.isdigit():
        raise UsageError(f"--listen {listen!r}: expected IP:PORT")
    if address.is_unspecified:
        raise UsageError(f"--listen {listen!r}: an unspecified address cannot be advertised; "
                         "listen on a reachable IP or pass --advertise HOST:PORT")


def _check_certificate(tls: "TlsConfig", node_id: str, endpoint: str) -> None:
    """Discovery accepts our heartbeats only if our certificate is a node's, names --node-id and covers
    the advertised host: say so now rather than at every heartbeat."""
    identity = tls.identity
    host = endpoint.rpartition(":")[0]
    if not identity.is_node or identity.name != node_id or not identity.covers_host(host):
        raise UsageError(f"{tls.cert_path} is the certificate of {identity}, hosts "
                         f"{', '.join(sorted(identity.hosts)) or 'none'}: a layerstore needs a node certificate for "
                         f"--node-id {node_id} covering {host} (`afsd certs issue {node_id} --host {host}`)")


async def run(args: argparse.Namespace) -> int:
    from afsd.api import layerstore_pb2_grpc
    from afsd.cluster.blobstore import BlobStore
    from afsd.cluster.discovery_client import DiscoveryClient, split_host_port
    from afsd.cluster.heartbeat import heartbeat_forever, leave
    from afsd.cluster.configs import ClusterConfigSource
    from afsd.cluster.layerstore import LayerStoreNode, config_holders
    from afsd.cluster.layerstore_service import LayerStoreService, LocalLayerStoreService
    from afsd.metrics import serve_metrics
    from afsd.oci.client import RegistryClient
    from afsd.oci.metadata_cache import MetadataCache
    from afsd.readiness import announce_ready, with_port
    from afsd.rpc import ChannelPool, add_port, new_server, run_until_signalled, start_unix_server
    from afsd.trust.descriptors import BlobTrust

    if not args.advertise:
        _check_listen(args.listen)
    if args.cache_max_bytes < 0:
        raise UsageError("--cache-max-bytes must be >= 0")
    if args.resolve_ttl < 0:
        raise UsageError("--resolve-ttl must be >= 0")
    tls = daemon_tls_from(args)
    if tls is not None:
        _check_certificate(tls, args.node_id, args.advertise or args.listen)
    metrics = serve_metrics(args.metrics_listen) if args.metrics_listen else None
    server = new_server(tls)
    listening = with_port(args.listen, add_port(server, args.listen, tls))
    endpoint = args.advertise or listening
    channels = ChannelPool(tls)
    discovery = DiscoveryClient(args.discovery_endpoint, channels)
    # Image configs are kept beside the cache (and served to the cluster); a missing one is asked of the
    # layerstores that hold the image before the registry.
    async with RegistryClient(registry_config(args), metadata=MetadataCache(args.cache_dir / "metadata"),
                              config_sources=(ClusterConfigSource(config_holders(discovery, endpoint), channels),)
                              ) as registry:
        store = BlobStore(args.cache_dir, args.cache_max_bytes or None)
        node = LayerStoreNode(store, node_id=args.node_id, endpoint=endpoint,
                              registry=registry, discovery=discovery, channels=channels,
                              fetch_concurrency=args.fetch_concurrency, resolve_ttl=args.resolve_ttl,
                              trust=BlobTrust(tls))
        await node.start()
        byte_streams = _start_byte_streams(args, store, asyncio.get_running_loop(), tls)
        data_host = ""
        if byte_streams is not None and byte_streams.host != split_host_port(args.listen)[0]:
            data_host = byte_streams.host   # readers dial the gRPC endpoint's host unless told otherwise
        layerstore_pb2_grpc.add_LayerStoreServicer_to_server(LayerStoreService(node, byte_streams, data_host), server)
        admin = await start_unix_server(args.admin_socket, lambda s: layerstore_pb2_grpc.add_LocalLayerStoreServicer_to_server(LocalLayerStoreService(node), s))
        beats = asyncio.create_task(heartbeat_forever(node, discovery, args.heartbeat_period)) \
            if args.discovery_endpoint else None
        announce_security(log, f"layerstore {args.node_id}", tls, listening)
        log.warning("layerstore %s listening on %s, cache %s (limit %d bytes)", args.node_id, listening,
                    args.cache_dir, store.limit)
        try:
            await server.start()
            await announce_ready(args.ready_file, listen=listening, advertised=endpoint, metrics=metrics,
                                 admin_socket=str(args.admin_socket),
                                 data=f"{byte_streams.host}:{byte_streams.port}" if byte_streams else None)
            # On SIGTERM/SIGINT, first tell discovery we hold nothing, so no new reader picks us.
            leaving = [lambda: leave(node, discovery, beats)] if beats else []
            await run_until_signalled(server, on_stop=[*leaving, lambda: admin.stop(1)], started=True)
        finally:
            if beats:
                beats.cancel()
            if byte_streams is not None:
                await asyncio.to_thread(byte_streams.close)
            await channels.close()
    return 0


def _start_byte_streams(args: argparse.Namespace, store: BlobStore, loop: asyncio.AbstractEventLoop,
                        tls: TlsConfig | None) -> ByteStreamServer | None:
    """The data listener serving `store`'s blobs, started; None with --data-listen none. With `tls` it speaks
    mutual TLS too, unless --data-plaintext (docs/data-path.md: what each costs)."""
    from afsd.cluster.bytestream_server import ByteStreamServer

    address = _data_listen(args)
    if address is None:
        return None

    def lookup(digest: str) -> tuple[str, int] | None:
        layer = store.get(digest)
        return (str(layer.path), layer.blob.size) if layer is not None else None

    touched: dict[str, float] = {}

    def served(digest: str, count: int) -> None:
        # LRU: the store lives on the event loop, and touches a layer once a second at most; waking the loop
        # for every range served cost the data listener's threads a GIL hand-off each.
        now = time.monotonic()
        if now - touched.get(digest, -2.0) >= 1.0:
            touched[digest] = now
            loop.call_soon_threadsafe(store.touch, digest)

    data_tls = tls.ssl_server_context() if tls is not None and not args.data_plaintext else None
    server = ByteStreamServer(*address, lookup, on_served=served, tls=data_tls)
    try:
        server.start()
    except OSError as error:
        raise UsageError(f"--data-listen {address[0]}:{address[1]}: cannot listen: {error.strerror or error}") from None
    log.info("byte-stream data listener on %s:%d%s", address[0], server.port, " (TLS)" if data_tls else "")
    return server
