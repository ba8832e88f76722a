"""`afsd let`: the Execute service (afslet) — run commands in images under runc, with admission."""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import socket
from pathlib import Path

from afsd.cli._options import add_ready_file_option, add_tls_options, daemon_tls_from
from afsd.errors import MissingToolError, UsageError

MAX_TAR_CHUNK = 4 * 1024 * 1024 - 64 * 1024  # under the 4 MiB gRPC message limit, with room for framing


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "let", help="run the Execute service (afslet)",
        description="Serve afsletpb.Afslet (wire-compatible with the afs-sdk client): run a command in an "
                    "image's root filesystem, mounted by this node's `afsd node`, under runc with CPU, memory "
                    "and pids limits; stream its output line by line and return its writable layer as a "
                    "gzip tar. Must run as root.")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT",
                        help="gRPC listen address; port 0 picks a free one")
    parser.add_argument("--node-socket", type=Path, default=Path("/run/afsd/node.sock"),
                        help="the node daemon's control socket (default %(default)s)")
    parser.add_argument("--discovery-addr", action="append", default=[], required=True, metavar="HOST:PORT",
                        help="discovery replica to resolve image configs with (repeatable; use the node "
                             "daemon's)")
    parser.add_argument("--limit-cpu", type=int, default=1, metavar="N",
                        help="CPU cores Execute calls may reserve in total (default %(default)s)")
    parser.add_argument("--limit-memory-mb", type=int, default=256, metavar="M",
                        help="memory (MB) Execute calls may reserve in total (default %(default)s)")
    parser.add_argument("--limit-gpus", type=int, default=0, metavar="N",
                        help="GPU slots Execute calls may reserve in total: an opaque count, admitted and "
                             "accounted, not assigned to devices (default %(default)s)")
    parser.add_argument("--node-id", default=socket.gethostname(),
                        help="this afslet's node in execution management (default: host name)")
    parser.add_argument("--advertise", metavar="HOST:PORT",
                        help="the address clients reach this afslet at, shown by `afsd ps` (default: --listen, "
                             "with the host name for a wildcard host)")
    parser.add_argument("--work-dir", type=Path, default=Path("/var/lib/afsd/let"),
                        help="session directories and runc state; not on overlayfs (default %(default)s)")
    sandbox = parser.add_argument_group(
        "sandbox", "how containers are isolated (docs/afslet.md: what each mode gives and what it does not)")
    sandbox.add_argument("--network", choices=["bridge", "none", "host"], default="bridge",
                         help="bridge (default): own network namespace on this afslet's bridge, masqueraded to "
                              "the outside, the node's own services unreachable; none: loopback only; host: the "
                              "host's network, every service of the node reachable")
    sandbox.add_argument("--bridge-pool", default="10.213.0.0/16", metavar="CIDR",
                         help="the bridge's /24 is the first of this pool no host route overlaps (default "
                              "%(default)s)")
    sandbox.add_argument("--bridge-subnet", metavar="CIDR", help="this subnet for the bridge instead")
    sandbox.add_argument("--bridge-deny", action="append", metavar="CIDR",
                         help="a network containers may not reach (repeatable; default 169.254.0.0/16, the "
                              "metadata service; give the cluster's networks here)")
    sandbox.add_argument("--userns", action="store_true",
                         help="run containers in a user namespace: their root is an unprivileged host uid")
    sandbox.add_argument("--userns-range", default="1000000000:65536", metavar="START:SIZE",
                         help="host uids/gids container ids 0..SIZE-1 map to (default %(default)s)")
    sandbox.add_argument("--resolv-conf", type=Path, default=Path("/etc/resolv.conf"), metavar="PATH",
                         help="the name servers containers use (default %(default)s; with --network bridge, local "
                              "ones are reached through the gateway)")
    sandbox.add_argument("--bind", action="append", default=[], metavar="SRC:DST[:ro]",
                         help="a host directory every container sees at DST (repeatable; shared by all "
                              "containers of this afslet: give them nothing secret)")
    sandbox.add_argument("--allow-net-raw", action="store_true",
                         help="keep CAP_NET_RAW (raw sockets, ping) in containers; dropped by default")
    bounds = parser.add_argument_group("bounds", "limits of one Execute call")
    bounds.add_argument("--first-frame-timeout", type=float, default=30.0, metavar="S",
                        help="seconds a call may take to send its start frame (default %(default)s)")
    bounds.add_argument("--upload-timeout", type=float, default=600.0, metavar="S",
                        help="seconds from `accepted` to the end of the extra-file upload (default %(default)s)")
    bounds.add_argument("--max-extra-bytes", type=int, default=1 << 30, metavar="BYTES",
                        help="bytes of extra files per call (default %(default)s)")
    bounds.add_argument("--max-extra-entries", type=int, default=100_000, metavar="N",
                        help="extra-file entries per call (default %(default)s)")
    bounds.add_argument("--max-upper-bytes", type=int, default=1 << 30, metavar="BYTES",
                        help="largest writable layer returned, file bytes plus 512 per entry (default %(default)s)")
    bounds.add_argument("--max-concurrent-rpcs", type=int, default=256, metavar="N",
                        help="gRPC calls served at once; more get RESOURCE_EXHAUSTED (default %(default)s)")
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
    stop = parser.add_argument_group(
        "staged abort", "how a command is stopped (timeout, `afsd stop`, shutdown, client gone): SIGTERM to its "
                        "init; SIGINT if its environment has AFSD_STOP_INTERRUPT=1; SIGKILL. Each stage waits "
                        "its own timeout for the command to exit.")
    stop.add_argument("--stop-term-timeout", type=float, default=10.0, metavar="S",
                      help="seconds after SIGTERM (default %(default)s)")
    stop.add_argument("--stop-interrupt-timeout", type=float, default=5.0, metavar="S",
                      help="seconds after SIGINT, for workloads that asked for it (default %(default)s)")
    stop.add_argument("--stop-kill-timeout", type=float, default=5.0, metavar="S",
                      help="seconds after SIGKILL before every process of the cgroup is killed directly "
                           "(default %(default)s)")
    parser.add_argument("--graceful-timeout", type=float, default=10.0, metavar="S",
                        help="on SIGTERM, after the running executions' staged aborts: seconds their calls get "
                             "to deliver results and tars before they are cancelled (default %(default)s)")
    parser.add_argument("--keep-finished", type=int, default=50, metavar="N",
                        help="finished executions kept for `afsd ps -a` / `afsd logs` (default %(default)s)")
    parser.add_argument("--log-tail-lines", type=int, default=1000, metavar="N",
                        help="log frames kept per execution for `afsd logs` (default %(default)s)")
    add_ready_file_option(parser)
    add_tls_options(parser)
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
    if args.limit_gpus < 0:
        raise UsageError("--limit-gpus must be >= 0")
    if min(args.stop_term_timeout, args.stop_interrupt_timeout, args.stop_kill_timeout, args.graceful_timeout) < 0:
        raise UsageError("--stop-*-timeout and --graceful-timeout must be >= 0")
    if args.keep_finished < 0 or args.log_tail_lines <= 0:
        raise UsageError("--keep-finished must be >= 0 and --log-tail-lines > 0")
    if min(args.first_frame_timeout, args.upload_timeout) <= 0:
        raise UsageError("--first-frame-timeout and --upload-timeout must be > 0")
    if min(args.max_extra_bytes, args.max_extra_entries, args.max_upper_bytes, args.max_concurrent_rpcs) <= 0:
        raise UsageError("--max-extra-bytes, --max-extra-entries, --max-upper-bytes and --max-concurrent-rpcs "
                         "must be > 0")
    if not args.cgroup_parent.startswith("/"):
        raise UsageError(f"--cgroup-parent {args.cgroup_parent!r} must be an absolute cgroup path")
    if os.geteuid() != 0:
        raise UsageError("afsd let must run as root: it runs runc and talks to the node daemon's root-only socket")
    runc = shutil.which(args.runc)
    if runc is None:
        raise MissingToolError(f"runc not found ({args.runc}); install it (Debian package runc) or pass --runc PATH")
    return runc


def _network(text: str, flag: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text)
    except ValueError as error:
        raise UsageError(f"{flag} {text!r}: not an IPv4 network ({error})") from None


def _bind(text: str):
    from afsd.afslet.bundle import BindMount
    parts = text.split(":")
    read_only = len(parts) == 3 and parts[2] == "ro"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not read_only) or not parts[1].startswith("/"):
        raise UsageError(f"--bind {text!r}: expected SRC:DST or SRC:DST:ro with an absolute DST")
    source = Path(parts[0]).absolute()
    if not source.is_dir():
        raise UsageError(f"--bind {text!r}: {source} is not a directory")
    return BindMount(source, parts[1], read_only)


def _id_range(text: str):
    from afsd.afslet.bundle import IdMap
    start, sep, size = text.partition(":")
    if not sep or not start.isdigit() or not size.isdigit() or int(start) <= 0 or int(size) <= 0:
        raise UsageError(f"--userns-range {text!r}: expected START:SIZE, both whole numbers > 0")
    if int(start) + int(size) > 2**32 - 1:
        raise UsageError(f"--userns-range {text!r} goes past the largest uid")
    return IdMap(int(start), int(size))


def _advertised(listen: str, advertise: str | None) -> str:
    if advertise:
        return advertise
    host, _, port = listen.rpartition(":")
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        return f"{socket.gethostname()}:{port}"
    return listen


async def run(args: argparse.Namespace) -> int:
    from afsd.afslet.daemon import DaemonOptions, serve
    from afsd.afslet.executions import ExecutionTable
    from afsd.afslet.network import DEFAULT_DENY, NetworkOptions
    from afsd.afslet.request import RequestBounds, TimeoutPolicy
    from afsd.afslet.runtime import AfsletConfig
    from afsd.afslet.stopping import StopPolicy

    runc_binary = _check(args)
    tls = daemon_tls_from(args)
    config = AfsletConfig(
        work_dir=args.work_dir.absolute(), limit_cpu_cores=args.limit_cpu, limit_memory_mb=args.limit_memory_mb,
        limit_gpus=args.limit_gpus, timeouts=TimeoutPolicy(args.default_timeout_ms, args.max_timeout_ms),
        stop_policy=StopPolicy(args.stop_term_timeout, args.stop_interrupt_timeout, args.stop_kill_timeout),
        node_id=args.node_id, endpoint=_advertised(args.listen, args.advertise),
        network=NetworkOptions(mode=args.network, pool=_network(args.bridge_pool, "--bridge-pool"),
                               subnet=_network(args.bridge_subnet, "--bridge-subnet") if args.bridge_subnet else None,
                               deny=tuple(_network(d, "--bridge-deny") for d in args.bridge_deny) if args.bridge_deny
                               else DEFAULT_DENY),
        id_map=_id_range(args.userns_range) if args.userns else None, net_raw=args.allow_net_raw,
        binds=tuple(_bind(b) for b in args.bind), resolv_conf=args.resolv_conf,
        bounds=RequestBounds(first_frame_timeout=args.first_frame_timeout, upload_timeout=args.upload_timeout,
                             max_extra_bytes=args.max_extra_bytes, max_extra_entries=args.max_extra_entries,
                             max_upper_bytes=args.max_upper_bytes),
        tar_chunk=args.tar_chunk, pids_limit=args.pids_limit, runc_binary=runc_binary,
        runc_root=args.runc_root.absolute() if args.runc_root else None, cgroup_parent=args.cgroup_parent)
    options = DaemonOptions(listen=args.listen, node_socket=args.node_socket, discovery=args.discovery_addr,
                            mount_backend=args.mount_backend, metrics_listen=args.metrics_listen,
                            graceful_timeout=args.graceful_timeout, max_concurrent_rpcs=args.max_concurrent_rpcs,
                            tls=tls, ready_file=args.ready_file)
    executions = ExecutionTable(keep_finished=args.keep_finished, tail_lines=args.log_tail_lines)
    return await serve(config, options, executions)
