"""The supervisor's in-memory model: served blobs, fill tasks, pending events and fetch workers.

Who points at whom: a PendingEvent (one blocked reader's range) waits for the Tasks filling the chunks
under its holes; a Task belongs to one Blob and, while dispatched, to one Worker; a Blob maps each chunk
being filled to its Task, so two readers of one chunk share one fill.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Any

from afsd.ondemand._wire import Connection
from afsd.ondemand.spec import BlobSpec, Priority


@dataclass(eq=False)
class Blob:
    name: str
    path: str
    spec: BlobSpec
    source: dict[str, Any]
    prefetch: bool
    fill_fd: int | None
    inode: tuple[int, int]
    complete: bool = False
    tainted: bool = False                      # may have served zeros while no group existed
    inflight: dict[int, Task] = field(default_factory=dict)   # chunk index -> task filling it
    pending: set[PendingEvent] = field(default_factory=set)
    prefetch_cursor: int = 0
    prefetch_inflight: int = 0
    prefetch_paused_until: float = 0.0
    filled_bytes: int = 0
    failed_until: dict[int, float] = field(default_factory=dict)  # chunk -> until when reads of it fail at once
    read_end: int = 0                          # where the last read event ended (sequential detection)

    @property
    def chunks(self) -> int:
        return -(-self.spec.size // self.spec.chunk_size)


@dataclass(eq=False)
class Task:
    id: int
    blob: Blob
    first_chunk: int
    chunk_count: int
    priority: Priority
    created: float = 0.0
    worker: Worker | None = None
    events: set[PendingEvent] = field(default_factory=set)
    dispatches: int = 0

    @property
    def offset(self) -> int:
        return self.first_chunk * self.blob.spec.chunk_size

    @property
    def length(self) -> int:
        return min(self.blob.spec.size, (self.first_chunk + self.chunk_count) * self.blob.spec.chunk_size) - self.offset


@dataclass(eq=False)
class PendingEvent:
    fd: int                 # the event's fd number (in our table, or in a dead predecessor's)
    blob: Blob
    start: int
    end: int
    received: float
    deadline: float
    owned: bool             # fd is open in our table (False: a predecessor's event, answered by number)
    placeholder: bool = False   # we hold fd's number with a placeholder until the event is answered
    tasks: set[Task] = field(default_factory=set)
    plans: int = 0
    answered: bool = False


@dataclass(eq=False)
class Worker:
    id: int
    process: subprocess.Popen
    pidfd: int
    started: float
    connection: Connection | None = None
    last_seen: float = 0.0
    tasks: dict[int, Task] = field(default_factory=dict)
    killed: str = ""        # why we killed it ("" while alive)
    hung: bool = False

    @property
    def ready(self) -> bool:
        return self.connection is not None and not self.killed


def chunk_runs(chunks: list[int], longest: int) -> list[tuple[int, int]]:
    """Consecutive chunk indexes as (first, count) runs of at most `longest`."""
    runs: list[tuple[int, int]] = []
    for chunk in chunks:
        if runs and runs[-1][0] + runs[-1][1] == chunk and runs[-1][1] < longest:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((chunk, 1))
    return runs
