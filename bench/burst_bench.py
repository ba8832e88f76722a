"""The burst benchmark: M simulated nodes (afsd/sim) mount one never-seen image at once, start a task
from it and read all of it; then, on the same network, every node pulls the image from the registry
itself and unpacks it (the `docker pull` baseline). Ratios afsd ÷ baseline, from the same run.

Usage: `.venv/bin/python -m bench.burst_bench --nodes 8 [--nodes 16 ...] [--json PATH]` (root). The
image is Debian + Python + an application (afsd/lab/python_image.py, ~250 MB unpacked, built once).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import exit_on_sigterm, load_average, machine_facts, percentile, write_json

from afsd.lab.python_image import FIRST_FILE, START_COMMAND, python_image_layout
from afsd.lab.skopeo import push_layout
from afsd.sim.baseline import BlobToPull, registry_pull_burst
from afsd.sim.burst import ImageTask, NodeTimings, burst, unmount_all
from afsd.sim.census import memory_by_namespace
from afsd.net.namespaces import run_in
from afsd.sim.cluster import LAYERSTORE_PORT, SMALL_MALLOC, SimCluster, SimSettings

GIB = 1 << 30
HEADROOM = 6 * GIB            # what the host keeps free for the others sharing it
NODE_ESTIMATE = 240 << 20     # a node's peak PSS during a burst (measured ~200 MiB with the sim's malloc settings)
TASK = ImageTask(first_file=FIRST_FILE, start_command=START_COMMAND)


def portable_command(command: str, workdir: Path) -> str:
    """A process's command line as the committed report may show it: this interpreter as `python` and the
    run's directory as `$WORKDIR`, so results read the same on any machine."""
    return command.replace(sys.executable, "python").replace(str(workdir), "$WORKDIR")


def available_memory() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def largest_fitting() -> int:
    """The most nodes the host's available memory holds now, keeping HEADROOM free."""
    return max(0, (available_memory() - HEADROOM) // NODE_ESTIMATE)


def fits(nodes: int) -> tuple[bool, str]:
    free = available_memory()
    need = nodes * NODE_ESTIMATE + HEADROOM
    return free >= need, f"{free / GIB:.1f} GiB available, {need / GIB:.1f} GiB wanted ({nodes} nodes + headroom)"


def summary(timings: list[NodeTimings]) -> dict[str, Any]:
    ok = [t for t in timings if not t.error]
    out: dict[str, Any] = {"nodes": len(timings), "failed": [f"{t.node}: {t.error}" for t in timings if t.error]}
    for phase in ("mounted", "first_byte", "task_started", "whole_image"):
        values = [getattr(t, phase) for t in ok]
        if values:
            out[phase] = {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99), "max": max(values)}
    return out


def round_trip_ms(sim: SimCluster, samples: int = 20) -> float:
    """Median TCP connect time from node0's namespace to node1's layerstore: the simulated link's round
    trip (a SYN and its answer), veth's own latency, since nothing here can add more."""
    if len(sim.nodes) < 2:
        return 0.0
    target = (str(sim.nodes[1].member.address), LAYERSTORE_PORT)

    def connects() -> list[float]:
        times = []
        for _ in range(samples):
            began = time.perf_counter()
            with socket.create_connection(target, timeout=10):
                times.append(time.perf_counter() - began)
        return times
    return 1000 * percentile(run_in(sim.nodes[0].member.namespace, connects), 0.5)


def run_one(nodes: int, workdir: Path, *, rate_bits: int | None, baseline: bool = True, fetch_workers: int = 1,
            env: tuple[tuple[str, str], ...] = SMALL_MALLOC) -> dict[str, Any]:
    """One cluster of `nodes`: start, burst, baseline, teardown."""
    ok, why = fits(nodes)
    result: dict[str, Any] = {"nodes": nodes, "memory_check": why, "load_before": load_average()}
    if not ok:
        result["skipped"] = f"not enough memory: {why}"
        return result
    image = python_image_layout()
    layers = image.layout.manifests[0].layers
    sim = SimCluster(workdir / f"sim-{nodes}", SimSettings(nodes=nodes, rate_bits=rate_bits,
                                                           fetch_workers=fetch_workers, env=env))
    started = time.monotonic()
    try:
        sim.start()
        result["start_seconds"] = time.monotonic() - started
        idle = memory_by_namespace(n.member.inode for n in sim.nodes)
        result["idle_memory"] = {n.name: dataclasses.asdict(idle[n.member.inode]) for n in sim.nodes}
        assert sim.registry is not None
        pushed = push_layout(image.layout, sim.registry.address, "bench/python", "v1")
        outcome = burst(sim, pushed.reference, [layer.digest for layer in layers], TASK)
        result["afsd"] = {"timings": [dataclasses.asdict(t) for t in outcome.nodes],
                          "summary": summary(outcome.nodes), "registry_gets": outcome.registry_gets,
                          "served": outcome.served, "served_locally": outcome.served_locally,
                          "discovery_rpcs": outcome.discovery_rpcs, "duration": outcome.duration,
                          "peak_memory": {k: dataclasses.asdict(v) for k, v in outcome.peak_memory.items()},
                          "first_node_processes": [(portable_command(command, sim.workdir), dataclasses.asdict(memory))
                                                   for command, memory in outcome.processes]}
        result["rtt_ms"] = round_trip_ms(sim)
        unmount_all(sim, pushed.reference)
        if baseline:
            blobs = [BlobToPull(layer.digest, layer.compression) for layer in layers]
            timings = registry_pull_burst(sim, pushed.repository, blobs, TASK)
            result["baseline"] = {"timings": [dataclasses.asdict(t) for t in timings], "summary": summary(timings)}
        result["image"] = {"reference": pushed.reference, "layers": [dataclasses.asdict(layer) for layer in layers],
                           "compressed_bytes": sum(layer.size for layer in layers)}
    finally:
        result["killed_at_teardown"] = sim.stop()
        result["leftovers"] = sim.leftovers()
        if not result["leftovers"]:
            sim.remove_workdir()
    result["load_after"] = load_average()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, action="append", help="cluster sizes (repeatable; default 8)")
    parser.add_argument("--rate-mbit", type=float, default=1000.0, help="each node's link, Mbit/s each way")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    exit_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="afsd-burst-"))
    try:
        results = [run_one(n, workdir, rate_bits=int(args.rate_mbit * 1e6) or None, baseline=not args.no_baseline)
                   for n in args.nodes or [8]]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for result in results:
        print(f"M={result['nodes']}: " + (result.get("skipped") or
              f"afsd {result['afsd']['summary']}  baseline {result.get('baseline', {}).get('summary')}  "
              f"registry GETs {result['afsd']['registry_gets']}"))
    write_json(args.json, {"machine": machine_facts(), "pid": os.getpid(), "bursts": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
