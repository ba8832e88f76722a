"""Row 6: cold start of a realistic task through the proxy, against the same task once the node has the image.

The task: `python3 -c 'import json, sqlite3, ssl, email, asyncio'` in a Debian bookworm minbase image with
python3 (debootstrap, cached under ~/.cache/afsd/images; three layers), which only the holder layerstore
holds. Each cold repeat starts a fresh node as an operator runs one for short tasks: its own layerstore
(new, never asked for the image), `afsd node` (background prefetch on, `--layer-linger 60` so that what
it assembles spreads, `--no-learned-prefetch`: this row is the data path alone; learned.py measures what
the cluster's traces add), an afslet and a proxy in front. Each fresh node first runs `/bin/true` in a small
busybox image (not timed), so that its backend supervisor, fetch workers, afslet and proxy are up, as on
a node that has run tasks before; then the task's first Execute through the proxy is the cold one (first
frame to `done`, client side). Once the node's layerstore lists every layer (the node filled
and imported them), two kinds of warm runs of the same task through a proxy:
- warm (baseline), in every repeat right after its cold run: a fresh node daemon, afslet and proxy on the
  same layerstore, `--layer-linger 0`: every Execute mounts the image anew, its bytes coming from the
  node's own layerstore;
- attached (last repeat only): the cold node itself, its layers still attached (lingering) from the cold run.
Ratio = the median over repeats of each cold run ÷ the median of the warm runs measured right after it
(the machine is shared: a baseline taken minutes apart from its cold run saw another load); the spread
is printed.
"""

from __future__ import annotations

import re
import shutil
import statistics
from typing import Any

import grpc

from afsd.api import afslet_pb2_grpc
from afsd.lab.daemons import SHORT_STOP_TIMEOUTS, Daemon, afslet_daemon, proxy_daemon
from afsd.lab.catalogue import busybox_layers
from afsd.lab.debian import debian_layout
from afsd.lab.oci_layout import ImageSpec, write_oci_layout
from afsd.lab.skopeo import push_layout
from bench._execute import ExecuteTiming, execute
from bench.datapath._lab import BenchLab
from bench.datapath._report import Row, Section, paired_ratios, ratio_label, spread

COMMAND = ["python3", "-c", "import json, sqlite3, ssl, email, asyncio"]
LINGER_SECONDS = 60


class TaskNode:
    """A node's afsd node + afslet + proxy on a given layerstore; `run()` executes a command through the proxy."""

    def __init__(self, lab: BenchLab, store: Daemon, linger: float, extra_args: list[str] = ()) -> None:
        self.lab = lab
        self.daemons: list[Daemon] = []
        try:
            node = lab.node("task-node", layerstore=store, prefetch=True,
                            extra_args=["--layer-linger", str(linger), *extra_args])
            self.node = node
            self.daemons.append(node)
            afslet = afslet_daemon(lab.work, lab.fresh_name("task-afslet"), node, [lab.discovery.address],
                                   stop_timeouts=SHORT_STOP_TIMEOUTS)
            self.afslet = afslet
            self.daemons.append(afslet)
            afslet.start(timeout=60)
            proxy = proxy_daemon(lab.work, lab.fresh_name("task-proxy"), afslet.address,
                                 discovery_target=lab.discovery.address)
            self.daemons.append(proxy)
            proxy.start(timeout=60)
        except BaseException:
            self.stop()
            raise
        self.channel = grpc.insecure_channel(proxy.address)
        self.stub = afslet_pb2_grpc.AfsletStub(self.channel)

    def run(self, reference: str, command: list[str] = COMMAND) -> ExecuteTiming:
        return execute(self.stub, reference, command, cpu_cores=1, memory_mb=512, timeout_ms=120_000)

    def warm_up(self, busybox: str) -> None:
        execute(self.stub, busybox, ["/bin/true"], cpu_cores=1, memory_mb=256)

    def stop(self) -> None:
        if hasattr(self, "channel"):
            self.channel.close()
        for daemon in reversed(self.daemons):
            self.lab.stop(daemon)
        self.daemons.clear()


def measure(lab: BenchLab, cold_repeats: int, warm_runs: int) -> Section:
    section = Section("cold start of a realistic task through the proxy")
    cached = debian_layout(include=("python3",))
    reference = push_layout(cached.layout, lab.registry.address, "bench/debian-python3", "v1").reference
    held = lab.hold(reference)
    busybox = push_busybox(lab)
    lab.hold(busybox)
    digests = [layer.spec.layer_digest for layer in held]
    blob_bytes = sum(layer.spec.size for layer in held)
    runs: dict[str, list[ExecuteTiming]] = {"cold": [], "warm": [], "attached": []}
    warm_medians: list[float] = []   # each repeat's warm baseline, measured right after its cold run
    for repeat in range(cold_repeats):
        store = lab.layerstore("task-store")
        try:
            node = TaskNode(lab, store, LINGER_SECONDS, ["--no-learned-prefetch"])
            try:
                node.warm_up(busybox)
                runs["cold"].append(node.run(reference))
                runs["cold"][-1].phases.update(node_phases(node))
                print(f"  cold task: {runs['cold'][-1].milliseconds:,.0f} ms", flush=True)
                lab.wait_listed(digests, store.name, timeout=600)
                if repeat == cold_repeats - 1:
                    runs["attached"] += [node.run(reference) for _ in range(warm_runs)]
            finally:
                node.stop()
            node = TaskNode(lab, store, 0, ["--no-learned-prefetch"])
            try:
                node.warm_up(busybox)
                node.run(reference)    # the first mount from the node's own layerstore: not counted
                warm = [node.run(reference) for _ in range(warm_runs)]
                runs["warm"] += warm
                warm_medians.append(statistics.median(t.milliseconds for t in warm))
                print(f"  warm task: {[round(t.milliseconds) for t in warm]} ms", flush=True)
            finally:
                node.stop()
        finally:
            lab.stop(store)
    milliseconds = {kind: [t.milliseconds for t in timings] for kind, timings in runs.items()}
    median = {kind: statistics.median(values) for kind, values in milliseconds.items()}
    ratios = paired_ratios(milliseconds["cold"], warm_medians)
    details: dict[str, Any] = {"blob_bytes": blob_bytes, "milliseconds": milliseconds, "warm_medians": warm_medians,
                               "ratios": ratios,
                               "phases": {kind: [t.phases for t in timings] for kind, timings in runs.items()}}
    print(f"\n{section.title}: {blob_bytes / (1 << 20):.0f} MiB of erofs blobs; {cold_repeats} repeats of a cold run "
          f"then {warm_runs} warm runs on a fresh node on the same layerstore (ms):")
    for kind, values in milliseconds.items():
        print(f"  {kind:8}  {spread(values)}")
    print(f"  cold ÷ the median of the warm runs right after it, per repeat: {spread(ratios, 3)}")
    for kind, timings in runs.items():
        print(f"  {kind} phases (medians, ms): " + phase_medians([t.phases for t in timings]))
    section.rows.append(Row("cold start, python3 stdlib imports via the proxy", f"{median['cold'] / 1000:.2f} s",
                            f"{median['warm'] / 1000:.2f} s warm (fresh mount, image on the node)",
                            statistics.median(ratios), "≤ 1.5",
                            ratio_label=ratio_label(ratios),
                            details=details))
    section.rows.append(Row("  the same, warm with the layers still attached", f"{median['attached'] / 1000:.2f} s",
                            f"{median['warm'] / 1000:.2f} s warm", median["attached"] / median["warm"], "-"))
    return section


MOUNT_PHASES = re.compile(r"ms by phase: (.*)$", re.MULTILINE)
UNMOUNT_PHASES = re.compile(r"unmount of .*, ms by phase \(summed over layers\): (.*)$", re.MULTILINE)
TEARDOWN_STEPS = re.compile(r"teardown, ms by step: (.*)$", re.MULTILINE)


def node_phases(node: TaskNode) -> dict[str, float]:
    """The node daemon's own timing of its last mount and unmount, and the afslet's of its last teardown
    (from the command's exit), from their log lines: "node.<phase>", "node.unmount.<phase>" and
    "afslet.teardown.<step>" -> ms."""
    phases: dict[str, float] = {}
    for daemon, pattern, prefix in ((node.node, MOUNT_PHASES, "node."), (node.node, UNMOUNT_PHASES, "node.unmount."),
                                    (node.afslet, TEARDOWN_STEPS, "afslet.teardown.")):
        if found := pattern.findall(daemon.log()):
            phases.update((prefix + name, float(ms)) for name, ms in (item.split("=", 1) for item in found[-1].split()))
    return phases


def phase_medians(phases: list[dict[str, float]]) -> str:
    """"name=ms ..." of each phase's median over runs (a run without it counts 0)."""
    names = list(dict.fromkeys(name for p in phases for name in p))
    return " ".join(f"{name}={statistics.median(p.get(name, 0.0) for p in phases):.0f}" for name in names)


def push_busybox(lab: BenchLab) -> str:
    scratch = lab.work / "busybox-scratch"
    scratch.mkdir()
    try:
        layout = write_oci_layout(lab.work / "layout-busybox", "v1", ImageSpec(busybox_layers(scratch)))
        return push_layout(layout, lab.registry.address, "bench/busybox", "v1").reference
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(lab.work / "layout-busybox", ignore_errors=True)
