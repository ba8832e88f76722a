"""`afsd snapshotter`: containerd's snapshots API (a proxy plugin) over the node daemon's lazy layers."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from afsd.cli._options import add_ready_file_option
from afsd.cli.node import DEFAULT_SOCKET as DEFAULT_NODE_SOCKET

log = logging.getLogger("afsd.snapshotter")

DEFAULT_ADDRESS = Path("/run/afsd/snapshotter.sock")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "snapshotter", help="serve containerd's snapshots API over afsd's lazily mounted layers (root)",
        description="A containerd remote snapshotter (configure it as a proxy plugin, see docs/containerd.md). "
                    "Image layers containerd's CRI plugin pulls are attached by the node daemon (`afsd node`) "
                    "from the afsd cluster, lazily, instead of being downloaded; layers afsd cannot serve are "
                    "unpacked by containerd as usual. Metadata lives in ROOT/metadata.db; restarting this "
                    "daemon leaves running containers alone.")
    parser.add_argument("--address", type=Path, default=DEFAULT_ADDRESS,
                        help="unix socket to serve on, containerd's proxy_plugins address (default %(default)s)")
    parser.add_argument("--root", type=Path, default=Path("/var/lib/afsd/snapshotter"),
                        help="snapshot directories and metadata; must be on a filesystem overlayfs can use as "
                             "upper (ext4, xfs) (default %(default)s)")
    parser.add_argument("--node-socket", type=Path, default=DEFAULT_NODE_SOCKET,
                        help="the node daemon's control socket (default %(default)s)")
    parser.add_argument("--backend", default="auto", choices=["auto", "fanotify", "fscache", "eager"],
                        help="how the node daemon serves the layers' misses (default: the best it has)")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    add_ready_file_option(parser)
    parser.set_defaults(handler=run_snapshotter)


async def run_snapshotter(args: argparse.Namespace) -> int:
    from afsd.api import containerd_snapshots_pb2_grpc
    from afsd.metrics import serve_metrics
    from afsd.readiness import announce_ready
    from afsd.rpc import run_until_signalled, start_unix_server
    from afsd.snapshotter.lazy import NodeLayers, lease_owner
    from afsd.snapshotter.service import SnapshotsService
    from afsd.snapshotter.snapshotter import Snapshotter

    metrics = serve_metrics(args.metrics_listen) if args.metrics_listen else None
    root = args.root.absolute()
    snapshotter = Snapshotter(root, NodeLayers(args.node_socket, lease_owner(root), backend=args.backend))
    await snapshotter.start()
    try:
        server = await start_unix_server(
            args.address, lambda s: containerd_snapshots_pb2_grpc.add_SnapshotsServicer_to_server(
                SnapshotsService(snapshotter), s))
        log.warning("snapshotter: socket %s, root %s, node daemon %s", args.address, root, args.node_socket)
        await announce_ready(args.ready_file, socket=str(args.address), metrics=metrics)
        await run_until_signalled(server, started=True)
    finally:
        await snapshotter.close()
    return 0
