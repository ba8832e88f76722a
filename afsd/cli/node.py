"""`afsd node` (the privileged node daemon) and its clients `afsd mount`, `afsd umount`, `afsd mounts`."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from afsd.cli._options import add_ready_file_option, add_tls_options, announce_security, daemon_tls_from
from afsd.errors import AfsdError, UsageError
from afsd.ondemand.trace import DEFAULT_WINDOW
from afsd.ondemand.registry import BACKEND_NAMES

log = logging.getLogger("afsd.node")

DEFAULT_SOCKET = Path("/run/afsd/node.sock")


def register(subparsers: argparse._SubParsersAction) -> None:
    node = subparsers.add_parser(
        "node", help="run the node daemon that mounts images (root)",
        description="Own this node's kernel side: mount images as overlayfs over erofs layers whose misses are "
                    "fetched on demand from peer layerstores. Clients (afsd mount/umount/mounts, afslet) talk "
                    "to it over a unix socket only root can reach. Mounts outlive both the client and a restart "
                    "of this daemon.")
    node.add_argument("--socket", type=Path, default=DEFAULT_SOCKET, help="control socket (default %(default)s)")
    node.add_argument("--state-dir", type=Path, default=Path("/var/lib/afsd/node"),
                      help="mount records, layer mounts and blob files; must be on ext4, xfs or btrfs for the "
                           "fanotify backend (default %(default)s)")
    node.add_argument("--discovery-endpoint", action="append", default=[], metavar="HOST:PORT", required=True,
                      help="a discovery replica (repeatable)")
    node.add_argument("--layerstore", metavar="HOST:PORT",
                      help="this node's own layerstore: read from first, asked first to pull")
    node.add_argument("--layerstore-admin-socket", type=Path,
                      help="the local layerstore's admin socket: complete blobs are handed to it so this node "
                           "becomes a provider (default: none)")
    node.add_argument("--node-id", default=socket.gethostname(), help="this node's identity (default: host name)")
    node.add_argument("--backend", action="append", dest="backends", metavar="NAME", choices=BACKEND_NAMES,
                      help="enable only these backends (repeatable; default: every one this build has: "
                           f"{', '.join(BACKEND_NAMES)})")
    node.add_argument("--no-prefetch", action="store_true",
                      help="fetch only what readers touch (default: also fill whole blobs in the background)")
    node.add_argument("--layer-linger", type=float, default=0.0, metavar="SECONDS",
                      help="keep a layer attached and mounted this long after its last image mount is gone: "
                           "the next mount sharing it starts at once, its background fill goes on and a "
                           "complete blob still reaches the local layerstore (for nodes running many short "
                           "tasks; default 0: release at once, `afsd umount` leaves no mount behind)")
    node.add_argument("--no-learned-prefetch", action="store_true",
                      help="neither fetch what the cluster learned tasks read first from a layer before they ask, "
                           "nor record and report what tasks here read first (default: both; "
                           "docs/learned-prefetch.md)")
    node.add_argument("--trace-window", type=float, default=DEFAULT_WINDOW, metavar="SECONDS",
                      help="how long after a layer's first read its reads are recorded (default %(default)g)")
    node.add_argument("--fetch-workers", type=int, default=None, metavar="N",
                      help="fetch worker processes of the fanotify backend (default 2; each costs ~60 MB, "
                           "so a host simulating many nodes uses 1)")
    node.add_argument("--no-byte-stream", action="store_true",
                      help="read blob ranges from layerstores with ReadLayer only, never over their byte stream "
                           "(docs/data-path.md; this daemon and its fetch workers alike)")
    node.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    add_ready_file_option(node)
    add_tls_options(node)
    node.set_defaults(handler=run_node)

    mount = subparsers.add_parser("mount", help="mount an image's rootfs at a directory",
                                  description="Ask the node daemon to mount IMAGE at MOUNTPOINT (read-only unless "
                                              "--upper or --tmpfs-upper). The mount stays until `afsd umount`.")
    mount.add_argument("image", metavar="IMAGE")
    mount.add_argument("target", metavar="MOUNTPOINT", type=Path)
    mount.add_argument("--backend", default="auto", choices=["auto", *BACKEND_NAMES],
                       help="how misses are served (default: the best this kernel supports)")
    mount.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="platform of a multi-platform image")
    upper = mount.add_mutually_exclusive_group()
    upper.add_argument("--upper", type=Path, metavar="DIR",
                       help="make the mount writable; changes go to DIR/upper (DIR/work is overlayfs' scratch)")
    upper.add_argument("--tmpfs-upper", action="store_true", help="make the mount writable on a private tmpfs")
    mount.add_argument("--volatile-upper", action="store_true",
                       help="the upper is scratch that need not survive a crash: never sync it (overlayfs "
                            "volatile; a fast unmount, and fsync inside does not reach the disk)")
    mount.add_argument("--extra-dir", type=Path, metavar="DIR", help="a read-only directory stacked above the image")
    _client_options(mount)
    mount.set_defaults(handler=run_mount)

    umount = subparsers.add_parser("umount", help="unmount what `afsd mount` mounted",
                                   description="Remove every mount afsd made for MOUNTPOINT (or mount id).")
    umount.add_argument("target", metavar="MOUNTPOINT")
    _client_options(umount)
    umount.set_defaults(handler=run_umount)

    mounts = subparsers.add_parser("mounts", help="list the node daemon's mounts",
                                   description="List mounts with image, backend and how much of them is on this node.")
    mounts.add_argument("--json", action="store_true", help="machine-readable output")
    _client_options(mounts)
    mounts.set_defaults(handler=run_mounts)


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, default=DEFAULT_SOCKET,
                        help="the node daemon's control socket (default %(default)s)")


async def run_node(args: argparse.Namespace) -> int:
    from afsd.api import node_pb2_grpc
    from afsd.cluster.discovery_client import DiscoveryClient
    from afsd.metrics import serve_metrics
    from afsd.node.backends import build_backends, source_factory
    from afsd.node.daemon import NodeDaemon
    from afsd.node.images import ImageLocator
    from afsd.node.service import NodeService
    from afsd.node.traces import LearnedTraces, TraceSettings
    from afsd.readiness import announce_ready
    from afsd.rpc import ChannelPool, run_until_signalled, start_unix_server
    from afsd.trust.descriptors import BlobTrust

    if args.layer_linger < 0:
        raise UsageError(f"--layer-linger {args.layer_linger:g}: give seconds >= 0")
    if not 0 < args.trace_window <= 3600:
        raise UsageError(f"--trace-window {args.trace_window:g}: give seconds in (0, 3600]")
    tls = daemon_tls_from(args)
    metrics = serve_metrics(args.metrics_listen) if args.metrics_listen else None
    channels = ChannelPool(tls)
    discovery = DiscoveryClient(args.discovery_endpoint, channels)
    if args.fetch_workers is not None and args.fetch_workers < 1:
        raise UsageError(f"--fetch-workers {args.fetch_workers}: give at least 1")
    backends = build_backends(args.state_dir, args.backends, prefetch=not args.no_prefetch,
                              spreads=args.layerstore_admin_socket is not None, fetch_workers=args.fetch_workers)
    daemon = NodeDaemon(
        args.state_dir, locator=ImageLocator(discovery, channels, local_layerstore=args.layerstore, node_id=args.node_id,
                                             trust=BlobTrust(tls)),
        backends=backends,
        source_factory=source_factory(discovery, channels, discovery_endpoints=args.discovery_endpoint,
                                      local_endpoint=args.layerstore, node_id=args.node_id, tls=tls,
                                      byte_stream=not args.no_byte_stream),
        layerstore_admin_socket=args.layerstore_admin_socket, layer_linger=args.layer_linger,
        traces=LearnedTraces(discovery, args.node_id, TraceSettings(not args.no_learned_prefetch, args.trace_window)))
    await daemon.start()
    if args.metrics_listen:
        from prometheus_client import REGISTRY

        from afsd.cluster.fetch_metrics import FETCH_METRICS
        for collector in daemon.metrics_collectors():
            REGISTRY.register(collector)
        FETCH_METRICS.add_process(daemon.source_metrics)   # the fetch workers' afsd_fetch_* (polled with the above)
    server = await start_unix_server(args.socket, lambda s: node_pb2_grpc.add_NodeServicer_to_server(NodeService(daemon), s))
    announce_security(log, f"node daemon {args.node_id}", tls)
    log.warning("node daemon %s: socket %s, state %s, backends %s", args.node_id, args.socket, args.state_dir,
                ", ".join(f"{n}={r}" for n, r in daemon.backend_availability().items()))
    try:
        await announce_ready(args.ready_file, socket=str(args.socket), metrics=metrics)
        await run_until_signalled(server, on_stop=[daemon.close], started=True)
    finally:
        await channels.close()
    return 0


def _stub(args: argparse.Namespace):
    import grpc

    from afsd.api import node_pb2_grpc

    if not args.socket.exists():
        raise AfsdError(f"the node daemon is not running (no socket {args.socket}); start it with `afsd node`")
    channel = grpc.aio.insecure_channel(f"unix:{args.socket}")
    return channel, node_pb2_grpc.NodeStub(channel)


async def _call(args: argparse.Namespace, method: str, request):
    import grpc

    from afsd.rpc import daemon_did_not_answer

    channel, stub = _stub(args)
    async with channel:
        try:
            return await getattr(stub, method)(request, timeout=3600)
        except grpc.aio.AioRpcError as error:
            if daemon_did_not_answer(error):
                raise AfsdError(f"the node daemon is not running (nothing answers on {args.socket}); "
                                "start it with `afsd node`") from None
            raise AfsdError(error.details() or error.code().name) from None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


async def run_mount(args: argparse.Namespace) -> int:
    from afsd.api import node_pb2 as pb

    if args.volatile_upper and not (args.upper or args.tmpfs_upper):
        raise UsageError("--volatile-upper is about a writable upper: add --upper DIR (or --tmpfs-upper)")
    request = pb.MountRequest(image=args.image, target=str(args.target.absolute()), backend=args.backend,
                              platform=args.platform or "", upper_dir=str(args.upper.absolute()) if args.upper else "",
                              tmpfs_upper=args.tmpfs_upper, volatile_upper=args.volatile_upper,
                              extra_dir=str(args.extra_dir.absolute()) if args.extra_dir else "")
    response = await _call(args, "Mount", request)
    mount = response.mount
    print(f"mounted {mount.image} at {mount.target} with backend {mount.backend} "
          f"({len(mount.layers)} layers, {_size(mount.bytes_cached)} of {_size(mount.bytes_total)} on this node, "
          f"{response.seconds:.2f}s)")
    return 0


async def run_umount(args: argparse.Namespace) -> int:
    from afsd.api import node_pb2 as pb

    target = str(Path(args.target).absolute()) if "/" in args.target or Path(args.target).exists() else args.target
    response = await _call(args, "Unmount", pb.UnmountRequest(target=target))
    print(f"unmounted {response.mount.image} from {response.mount.target}")
    return 0


async def run_mounts(args: argparse.Namespace) -> int:
    from afsd.api import node_pb2 as pb
    from afsd.cli._output import print_json

    response = await _call(args, "ListMounts", pb.ListMountsRequest())
    if args.json:
        print_json(response)
        return 0
    print(f"{'MOUNT ID':<13} {'BACKEND':<9} {'CACHED':>10} {'TOTAL':>10}  {'LEARNED (USED/FETCHED)':<24} "
          f"{'TARGET':<30} IMAGE")
    for mount in response.mounts:
        print(f"{mount.mount_id:<13} {mount.backend:<9} {_size(mount.bytes_cached):>10} {_size(mount.bytes_total):>10}  "
              f"{_learned(mount):<24} {mount.target:<30} {mount.image}")
    for name, reason in sorted(response.backends.items()):
        summary = ", ".join(f"{label} {_counter(key, response.counters[f'{name}.{key}'])}"
                            for key, label in _HEADLINE_COUNTERS if f"{name}.{key}" in response.counters)
        print(f"backend {name}: {reason}" + (f"; {summary}" if summary else ""))
    return 0


def _learned(mount) -> str:
    """What the mount's layers prefetched from learned traces, and how much of it readers then read."""
    layers = [layer for layer in mount.layers if layer.learned_ranges]
    if not layers:
        return "-"
    fetched = sum(layer.learned_prefetched_bytes for layer in layers)
    if all(layer.HasField("learned_used_bytes") for layer in layers):
        return f"{_size(sum(layer.learned_used_bytes for layer in layers))}/{_size(fetched)}"
    return f"?/{_size(fetched)}"


def _counter(key: str, value: float) -> str:
    return _size(int(value)) if "bytes" in key else f"{int(value)}"


# The counters worth a glance (all of them: `afsd mounts --json`).
_HEADLINE_COUNTERS = (("events_total", "events"), ("requests_total", "requests"),
                      ("events_redispatched", "re-dispatched"), ("worker_restarts", "worker restarts"),
                      ("supervisor_restarts", "supervisor restarts"), ("bytes_filled", "bytes filled"),
                      ("learned_blobs", "learned traces"), ("learned_bytes_prefetched", "learned fetched"),
                      ("learned_bytes_used", "learned used"))
