"""The burst: every node of a `SimCluster` mounts the same never-seen image at the same moment, starts
a task from it, then reads all of it. What a cluster-wide rollout of a new image looks like.

Per node, in seconds from the common start: `mounted` (`afsd mount` returned), `first_byte` (the task's
first file gave its first byte), `task_started` (the task's start command ran to its end in the rootfs,
or its start files were read), `whole_image` (every regular file read to its end). Cluster-wide: the
registry's blob GETs per layer during the burst, bytes served by each node's layerstore over time,
discovery's RPCs by method, and each node's peak memory (RSS and PSS of its processes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from afsd.lab.registry import RegistryProcess
from afsd.lab.scrape import by_label, metric, scrape
from afsd.sim.census import Memory, memory_by_namespace, memory_by_process
from afsd.sim.cluster import DISCOVERY_METRICS_PORT, SimCluster, SimNode

READ_CHUNK = 1 << 20
# A layerstore serves blob bytes over gRPC (ReadLayer) and over its byte-stream listener (sendfile).
SERVED_COUNTERS = ("afsd_layerstore_bytes_served_total", "afsd_layerstore_stream_bytes_served_total")
SAMPLE_PERIOD = 1.0
MEMORY_EVERY = 3  # samples: reading smaps of every process costs CPU


@dataclass(frozen=True)
class ImageTask:
    """What a task reads at start: its first file (time to first byte), then a command run in the
    rootfs with chroot (`start_command`) or, without one, `start_files` read whole."""

    first_file: str
    start_files: tuple[str, ...] = ()
    start_command: tuple[str, ...] = ()


@dataclass
class NodeTimings:
    node: str
    mounted: float = 0.0
    first_byte: float = 0.0
    task_started: float = 0.0
    whole_image: float = 0.0
    bytes_read: int = 0
    files_read: int = 0
    error: str = ""


@dataclass
class BurstResult:
    reference: str
    nodes: list[NodeTimings]
    registry_gets: dict[str, int]                     # layer digest -> successful blob GETs in the burst
    served: list[tuple[float, dict[str, float]]]      # (seconds, node -> bytes its layerstore served to
                                                      #  other nodes so far)
    served_locally: dict[str, float]                  # node -> bytes its layerstore served its own node
    discovery_rpcs: dict[str, float]                  # method -> calls during the burst (all replicas)
    peak_memory: dict[str, Memory]                    # node -> its largest sample
    processes: list[tuple[str, Memory]]               # the first node's processes when its reads ended
    duration: float = 0.0

    @property
    def failures(self) -> list[str]:
        return [f"{n.node}: {n.error}" for n in self.nodes if n.error]


def rootfs_of(node: SimNode, reference: str) -> Path:
    return node.workdir / "rootfs" / _safe(reference)


def _safe(reference: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in reference)


def read_tree(root: Path) -> tuple[int, int]:
    """Read every regular file under `root` to its end (symlinks not followed); (bytes, files)."""
    total = files = 0
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue  # a symlink, socket or fifo
            try:
                if not os.path.isfile(path):
                    continue
                files += 1
                while chunk := os.read(fd, READ_CHUNK):
                    total += len(chunk)
            finally:
                os.close(fd)
    return total, files


def read_file(path: Path) -> int:
    with open(path, "rb", buffering=0) as handle:
        total = 0
        while chunk := handle.read(READ_CHUNK):
            total += len(chunk)
        return total


def run_task(root: Path, task: ImageTask, timings: NodeTimings, t0: float, timeout: float) -> None:
    """In the tree at `root` (ready at `timings.mounted`): the first byte, the task's start, the whole
    tree, each recorded in `timings` as seconds since `t0`. Raises RuntimeError if the task fails."""
    with open(root / task.first_file.lstrip("/"), "rb", buffering=0) as first:
        first.read(1)
    timings.first_byte = time.monotonic() - t0
    if task.start_command:
        ran = subprocess.run(["chroot", str(root), *task.start_command], capture_output=True, text=True,
                             timeout=timeout)
        if ran.returncode != 0:
            raise RuntimeError(f"task start {' '.join(task.start_command)}: exit {ran.returncode} "
                               f"{ran.stderr.strip()[-300:]}")
    for path in task.start_files:
        read_file(root / path.lstrip("/"))
    timings.task_started = time.monotonic() - t0
    timings.bytes_read, timings.files_read = read_tree(root)
    timings.whole_image = time.monotonic() - t0


def _afsd(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "afsd", *args], capture_output=True, text=True, timeout=timeout)


class _Sampler(threading.Thread):
    """Scrapes every node's layerstore (bytes served) and the namespaces' memory while the burst runs."""

    def __init__(self, sim: SimCluster, started: float) -> None:
        super().__init__(name="burst sampler", daemon=True)
        self.sim, self.started = sim, started
        self.served: list[tuple[float, dict[str, float]]] = []
        self.served_locally: dict[str, float] = {}
        self.peak: dict[str, Memory] = {node.name: Memory() for node in sim.nodes}
        self.finished = threading.Event()

    def run(self) -> None:
        round_ = 0
        while True:
            self.sample(memory=round_ % MEMORY_EVERY == 0)
            round_ += 1
            if self.finished.wait(SAMPLE_PERIOD):
                self.sample(memory=True)
                return

    def sample(self, *, memory: bool) -> None:
        at = time.monotonic() - self.started
        counts = {}
        for node in self.sim.nodes:
            try:
                text = scrape(node.layerstore_metrics, timeout=10)
            except OSError:
                counts[node.name] = self.served[-1][1].get(node.name, 0.0) if self.served else 0.0
                continue
            counts[node.name] = sum(metric(text, name, reader="other_host") for name in SERVED_COUNTERS)
            self.served_locally[node.name] = sum(metric(text, name, reader="this_host") for name in SERVED_COUNTERS)
        self.served.append((at, counts))
        if memory:
            by_inode = memory_by_namespace(node.member.inode for node in self.sim.nodes)
            for node in self.sim.nodes:
                sample = by_inode[node.member.inode]
                if sample.pss > self.peak[node.name].pss:
                    self.peak[node.name] = sample


def discovery_rpcs(sim: SimCluster) -> dict[str, float]:
    totals: dict[str, float] = {}
    for daemon in sim.discoveries:
        text = scrape(f"{daemon.host}:{DISCOVERY_METRICS_PORT}")
        for method, count in by_label(text, "afsd_rpc_requests_total", "method").items():
            totals[method.rsplit("/", 1)[-1]] = totals.get(method.rsplit("/", 1)[-1], 0.0) + count
    return totals


def registry_gets(registry: RegistryProcess, digests: Sequence[str]) -> dict[str, int]:
    return {digest: registry.blob_fetches(digest) for digest in digests}


def burst(sim: SimCluster, reference: str, layer_digests: Sequence[str], task: ImageTask) -> BurstResult:
    """Mount `reference` on every node at once and read it (see the module docstring)."""
    assert sim.registry is not None
    gets_before = registry_gets(sim.registry, layer_digests)
    rpcs_before = discovery_rpcs(sim)
    barrier = threading.Barrier(len(sim.nodes) + 1)
    started: list[float] = []

    def one(node: SimNode) -> NodeTimings:
        timings = NodeTimings(node.name)
        root = rootfs_of(node, reference)
        root.mkdir(parents=True, exist_ok=True)
        barrier.wait()
        t0 = started[0]
        try:
            mounted = _afsd("mount", "--socket", str(node.socket_path), reference, str(root),
                            timeout=sim.limits.mount)
            if mounted.returncode != 0:
                raise RuntimeError(f"afsd mount: {mounted.stderr.strip()[-500:]}")
            timings.mounted = time.monotonic() - t0
            run_task(root, task, timings, t0, sim.limits.read)
        except Exception as error:  # one node's failure is a result, not the end of the burst
            timings.error = str(error) or type(error).__name__
        return timings

    with ThreadPoolExecutor(max_workers=len(sim.nodes)) as pool:
        futures = [pool.submit(one, node) for node in sim.nodes]
        started.append(time.monotonic())
        sampler = _Sampler(sim, started[0])
        sampler.start()
        barrier.wait()
        nodes = [future.result() for future in futures]
    duration = time.monotonic() - started[0]
    processes = memory_by_process(sim.nodes[0].member.inode)
    sampler.finished.set()
    sampler.join()
    gets_after = registry_gets(sim.registry, layer_digests)
    rpcs_after = discovery_rpcs(sim)
    return BurstResult(
        reference=reference, nodes=nodes,
        registry_gets={d: gets_after[d] - gets_before[d] for d in layer_digests},
        served=sampler.served, served_locally=sampler.served_locally,
        discovery_rpcs={m: rpcs_after[m] - rpcs_before.get(m, 0.0) for m in rpcs_after
                        if rpcs_after[m] - rpcs_before.get(m, 0.0) > 0},
        peak_memory=sampler.peak, processes=processes, duration=duration)


def unmount_all(sim: SimCluster, reference: str) -> None:
    """`afsd umount` the burst's rootfs on every node (teardown would do it too)."""
    def one(node: SimNode) -> None:
        _afsd("umount", "--socket", str(node.socket_path), str(rootfs_of(node, reference)),
              timeout=sim.limits.command)
    with ThreadPoolExecutor(max_workers=min(16, len(sim.nodes))) as pool:
        list(pool.map(one, sim.nodes))
