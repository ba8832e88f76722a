"""The supervisor's in-memory model: served blobs, fill tasks, pending events and fetch workers.

Who points at whom: a PendingEvent (one blocked reader's range) waits for the Tasks filling the chunks
under its holes; a Task belongs to one Blob and, while dispatched, to one Worker; a Blob maps each chunk
being filled to its Task, so two readers of one chunk share one fill.
"""

from __future__ import annotations

import bisect
import subprocess
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from afsd.ondemand._wire import Connection
from afsd.ondemand.fanotify.planner import FailureMemory
from afsd.ondemand.streams import Streams
from afsd.ondemand.spec import BlobSpec, Priority
from afsd.ondemand.trace import LearnedPrefetch, TraceRecorder
from afsd.ondemand.supervised.protocol import StopCause, WorkerState

if TYPE_CHECKING:
    from afsd.ondemand.fanotify.startup import StartupGate


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
    failures: FailureMemory = field(default_factory=FailureMemory)
    streams: Streams = field(default_factory=Streams)   # its readers, told apart by where they read
    recorder: TraceRecorder | None = None      # its first reads, for the cluster to learn (trace.py)
    learned: LearnedPrefetch | None = None     # what the cluster learned readers read first: fetched first
    startup: StartupGate | None = None         # holds its background fill back while readers start (startup.py)
    filling_rest: bool = False                 # its whole-blob background fill has begun
    leaving: bool = False                      # to be detached: no whole-blob fill starts any more

    @property
    def chunks(self) -> int:
        return -(-self.spec.size // self.spec.chunk_size)

    def tasks(self) -> list[Task]:
        """The tasks filling this blob's chunks, each once (a task of several chunks is listed under each)."""
        return list({id(task): task for task in self.inflight.values()}.values())


@dataclass(eq=False)
class Task:
    id: int
    blob: Blob
    first_chunk: int
    chunk_count: int
    priority: Priority
    created: float = 0.0
    learned: bool = False   # a fill of the blob's learned prefetch
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
    demand: bool = False    # it waited for a demand fill (a fetch made because of a miss)
    learned: bool = False   # it waited for a fill of the blob's learned prefetch


@dataclass(eq=False)
class Worker:
    id: int
    process: subprocess.Popen
    pidfd: int
    started: float
    connection: Connection | None = None      # set at hello (state READY), dropped when it stops
    state: WorkerState = WorkerState.STARTING
    stop_cause: StopCause | None = None       # why we stopped it (None: we did not, it died on its own)
    last_seen: float = 0.0
    tasks: dict[int, Task] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.state is WorkerState.READY


LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class EventLatency:
    """Histograms of the time from reading an event to answering it: `present` (allowed at once) and
    `filled` (allowed after a fill)."""

    counts: dict[str, list[int]] = field(default_factory=lambda: {
        kind: [0] * (len(LATENCY_BUCKETS) + 1) for kind in ("present", "filled")})
    sums: dict[str, float] = field(default_factory=lambda: {"present": 0.0, "filled": 0.0})

    def observe(self, kind: str, seconds: float) -> None:
        buckets = self.counts[kind]
        index = bisect.bisect_left(LATENCY_BUCKETS, seconds)   # the first bucket whose bound is >= seconds
        buckets[index] += 1
        self.sums[kind] += seconds

    def to_json(self) -> dict[str, Any]:
        return {"buckets": list(LATENCY_BUCKETS),
                **{kind: {"counts": list(counts), "sum": self.sums[kind]} for kind, counts in self.counts.items()}}
