"""`SimCluster`: a registry, discovery replicas and M nodes, each in a network namespace of its own,
started, health-waited and torn down — also after Ctrl-C, SIGTERM or a failed start.

A node is what a real node runs to mount images: its layerstore (`afsd layerstore`) and its node
daemon (`afsd node`, which starts the fanotify supervisor, its keeper and fetch workers at the first
mount), every one a real process in the node's namespace, with the node's own address and fixed ports
(each namespace has its own port space). Control sockets and mounts stay in the host's mount namespace
(`nsenter --net` only), so the host can mount through a node and look at its rootfs.

Teardown is ordered (unmount through each node daemon, stop it and its supervisors, stop layerstores,
discovery, registry), then swept: any process still in one of the namespaces is killed, mounts under
the work directory are detached, namespaces and the bridge removed. `leftovers()` lists what remains
(processes, mounts, namespaces, interfaces, cgroups): empty after `stop()`.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from afsd.erofs.mount import unmount
from afsd.lab.daemons import Daemon, start_all, stop_node_daemon
from afsd.lab.deadlines import SimDeadlines, sim_deadlines
from afsd.lab.registry import RegistryProcess, start_registry
from afsd.node.records import mounted_paths
from afsd.sim.census import command_line, kill_everything_in, processes_in
from afsd.sim.network import Member, SimNetwork, TokenInUseError

log = logging.getLogger(__name__)

REGISTRY_PORT = 5000
DISCOVERY_PORT = 60051
LAYERSTORE_PORT = 50051
DISCOVERY_METRICS_PORT = 9100
LAYERSTORE_METRICS_PORT = 9101
NODE_METRICS_PORT = 9102


# glibc's allocator keeps up to 8 arenas per core and every freed buffer under 32 MiB: gRPC's threads and
# the 1 MiB chunks a node moves left each node ~400 MiB PSS after a burst. Two arenas and large buffers
# mapped (returned at free) halved that in one measurement (docs/bench/report.md, "Memory").
SMALL_MALLOC = (("MALLOC_ARENA_MAX", "2"), ("MALLOC_MMAP_THRESHOLD_", "131072"))


@dataclass(frozen=True)
class SimSettings:
    nodes: int = 8
    discovery_replicas: int = 1
    rate_bits: int | None = 1_000_000_000    # each member's link, each way (None: unshaped)
    heartbeat_period: float = 2.0
    fetch_workers: int = 1                   # fanotify fetch workers per node (the default 2 costs ~60 MB more)
    discovery_ttl: float = 60.0
    env: tuple[tuple[str, str], ...] = SMALL_MALLOC  # extra environment of every daemon (and what it starts)


@dataclass
class SimNode:
    member: Member
    layerstore: Daemon
    daemon: Daemon
    workdir: Path

    @property
    def name(self) -> str:
        return self.member.name

    @property
    def socket_path(self) -> Path:
        assert self.daemon.socket_path is not None
        return self.daemon.socket_path

    @property
    def layerstore_metrics(self) -> str:
        return self.member.endpoint(LAYERSTORE_METRICS_PORT)


@dataclass
class SimCluster:
    """Use as a context manager (`with SimCluster(...) as sim:`), or `start()` and `stop()`."""

    workdir: Path
    settings: SimSettings = SimSettings()
    limits: SimDeadlines = field(default_factory=sim_deadlines)
    token: str = field(default_factory=lambda: secrets.token_hex(3))
    network: SimNetwork = field(init=False)
    registry: RegistryProcess | None = None
    discoveries: list[Daemon] = field(default_factory=list)
    nodes: list[SimNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = self.workdir.absolute()
        self.network = SimNetwork(self.token, self.settings.rate_bits)

    # == start =================================================================================

    def start(self) -> SimCluster:
        """Start everything; on any failure (or Ctrl-C) tear down what was started, then re-raise."""
        try:
            self._start()
        except BaseException:
            log.warning("simulated cluster %s failed to start: tearing down", self.token)
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self.settings.nodes < 1:
            raise ValueError("a simulated cluster needs at least one node")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            try:
                self.network.up()
                break
            except TokenInUseError:  # another simulation drew the same token: draw again
                if attempt == 2:
                    raise
                self.token = secrets.token_hex(3)
                self.network = SimNetwork(self.token, self.settings.rate_bits)
        registry_member = self.network.add("registry")
        self.registry = start_registry(self.workdir / "registry", host=str(registry_member.address),
                                       port=REGISTRY_PORT, prefix=registry_member.enter(),
                                       startup_timeout=self.limits.daemon_start)
        self.discoveries = [self._discovery(self.network.add(f"discovery{i}"))
                            for i in range(self.settings.discovery_replicas)]
        start_all(self.discoveries, self.limits.daemon_start)
        self.nodes = [self._node(self.network.add(f"node{i}")) for i in range(self.settings.nodes)]
        start_all([node.layerstore for node in self.nodes] + [node.daemon for node in self.nodes],
                  self.limits.daemon_start)

    @property
    def registry_args(self) -> list[str]:
        assert self.registry is not None
        return ["--insecure-registry", self.registry.address]

    @property
    def discovery_endpoints(self) -> list[str]:
        return [daemon.address for daemon in self.discoveries]

    def _discovery(self, member: Member) -> Daemon:
        args = ["discovery", "--listen", member.endpoint(DISCOVERY_PORT), "--ttl", f"{self.settings.discovery_ttl:g}",
                "--metrics-listen", member.endpoint(DISCOVERY_METRICS_PORT), *self.registry_args]
        return Daemon(member.name, args, str(member.address), DISCOVERY_PORT, self.workdir / f"{member.name}.log",
                      prefix=member.enter())

    def _node(self, member: Member) -> SimNode:
        home = self.workdir / member.name
        home.mkdir(parents=True, exist_ok=True)
        admin_socket = home / "layerstore.sock"
        discovery = [arg for endpoint in self.discovery_endpoints for arg in ("--discovery-endpoint", endpoint)]
        layerstore = Daemon(f"{member.name}-layerstore", [
            "layerstore", "--listen", member.endpoint(LAYERSTORE_PORT), "--node-id", member.name,
            "--cache-dir", str(home / "cache"), "--admin-socket", str(admin_socket),
            "--heartbeat-period", f"{self.settings.heartbeat_period:g}",
            "--metrics-listen", member.endpoint(LAYERSTORE_METRICS_PORT), *discovery, *self.registry_args,
        ], str(member.address), LAYERSTORE_PORT, self.workdir / f"{member.name}-layerstore.log", prefix=member.enter(),
            env=dict(self.settings.env))
        socket_path = home / "node.sock"
        daemon = Daemon(f"{member.name}-node", [
            "node", "--socket", str(socket_path), "--state-dir", str(home / "state"), "--node-id", member.name,
            "--layerstore", member.endpoint(LAYERSTORE_PORT), "--layerstore-admin-socket", str(admin_socket),
            "--backend", "fanotify", "--fetch-workers", str(self.settings.fetch_workers),
            "--metrics-listen", member.endpoint(NODE_METRICS_PORT), *discovery,
        ], str(member.address), 0, self.workdir / f"{member.name}-node.log", prefix=member.enter(),
            socket_path=socket_path, env=dict(self.settings.env))
        return SimNode(member, layerstore, daemon, home)

    # == stop ==================================================================================

    @property
    def namespace_inodes(self) -> list[int]:
        return [member.inode for member in self.network.members.values()]

    def stop(self) -> list[str]:
        """Stop everything and sweep; return the processes the sweep had to kill (empty when every
        daemon stopped as asked). Safe to call twice, and on a half-started cluster. A step that fails
        is logged and the next ones still run: `leftovers()` says what it left."""
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(self._stop_node_daemon, [n for n in self.nodes if n.daemon.process is not None]))
            list(pool.map(self._stop, [n.layerstore for n in self.nodes] + self.discoveries))
        if self.registry is not None:
            self._step("stopping the registry", self.registry.stop)
        killed: list[str] = []
        self._step("ending stray processes", lambda: killed.extend(
            kill_everything_in(self.namespace_inodes, self.limits.stop)))
        for line in killed:
            log.warning("simulated cluster %s: killed a leftover process %s", self.token, line)
        self._step("unmounting", self._unmount_everything)
        self._step("removing the network", self.network.down)
        return killed

    def _step(self, what: str, work: Callable[[], object]) -> None:
        try:
            work()
        except Exception as error:
            log.warning("simulated cluster %s: %s failed: %s", self.token, what, error)

    def _stop_node_daemon(self, node: SimNode) -> None:
        try:
            stop_node_daemon(node.daemon)
        except Exception as error:  # the sweep after it still ends what is left
            log.warning("stopping %s: %s", node.daemon.name, error)

    def _stop(self, daemon: Daemon) -> None:
        self._step(f"stopping {daemon.name}", lambda: daemon.stop(timeout=self.limits.stop))

    def _unmount_everything(self) -> None:
        root = str(self.workdir) + "/"
        for point in sorted((p for p in mounted_paths() if p.startswith(root)), key=len, reverse=True):
            unmount(Path(point), detach=True)

    def leftovers(self) -> list[str]:
        """Everything of this simulation still on the host: processes (in its namespaces, or naming its
        work directory), mounts under the work directory, namespaces, interfaces and cgroups."""
        found = [f"process {pid} {command_line(pid)[:160]}" for pid in processes_in(self.namespace_inodes)]
        found += [f"process {pid} {command_line(pid)[:160]}" for pid in _processes_naming(self.workdir)]
        found += [f"mount {point}" for point in mounted_paths() if point.startswith(str(self.workdir) + "/")]
        found += self.network.leftovers()
        found += [f"cgroup {path}" for path in _cgroups_naming(self.token)]
        return sorted(set(found))

    def remove_workdir(self) -> None:
        """Delete the work directory (after `stop()`; refuses while something is mounted in it)."""
        if any(point.startswith(str(self.workdir) + "/") for point in mounted_paths()):
            raise RuntimeError(f"not removing {self.workdir}: something is still mounted in it")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> SimCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _processes_naming(path: Path) -> list[int]:
    """Processes whose command line names `path`, except this one and its ancestors (which may have
    been started with the work directory as an argument)."""
    needle, mine = str(path), _ancestors(os.getpid())
    return [int(pid) for pid in os.listdir("/proc")
            if pid.isdigit() and int(pid) not in mine and needle in command_line(int(pid))]


def _ancestors(pid: int) -> set[int]:
    found = {pid}
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                pid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        found.add(pid)
    return found


def _cgroups_naming(token: str) -> list[str]:
    found = []
    for hierarchy in Path("/sys/fs/cgroup").iterdir() if Path("/sys/fs/cgroup").is_dir() else []:
        if hierarchy.is_dir():
            found += [str(p) for p in hierarchy.glob(f"*{token}*")]
    return found
