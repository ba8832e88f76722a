"""`afsd let`: the Execute service (afslet) — run commands in images under runc, with admission."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
from pathlib import Path

from afsd.errors import MissingToolError, UsageError

log = logging.getLogger("afsd.let")

MAX_TAR_CHUNK = 4 * 1024 * 1024 - 64 * 1024  # under the 4 MiB gRPC message limit, with room for framing


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "let", help="run the Execute service (afslet)",
        description="Serve afsletpb.Afslet (wire-compatible with the afs-sdk client): run a command in an "
                    "image's root filesystem, mounted by this node's `afsd node`, under runc with CPU, memory "
                    "and pids limits; stream its output line by line and return its writable layer as a "
                    "gzip tar. Must run as root.")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="gRPC listen address")
    parser.add_argument("--node-socket", type=Path, default=Path("/run/afsd/node.sock"),
                        help="the node daemon's control socket (default %(default)s)")
    parser.add_argument("--discovery-addr", action="append", default=[], required=True, metavar="HOST:PORT",
                        help="discovery replica to resolve image configs with (repeatable; use the node "
                             "daemon's)")
    parser.add_argument("--limit-cpu", type=int, default=1, metavar="N",
                        help="CPU cores Execute calls may reserve in total (default %(default)s)")
    parser.add_argument("--limit-memory-mb", type=int, default=256, metavar="M",
                        help="memory (MB) Execute calls may reserve in total (default %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=Path("/var/lib/afsd/let"),
                        help="session directories and runc state; not on overlayfs (default %(default)s)")
    parser.add_argument("--network", choices=["host", "none"], default="host",
                        help="containers share the host's network (default), or get their own with loopback only")
    parser.add_argument("--default-timeout-ms", type=int, default=60_000, metavar="MS",
                        help="command timeout when a request says timeout_ms=0 (default %(default)s)")
    parser.add_argument("--max-timeout-ms", type=int, default=3_600_000, metavar="MS",
                        help="longest timeout a request may ask for (default %(default)s)")
    parser.add_argument("--tar-chunk", type=int, default=256 * 1024, metavar="BYTES",
                        help="bytes per tar_chunk frame (default %(default)s)")
    parser.add_argument("--pids-limit", type=int, default=4096, metavar="N",
                        help="most processes per container (default %(default)s)")
    parser.add_argument("--runc", default="runc", metavar="PATH", help="runc binary (default %(default)s)")
    parser.add_argument("--runc-root", type=Path, metavar="DIR",
                        help="runc state directory, afslet's alone (default WORK_DIR/runc)")
    parser.add_argument("--cgroup-parent", default="/afsd-let", metavar="PATH",
                        help="absolute cgroup path containers are created under (default %(default)s)")
    parser.add_argument("--mount-backend", default="auto", help="node daemon backend for mounts (default auto)")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    parser.add_argument("--graceful-timeout", type=float, default=10.0, metavar="S",
                        help="on SIGTERM, seconds running calls get before they are cancelled (default %(default)s)")
    parser.set_defaults(handler=run)


def _check(args: argparse.Namespace) -> str:
    if args.limit_cpu <= 0 or args.limit_memory_mb <= 0:
        raise UsageError("--limit-cpu and --limit-memory-mb must be > 0")
    if args.default_timeout_ms <= 0 or args.max_timeout_ms < args.default_timeout_ms:
        raise UsageError("--default-timeout-ms must be > 0 and at most --max-timeout-ms")
    if not 1024 <= args.tar_chunk <= MAX_TAR_CHUNK:
        raise UsageError(f"--tar-chunk must be between 1024 and {MAX_TAR_CHUNK} bytes")
    if args.pids_limit <= 0:
        raise UsageError("--pids-limit must be > 0")
    if not args.cgroup_parent.startswith("/"):
        raise UsageError(f"--cgroup-parent {args.cgroup_parent!r} must be an absolute cgroup path")
    if os.geteuid() != 0:
        raise UsageError("afsd let must run as root: it runs runc and talks to the node daemon's root-only socket")
    runc = shutil.which(args.runc)
    if runc is None:
        raise MissingToolError(f"runc not found ({args.runc}); install it (Debian package runc) or pass --runc PATH")
    return runc


async def run(args: argparse.Namespace) -> int:
    from afsd.afslet import cgroups
    from afsd.afslet.admission import Admission
    from afsd.afslet.node_mounts import NodeMounts
    from afsd.afslet.reaper import Subreaper
    from afsd.afslet.recovery import recover
    from afsd.afslet.request import TimeoutPolicy
    from afsd.afslet.runc import Runc
    from afsd.afslet.runtime import AfsletConfig, Runtime
    from afsd.afslet.service import AfsletService
    from afsd.api import afslet_pb2_grpc
    from afsd.cluster.discovery_client import DiscoveryClient
    from afsd.metrics import serve_metrics
    from afsd.rpc import ChannelPool, new_server

    runc_binary = _check(args)
    work_dir = args.work_dir.absolute()
    config = AfsletConfig(
        work_dir=work_dir, limit_cpu_cores=args.limit_cpu, limit_memory_mb=args.limit_memory_mb,
        timeouts=TimeoutPolicy(args.default_timeout_ms, args.max_timeout_ms), network=args.network,
        tar_chunk=args.tar_chunk, pids_limit=args.pids_limit, runc_binary=runc_binary,
        runc_root=args.runc_root.absolute() if args.runc_root else None, cgroup_parent=args.cgroup_parent)
    await asyncio.to_thread(config.sessions_dir.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(config.runc_state.mkdir, parents=True, exist_ok=True)
    if args.metrics_listen:
        serve_metrics(args.metrics_listen)

    reaper = Subreaper()
    reaper.install()
    channels = ChannelPool()
    mounts = NodeMounts(args.node_socket, args.mount_backend)
    runtime = Runtime(config=config, admission=Admission(args.limit_cpu, args.limit_memory_mb), reaper=reaper,
                      runc=Runc(runc_binary, config.runc_state, reaper), mounts=mounts,
                      discovery=DiscoveryClient(args.discovery_addr, channels))
    removed = await recover(runtime)
    if removed:
        log.warning("removed %d containers/sessions left by an earlier run", removed)

    server = new_server()
    afslet_pb2_grpc.add_AfsletServicer_to_server(AfsletService(runtime), server)
    if server.add_insecure_port(args.listen) == 0:
        raise UsageError(f"cannot listen on {args.listen}")
    await server.start()
    log.warning("afslet listening on %s: limits cpu=%d memory_mb=%d, network %s, work dir %s, node socket %s",
                args.listen, args.limit_cpu, args.limit_memory_mb, args.network, work_dir, args.node_socket)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        log.warning("afslet shutting down (grace %.1fs)", args.graceful_timeout)
        await server.stop(args.graceful_timeout)
        await runtime.drain(timeout=60.0)
        await reaper.close()
        await mounts.close()
        await channels.close()
        await asyncio.to_thread(cgroups.remove_if_empty, config.cgroup_parent)
    return 0
