"""`afsd sim`: a simulated cluster on this host (afsd/sim), up until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import tempfile
import threading
from pathlib import Path
from types import FrameType

from afsd.errors import UsageError

log = logging.getLogger(__name__)


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived: tear down, then exit 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sim", help="run a simulated cluster of network-namespace nodes on this host",
        description="Start a registry, discovery and N nodes (layerstore + node daemon each), every one in a "
                    "network namespace of its own on one bridge, each link rate-limited. Prints where "
                    "everything listens, then waits; Ctrl-C or SIGTERM tears all of it down (processes, "
                    "mounts, namespaces, interfaces). Needs root.")
    parser.add_argument("--nodes", type=int, default=8, help="simulated nodes (default %(default)s)")
    parser.add_argument("--discovery-replicas", type=int, default=1, help="discovery replicas (default %(default)s)")
    parser.add_argument("--rate-mbit", type=float, default=1000.0,
                        help="each member's link in Mbit/s, each way; 0: unshaped (default %(default)g)")
    parser.add_argument("--fetch-workers", type=int, default=1,
                        help="fanotify fetch workers per node (default %(default)s)")
    parser.add_argument("--workdir", type=Path, help="state and logs (default: a temporary directory, removed)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from afsd.sim.cluster import SimCluster, SimSettings

    if args.nodes < 1 or args.discovery_replicas < 1 or args.fetch_workers < 1:
        raise UsageError("--nodes, --discovery-replicas and --fetch-workers must be at least 1")
    if args.rate_mbit < 0:
        raise UsageError(f"--rate-mbit {args.rate_mbit:g}: give 0 (unshaped) or more")
    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        for each in (signal.SIGINT, signal.SIGTERM):
            signal.signal(each, signal.SIG_IGN)  # a second signal must not cut the teardown short
        stopped.set()
        raise Stopped(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="afsd-sim-"))
    settings = SimSettings(nodes=args.nodes, discovery_replicas=args.discovery_replicas,
                           rate_bits=int(args.rate_mbit * 1e6) or None, fetch_workers=args.fetch_workers)
    sim = SimCluster(workdir, settings)
    try:
        sim.start()
        _describe(sim)
        print(f"ready: simulated cluster token {sim.token} with {args.nodes} nodes in {workdir}; "
              "Ctrl-C or SIGTERM tears it down", flush=True)
        while not stopped.wait(3600):
            pass
        return 0
    except Stopped as stop:
        return 128 + stop.signum
    finally:
        killed = sim.stop()
        leftovers = sim.leftovers()
        for line in leftovers:
            print(f"afsd sim: left behind: {line}", flush=True)
        if args.workdir is None and not leftovers:
            sim.remove_workdir()
        print(f"afsd sim: torn down ({len(killed)} stray processes killed)", flush=True)


def _describe(sim) -> None:
    assert sim.registry is not None
    print(f"registry    {sim.registry.address}", flush=True)
    for daemon in sim.discoveries:
        print(f"{daemon.name:<11} {daemon.address}", flush=True)
    for node in sim.nodes:
        print(f"{node.name:<11} layerstore {node.layerstore.address}  node socket {node.socket_path}  "
              f"netns {node.member.namespace.name}", flush=True)
