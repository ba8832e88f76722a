"""Row 7: cold start of a task on a node that fetches what the cluster learned the task reads first, against
the same task once the node has the image (docs/learned-prefetch.md).

Two tasks, each in its own image that only the holder layerstore holds:
- python3: `python3 -c 'import json, sqlite3, ssl, email, asyncio'` in Debian bookworm + python3 (task.py's);
- numpy: `python3 -c 'import numpy; numpy.linalg.svd(numpy.ones((64, 64)))'` in Debian bookworm + python3-numpy
  (debootstrap, cached under ~/.cache/afsd/images).
Per image, every node runs as task.py's cold node does (a fresh layerstore, `afsd node` with background
prefetch, an afslet and a proxy; `/bin/true` in busybox first, not timed), `--layer-linger 0` so that each
Execute's mount is its own:
1. a teacher node runs the task once: its node daemon records what the task read first and reports it when
   the mount goes; the bench waits until discovery has the trace;
2. then, alternately, `repeats` times each: a learner node (learned prefetch on: its cold Execute fetches the
   trace before the task asks) and a plain node (`--no-learned-prefetch`: the data path alone); every
   learner also reports its run, so later learners get a merge;
3. warm (baseline): a node daemon on the holder itself (the image on the node), a fresh mount per Execute.
Each learner prints its supervisor's line per learned stream (when it started and finished against the layer's
first read, and the reads that waited for it); every measured Execute also gets the CPU its node's processes
and the holder layerstore spent meanwhile (phases cpu.node, cpu.holder).
Ratios: learned cold ÷ warm and plain cold ÷ warm (medians); and of the learner's learned prefetch, bytes
fetched but never read ÷ bytes the task read (both in whole chunks, the unit every fetch is widened to;
from the learner's fanotify counters, over its task's Execute only).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from afsd.api import discovery_pb2 as dpb
from afsd.api import discovery_pb2_grpc as dgrpc
from afsd.lab.daemons import afsd_command
from afsd.lab.debian import debian_layout
from afsd.lab.skopeo import push_layout
from bench._execute import ExecuteTiming
from bench.datapath._lab import BenchLab, CpuMeter, daemon_pid, node_state_dir, pids_whose_command_line_has
from bench.datapath._report import Row, Section
from bench.datapath.task import COMMAND, TaskNode, node_phases, phase_medians, push_busybox


@dataclass(frozen=True)
class Task:
    name: str
    packages: tuple[str, ...]
    command: list[str]


TASKS = (Task("python3", ("python3",), COMMAND),
         Task("numpy", ("python3", "python3-numpy"),
              ["python3", "-c", "import numpy; numpy.linalg.svd(numpy.ones((64, 64)))"]))
LEARNED_COUNTERS = ("learned_bytes_prefetched", "learned_bytes_used", "learned_bytes_read", "events_total",
                    "events_filled_demand", "bytes_filled", "bytes_prefetched", "learned_waits",
                    "learned_wait_ms", "tasks_cancelled")


def measure(lab: BenchLab, repeats: int, warm_runs: int) -> Section:
    section = Section("cold start with what the cluster learned, vs warm")
    busybox = push_busybox(lab)
    lab.hold(busybox)
    for task in TASKS:
        _measure_task(lab, section, task, busybox, repeats, warm_runs)
    return section


def _measure_task(lab: BenchLab, section: Section, task: Task, busybox: str, repeats: int, warm_runs: int) -> None:
    cached = debian_layout(include=task.packages)
    reference = push_layout(cached.layout, lab.registry.address, f"bench/learned-{task.name}", "v1").reference
    held = lab.hold(reference)
    blob_bytes = sum(layer.spec.size for layer in held)
    runs: dict[str, list[ExecuteTiming]] = {"teacher": [], "learned": [], "plain": [], "warm": []}
    counters: list[dict[str, float]] = []
    runs["teacher"].append(_cold(lab, reference, busybox, task, [])[0])
    # The layer the task reads (the largest): a small layer's trace can arrive first, and the teacher's
    # reports race its node's stop (noticed: learners then got a 1 MiB trace of a 258 MiB image).
    _wait_for_traces(lab, [max(held, key=lambda layer: layer.spec.size).spec.blob_digest])
    for _ in range(repeats):
        timing, delta = _cold(lab, reference, busybox, task, [])
        runs["learned"].append(timing)
        counters.append(delta)
        runs["plain"].append(_cold(lab, reference, busybox, task, ["--no-learned-prefetch"])[0])
        print(f"  {task.name}: learned {runs['learned'][-1].milliseconds:,.0f} ms, plain "
              f"{runs['plain'][-1].milliseconds:,.0f} ms", flush=True)
    warm = TaskNode(lab, lab.holder, 0, ["--no-learned-prefetch"])
    try:
        warm.warm_up(busybox)
        warm.run(reference, task.command)   # the first mount of the image on this node: not counted
        for _ in range(warm_runs):
            runs["warm"].append(_metered_run(lab, warm, reference, task.command))
            runs["warm"][-1].phases.update(node_phases(warm))
    finally:
        warm.stop()
    milliseconds = {kind: [t.milliseconds for t in timings] for kind, timings in runs.items()}
    median = {kind: statistics.median(values) for kind, values in milliseconds.items()}
    fetched = sum(c["learned_bytes_prefetched"] for c in counters)
    used = sum(c["learned_bytes_used"] for c in counters)
    read = sum(c["learned_bytes_read"] for c in counters)
    wasted = (fetched - used) / read if read else float("nan")
    details: dict[str, Any] = {"blob_bytes": blob_bytes, "milliseconds": milliseconds, "learner_counters": counters,
                               "phases": {kind: [t.phases for t in timings] for kind, timings in runs.items()}}
    print(f"\n{task.name}: {blob_bytes / (1 << 20):.0f} MiB of erofs blobs; "
          + "; ".join(f"{kind} {[round(m) for m in values]} ms" for kind, values in milliseconds.items())
          + f"; learned {fetched / 2**20:.1f} MiB fetched, {used / 2**20:.1f} MiB of it read, the tasks read "
            f"{read / 2**20:.1f} MiB")
    for kind in ("learned", "plain", "warm"):
        print(f"  {kind} phases (medians, ms): " + phase_medians([t.phases for t in runs[kind]]))
    section.rows.append(Row(f"{task.name} cold start, learned trace, via the proxy", f"{median['learned'] / 1000:.2f} s",
                            f"{median['warm'] / 1000:.2f} s warm (image on the node)", median["learned"] / median["warm"],
                            "≤ 1.2", details=details))
    section.rows.append(Row(f"  the same with --no-learned-prefetch", f"{median['plain'] / 1000:.2f} s",
                            f"{median['warm'] / 1000:.2f} s warm", median["plain"] / median["warm"], "-"))
    section.rows.append(Row(f"  learned bytes fetched but never read ÷ bytes read", f"{(fetched - used) / 2**20:.1f} MiB",
                            f"{read / 2**20:.1f} MiB read", wasted, "≤ 0.2", ratio_label="wasted"))


def _cold(lab: BenchLab, reference: str, busybox: str, task: Task, extra_args: list[str]) -> tuple[ExecuteTiming, dict[str, float]]:
    """One cold Execute of the task on a fresh node; and what its fanotify counters moved by during it."""
    store = lab.layerstore("learned-store")
    try:
        node = TaskNode(lab, store, 0, extra_args)
        try:
            node.warm_up(busybox)
            before = _counters(node)
            timing = _metered_run(lab, node, reference, task.command)
            after = _counters(node)
            timing.phases.update(node_phases(node))
            for line in _learned_log_lines(node):
                print(f"    {line}", flush=True)
        finally:
            node.stop()
    finally:
        lab.stop(store)
    return timing, {name: after[name] - before[name] for name in LEARNED_COUNTERS}


def _metered_run(lab: BenchLab, node: TaskNode, reference: str, command: list[str]) -> ExecuteTiming:
    """`node.run`, with the CPU its node's processes (daemon, supervisor, fetch workers) and the holder layerstore
    spent meanwhile as phases "cpu.node" (of which "cpu.node.workers": its fetch workers) and "cpu.holder" (ms): what
    a cold start costs the cores the task runs on."""
    state = node_state_dir(node.node)
    workers = pids_whose_command_line_has("fanotify.worker")   # (a worker's command line names its supervisor's socket)
    meters = {"cpu.node": CpuMeter(lambda: pids_whose_command_line_has(state)),
              "cpu.node.workers": CpuMeter(lambda: [pid for pid in pids_whose_command_line_has(state)
                                                    if pid in workers]),
              "cpu.holder": CpuMeter(lambda: [daemon_pid(lab.holder)])}
    for meter in meters.values():
        meter.start()
    timing = node.run(reference, command)
    timing.phases.update((name, meter.stop() * 1000) for name, meter in meters.items())
    return timing


def _counters(node: TaskNode) -> dict[str, float]:
    """The node's fanotify counters now (`afsd mounts --json` asks the supervisor)."""
    listed = afsd_command("mounts", "--socket", str(node.node.socket_path), "--json", timeout=120)
    if listed.returncode != 0:
        raise RuntimeError(f"afsd mounts failed: {listed.stderr.strip()}")
    counters = json.loads(listed.stdout).get("counters", {})
    return {name: float(counters.get(f"fanotify.{name}", 0.0)) for name in LEARNED_COUNTERS}


def _learned_log_lines(node: TaskNode) -> list[str]:
    """What the node's fanotify supervisor said of each layer's learned stream against its readers."""
    state = Path(node.node.args[node.node.args.index("--state-dir") + 1])
    said = ("learned prefetch of", "filling the rest", "unregistered blob")
    return [f"{line[11:23]} {line.split(' INFO ', 1)[-1]}" for log in sorted(state.rglob("supervisor.log"))
            for line in log.read_text(errors="replace").splitlines() if any(text in line for text in said)]


def _wait_for_traces(lab: BenchLab, blobs: list[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(lab.discovery.address) as channel:
        stub = dgrpc.ServiceDiscoveryStub(channel)
        while not any(t.ranges for t in stub.GetAccessTraces(dpb.GetAccessTracesRequest(blob_digests=blobs),
                                                             timeout=30).traces):
            if time.monotonic() > deadline:
                raise RuntimeError("the teacher node's trace never reached discovery")
            time.sleep(0.5)
