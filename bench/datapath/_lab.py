"""The cluster the data-path rows share: a registry, discovery and one *holder* layerstore (the peer
that holds every image), plus fresh node daemons on demand; and CPU accounting of processes.

Every daemon is a real `afsd` process on loopback (afsd/lab/daemons.py); `close()` stops them all,
the node daemons with their backend supervisors.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from afsd.api import discovery_pb2 as dpb
from afsd.api import discovery_pb2_grpc as dgrpc
from afsd.api import layerstore_pb2 as lpb
from afsd.api import layerstore_pb2_grpc as lgrpc
from afsd.cluster.peers import blob_spec_from_stat
from afsd.lab.daemons import (Daemon, afsd_command, discovery_daemon, layerstore_daemon, metrics_address,
                              node_daemon, start_all, stop_daemon)
from afsd.lab.registry import RegistryProcess, start_registry
from afsd.ondemand.spec import BlobSpec
from bench._common import push_files_image
from tests.support.cluster import unmount_everything_under

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Counters of blob bytes a layerstore sent to readers (ReadLayer, and the byte stream where it exists).
SERVED_COUNTERS = ("afsd_layerstore_bytes_served_total", "afsd_layerstore_stream_bytes_served_total")


@dataclass(frozen=True)
class HeldLayer:
    """A layer the holder has: its blob as published (the spec) and the blob file on the holder."""

    reference: str
    spec: BlobSpec
    path: Path


@dataclass
class BenchLab:
    work: Path
    registry: RegistryProcess
    discovery: Daemon
    holder: Daemon
    daemons: list[Daemon] = field(default_factory=list)
    counter: int = 0

    @classmethod
    def start(cls, work: Path) -> BenchLab:
        registry = start_registry(work / "registry")
        try:
            registry_args = ["--insecure-registry", registry.address]
            discovery = discovery_daemon(work, "discovery", registry_args=registry_args)
            holder = layerstore_daemon(work, "holder", [discovery.address], heartbeat_period=1.0,
                                       registry_args=registry_args)
            lab = cls(work, registry, discovery, holder, [discovery, holder])
            start_all([discovery, holder])
        except BaseException:
            registry.stop()
            raise
        return lab

    @property
    def registry_args(self) -> list[str]:
        return ["--insecure-registry", self.registry.address]

    def fresh_name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def push(self, name: str, files: dict[str, Path]) -> str:
        reference, _ = push_files_image(self.registry.address, self.work, name, files)
        return reference

    def hold(self, reference: str) -> list[HeldLayer]:
        """The holder pulls `reference`; returns its layers once discovery lists the holder for each."""
        with grpc.insecure_channel(self.holder.address) as channel:
            stub = lgrpc.LayerStoreStub(channel)
            layers = stub.PullImage(lpb.PullImageRequest(image=reference), timeout=1800).layers
            held = [HeldLayer(reference, blob_spec_from_stat(stub.StatLayer(lpb.StatLayerRequest(digest=l.digest))),
                              Path(l.cache_path)) for l in layers]
        self.wait_listed([layer.spec.layer_digest for layer in held], self.holder.name)
        return held

    def wait_listed(self, digests: list[str], node_id: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.discovery.address) as channel:
            stub = dgrpc.ServiceDiscoveryStub(channel)
            while not all(any(s.node_id == node_id for s in stub.FindProvider(
                    dpb.FindProviderRequest(layer_digest=d), timeout=30).services) for d in digests):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"discovery does not list {node_id} as holding {digests}")
                time.sleep(0.2)

    def node(self, prefix: str, *, layerstore: Daemon | None = None, prefetch: bool = False,
             extra_args: list[str] = ()) -> Daemon:
        """A fresh `afsd node` (new state directory), started; no background prefetch unless asked."""
        node = node_daemon(self.work, self.fresh_name(prefix), [self.discovery.address], layerstore=layerstore,
                           extra_args=[*([] if prefetch else ["--no-prefetch"]), *extra_args])
        self.daemons.append(node)
        node.start(timeout=60)
        return node

    def layerstore(self, prefix: str) -> Daemon:
        store = layerstore_daemon(self.work, self.fresh_name(prefix), [self.discovery.address],
                                  heartbeat_period=1.0, registry_args=self.registry_args)
        self.daemons.append(store)
        store.start(timeout=60)
        return store

    def mount(self, node: Daemon, reference: str, target: Path, backend: str = "fanotify") -> None:
        target.mkdir(parents=True, exist_ok=True)
        result = afsd_command("mount", "--socket", str(node.socket_path), "--backend", backend, reference,
                              str(target), timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"afsd mount {reference} failed: {result.stderr.strip()}")

    def stop(self, daemon: Daemon) -> None:
        stop_daemon(daemon)
        if daemon in self.daemons:
            self.daemons.remove(daemon)

    def close(self) -> None:
        for daemon in reversed(self.daemons):
            try:
                stop_daemon(daemon)
            except Exception as error:  # noqa: BLE001 - keep cleaning up
                print(f"clean-up of {daemon.name} failed: {error}", flush=True)
        self.daemons.clear()
        self.registry.stop()
        unmount_everything_under(self.work)


def remove_work(work: Path) -> None:
    unmount_everything_under(work)
    shutil.rmtree(work, ignore_errors=True)


# -- CPU accounting ----------------------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and of its children it has waited for; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    # fields[0] is the state (field 3 of stat): utime, stime, cutime, cstime are fields 14-17.
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


def pids_whose_command_line_has(text: str) -> list[int]:
    """Processes whose command line contains `text` (e.g. a node's state directory: the node daemon, its
    backend supervisors, keepers and fetch workers all name it)."""
    found = []
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


class CpuMeter:
    """CPU seconds a set of processes spent between `start()` and `stop()` (processes found at both ends)."""

    def __init__(self, find_pids) -> None:  # find_pids: () -> list[int]
        self._find = find_pids
        self._before: dict[int, float] = {}
        self.seconds = 0.0

    def start(self) -> None:
        self._before = {pid: process_cpu_seconds(pid) for pid in self._find()}

    def stop(self) -> float:
        after = {pid: process_cpu_seconds(pid) for pid in set(self._find()) | set(self._before)}
        self.seconds = sum(max(0.0, after[pid] - self._before.get(pid, 0.0)) for pid in after)
        return self.seconds


def daemon_pid(daemon: Daemon) -> int:
    assert daemon.process is not None
    return daemon.process.pid


def node_state_dir(node: Daemon) -> str:
    return node.args[node.args.index("--state-dir") + 1]


def bytes_served(layerstore: Daemon) -> float:
    """Blob bytes `layerstore` has sent to readers so far, from its /metrics."""
    address = metrics_address(layerstore)
    assert address is not None, "the layerstore runs without --metrics-listen"
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        text = response.read().decode()
    total = 0.0
    for name in SERVED_COUNTERS:
        for match in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE):
            total += float(match[1])
    return total


def wait_idle(find_pids, *, quiet: float = 0.02, period: float = 0.5, timeout: float = 15.0) -> float:
    """Wait until the processes `find_pids()` returns spend less than `quiet` CPU seconds in `period` (a node
    still busy with a mount); returns the CPU seconds they spent meanwhile."""
    meter = CpuMeter(find_pids)
    spent = 0.0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meter.start()
        time.sleep(period)
        busy = meter.stop()
        spent += busy
        if busy < quiet:
            break
    return spent
