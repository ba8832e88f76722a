"""What every Execute call of one afslet shares: its configuration, the admission ledger, runc, the
node daemon and discovery clients, the subreaper, the executions (for execution management), and the
calls in flight (so shutdown can wait for them)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from afsd.afslet.admission import Admission
from afsd.afslet.bundle import BindMount, IdMap, Isolation
from afsd.afslet.executions import ExecutionTable
from afsd.afslet.metrics import RUNNING
from afsd.afslet.network import ContainerNetwork, NetworkOptions
from afsd.afslet.node_mounts import NodeMounts
from afsd.afslet.reaper import Subreaper
from afsd.afslet.request import RequestBounds, TimeoutPolicy
from afsd.afslet.runc import Runc
from afsd.afslet.stopping import StopPolicy, StopReason
from afsd.cluster.discovery_client import DiscoveryClient


@dataclass(frozen=True)
class AfsletConfig:
    work_dir: Path
    limit_cpu_cores: int
    limit_memory_mb: int
    timeouts: TimeoutPolicy
    limit_gpus: int = 0
    stop_policy: StopPolicy = field(default_factory=StopPolicy)
    node_id: str = ""                  # this afslet's node, in execution management
    endpoint: str = ""                 # where clients reach this afslet (its advertised gRPC address)
    network: NetworkOptions = field(default_factory=NetworkOptions)
    id_map: IdMap | None = None        # --userns: container ids 0..size-1 are these host ids
    net_raw: bool = False              # keep CAP_NET_RAW
    binds: tuple[BindMount, ...] = ()  # host directories every container sees
    bounds: RequestBounds = field(default_factory=RequestBounds)
    tar_chunk: int = 256 * 1024
    pids_limit: int = 4096
    runc_binary: str = "runc"
    runc_root: Path | None = None      # default <work_dir>/runc
    cgroup_parent: str = "/afsd-let"
    resolv_conf: Path | None = Path("/etc/resolv.conf")

    @property
    def sessions_dir(self) -> Path:
        return self.work_dir / "sessions"

    @property
    def runc_state(self) -> Path:
        return self.runc_root or self.work_dir / "runc"

    @property
    def isolation(self) -> Isolation:
        return Isolation(own_network=self.network.mode != "host", id_map=self.id_map, net_raw=self.net_raw)


def container_id(session_id: str) -> str:
    return f"afslet-{session_id}"


@dataclass
class Runtime:
    config: AfsletConfig
    admission: Admission
    reaper: Subreaper
    runc: Runc
    mounts: NodeMounts
    discovery: DiscoveryClient
    network: ContainerNetwork
    executions: ExecutionTable = field(default_factory=ExecutionTable)
    userns_fd: int = -1                # a user namespace carrying config.id_map (for idmapped mounts)
    running_containers: int = 0
    draining: bool = False
    _tasks: set[asyncio.Future[object]] = field(default_factory=set)

    def begin_drain(self) -> int:
        """Admit nothing new; stop every execution in progress with the staged abort. Returns how many."""
        self.draining = True
        return self.executions.stop_all(StopReason.SHUTDOWN)

    def cgroup_path(self, session_id: str) -> str:
        return f"/{self.config.cgroup_parent.strip('/')}/{container_id(session_id)}"

    def track(self, task: asyncio.Future[object]) -> None:
        """Keep `task` (a call or its teardown) until it ends, for `drain`."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @contextlib.contextmanager
    def container_running(self) -> Iterator[None]:
        self.running_containers += 1
        RUNNING.inc()
        try:
            yield
        finally:
            self.running_containers -= 1
            RUNNING.dec()

    async def drain(self, timeout: float) -> None:
        """Wait for every call and teardown in flight (they are cancelled by the server's stop)."""
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
