"""The executions of this afslet, as execution management sees them (`afsd ps`, `afsd logs ID`,
`afsd stop ID`; served by management.py).

An Execute call registers its `Execution` right after admission and keeps it current: the command as
resolved, the container once it runs, the outcome once it ended. When the call is over the execution
moves to a short history of finished ones (`--keep-finished`), so its log tail and final numbers can
still be read. Stopping goes through the execution: before its container runs, the wish is recorded and
the command never starts; while it runs, the container's staged abort starts.

Ids are 64 random bits in hex: unique across afslets without coordination, so that a proxy can serve
the same management service for all of them.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from afsd.afslet import cgroups
from afsd.afslet.container import Container
from afsd.afslet.log_tail import LogTail
from afsd.afslet.outcome import Outcome
from afsd.afslet.stopping import StopReason


def new_execution_id() -> str:
    return secrets.token_hex(8)


class State(enum.Enum):
    PREPARING = "preparing"
    RUNNING = "running"
    STOPPING = "stopping"
    FINISHED = "finished"


@dataclass
class Execution:
    id: str
    image: str
    command: tuple[str, ...]
    cpu_cores: int
    memory_mb: int
    gpus: int
    timeout_ms: int
    logs: LogTail
    created_unix: float = field(default_factory=time.time)
    created_monotonic: float = field(default_factory=time.monotonic)
    container: Container | None = None
    run_started: float | None = None    # monotonic, when the command started
    run_ended: float | None = None
    outcome: Outcome | None = None
    final_usage: cgroups.CgroupUsage | None = None
    finished_unix: float | None = None
    stop_reason: StopReason | None = None
    _finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def state(self) -> State:
        if self.outcome is not None:
            return State.FINISHED
        container = self.container
        if container is not None and container.stopping:
            return State.STOPPING
        if container is not None and container.running:
            return State.RUNNING
        return State.PREPARING

    @property
    def stop_requested(self) -> StopReason | None:
        """Why it is being (or was) stopped: a request, or its container's own timeout."""
        if self.stop_reason is None and self.container is not None:
            return self.container.stop_reason
        return self.stop_reason

    @property
    def age_seconds(self) -> float:
        return time.monotonic() - self.created_monotonic

    @property
    def wall_seconds(self) -> float:
        if self.run_started is None:
            return 0.0
        return (self.run_ended or time.monotonic()) - self.run_started

    def container_started(self, container: Container) -> None:
        self.container = container
        self.run_started = time.monotonic()

    def request_stop(self, reason: StopReason) -> None:
        """Stop it (the first reason counts): the staged abort if the command runs, else it never starts."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.container is not None:
            self.container.abort(self.stop_reason)

    def finish(self, outcome: Outcome, usage: cgroups.CgroupUsage | None) -> None:
        """The command has ended (or will never run): record how. Only the first call counts."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.final_usage = usage
        if self.run_started is not None and self.run_ended is None:
            self.run_ended = time.monotonic()
        self.finished_unix = time.time()
        self._finished.set()

    async def wait_finished(self) -> None:
        await self._finished.wait()

    def usage_now(self) -> cgroups.CgroupUsage:
        """The cgroup's counters now (blocking: call in a thread); the final ones once finished."""
        if self.final_usage is not None:
            return self.final_usage
        if self.container is not None and self.container.running:
            return cgroups.usage(self.container.cgroup_path)
        if self.container is not None and self.container.final_usage is not None:
            return self.container.final_usage
        return cgroups.CgroupUsage()


class ExecutionTable:
    """Executions in progress, by id, and the last `keep_finished` finished ones. Event loop only."""

    def __init__(self, keep_finished: int = 50, tail_lines: int = 1000, tail_bytes: int = 256 * 1024) -> None:
        self.tail_lines = tail_lines
        self.tail_bytes = tail_bytes
        self._live: OrderedDict[str, Execution] = OrderedDict()
        self._finished: deque[Execution] = deque(maxlen=keep_finished)

    def register(self, execution_id: str, *, image: str, command: tuple[str, ...], cpu_cores: int, memory_mb: int,
                 gpus: int, timeout_ms: int) -> Execution:
        execution = Execution(execution_id, image, command, cpu_cores, memory_mb, gpus, timeout_ms,
                              LogTail(self.tail_lines, self.tail_bytes))
        self._live[execution.id] = execution
        return execution

    def retire(self, execution: Execution, outcome_if_unfinished: Outcome) -> None:
        """The call is over: close the log tail and keep the execution among the finished ones (without
        its container, which holds on to the whole call)."""
        container = execution.container
        execution.finish(outcome_if_unfinished, container.final_usage if container else None)
        if container is not None:
            execution.stop_reason = execution.stop_requested
            execution.final_usage = execution.final_usage or container.final_usage
            execution.container = None
        execution.logs.close()
        if self._live.pop(execution.id, None) is not None and self._finished.maxlen:
            self._finished.append(execution)

    def get(self, execution_id: str) -> Execution | None:
        found = self._live.get(execution_id)
        if found is None:
            found = next((e for e in self._finished if e.id == execution_id), None)
        return found

    def live(self) -> list[Execution]:
        return list(self._live.values())

    def finished(self) -> list[Execution]:
        return list(self._finished)

    def stop_all(self, reason: StopReason) -> int:
        """Stop every execution in progress; return how many there were."""
        for execution in self._live.values():
            execution.request_stop(reason)
        return len(self._live)
