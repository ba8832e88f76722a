"""What to fill next, decided without touching the kernel: the fanotify supervisor's fill planning as pure
functions of what is present, what is being filled and what failed recently.

Where it sits: the supervisor (supervisor.py) reads an event, asks the blob file where its holes are
(SEEK_HOLE), and hands that to `plan_event`; after each event `Streams` tells which reader it was and how
far ahead of it to fill, and `read_ahead` picks those chunks; in the background `plan_learned` takes what
the cluster learned readers read first (in that order), then `plan_prefetch` walks the holes. The
supervisor turns the answers into fill tasks. Everything here works on chunk indexes and byte offsets
only, so it is unit-tested without root or a kernel (tests/test_fanotify_planner.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

MAX_PLANS_PER_EVENT = 4       # fills that finished yet left the range with holes: give up after this
FILL_AHEAD_TASK_CHUNKS = 2    # fill-ahead goes in tasks this small, spread over the workers
PREFETCH_STEPS = 64           # hole lookups per prefetch round (then other work gets a turn)
MAX_STREAMS = 8               # readers of one blob followed at once (sequential detection)

Run = tuple[int, int]         # (first chunk, chunk count)


def chunk_runs(chunks: Iterable[int], longest: int) -> list[Run]:
    """Consecutive chunk indexes (in order) as (first, count) runs of at most `longest`."""
    runs: list[Run] = []
    for chunk in chunks:
        if runs and runs[-1][0] + runs[-1][1] == chunk and runs[-1][1] < longest:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((chunk, 1))
    return runs


def chunks_under(gaps: Iterable[tuple[int, int]], chunk_size: int) -> list[int]:
    """The indexes of the chunks that hold any byte of the (offset, length) gaps, in order."""
    return sorted({chunk for offset, length in gaps if length > 0
                   for chunk in range(offset // chunk_size, (offset + length - 1) // chunk_size + 1)})


class FailureMemory:
    """Chunks whose fill failed or timed out recently: reads of them fail at once until their time is up
    (erofs retries a failed readahead page by page; without this each retry would wait a whole deadline)."""

    def __init__(self) -> None:
        self._until: dict[int, float] = {}

    def remember(self, first: int, count: int, until: float) -> None:
        for chunk in range(first, first + count):
            self._until[chunk] = until

    def remembers_any(self, now: float) -> bool:
        """Whether any chunk's failure is still remembered."""
        return bool(self._until) and any(until > now for until in self._until.values())

    def any_failed(self, chunks: Iterable[int], now: float) -> bool:
        if not self._until:
            return False
        for chunk in [c for c, until in self._until.items() if until <= now]:
            del self._until[chunk]
        return any(chunk in self._until for chunk in chunks)


@dataclass(frozen=True)
class EventPlan:
    """What to do for one pending read: allow it, fail it, or wait for fills (joined and new)."""

    allow: bool = False
    fail: str = ""                     # why the read fails now ("" if it does not)
    exhausted: bool = False            # it fails because fills kept leaving holes (worth a log line)
    join: tuple[int, ...] = ()         # chunks already being filled: wait for the tasks filling them
    fill: tuple[Run, ...] = ()         # runs of chunks to start demand fills for

    @property
    def waits(self) -> bool:
        return not self.allow and not self.fail


def plan_event(gaps: list[tuple[int, int]], *, chunk_size: int, plans: int, task_chunks: int,
               in_flight: Collection[int], failures: FailureMemory, now: float) -> EventPlan:
    """Plan a read whose range has the holes `gaps` ((offset, length), from SEEK_HOLE). `plans` counts this
    plan: a read whose fills keep finishing with holes left fails after MAX_PLANS_PER_EVENT."""
    if not gaps:
        return EventPlan(allow=True)
    if plans > MAX_PLANS_PER_EVENT:
        return EventPlan(fail=f"still has holes after {MAX_PLANS_PER_EVENT} fills", exhausted=True)
    needed = chunks_under(gaps, chunk_size)
    if failures.any_failed(needed, now):
        return EventPlan(fail="a fill of it failed moments ago")
    join = tuple(chunk for chunk in needed if chunk in in_flight)
    missing = [chunk for chunk in needed if chunk not in in_flight]
    return EventPlan(join=join, fill=tuple(chunk_runs(missing, task_chunks)))


def is_sequential(previous_end: int, start: int, chunk_size: int) -> bool:
    """Whether a read starting at `start` continues the previous one, which ended at `previous_end`."""
    return previous_end - chunk_size <= start <= previous_end + chunk_size


@dataclass
class Stream:
    """One reader of a blob as seen through its reads: where its last read ended, how many chunks to keep
    filled ahead of it, and up to which chunk that was already planned (filled or given to a task)."""

    end: int
    window: int
    planned: int = 0
    reads: int = 1

    @property
    def sequential(self) -> bool:
        return self.reads > 1


class Streams:
    """The readers of one blob, told apart by where they read: a read that continues one (within a chunk
    of where it ended) is that reader's next read and doubles its window, up to `max_window` chunks (a
    sequential reader soon has the link's worth of bytes coming ahead of it, in large units, as the
    kernel's own read-ahead grows); any other read starts a new one, whose window is `fill_ahead` after a
    miss (a fixed read-around for random readers) and nothing after a read of bytes already there.
    The MAX_STREAMS most recent are kept."""

    def __init__(self) -> None:
        self._recent: list[Stream] = []

    def follow(self, start: int, end: int, *, chunk_size: int, missed: bool, fill_ahead: int,
               max_window: int) -> Stream:
        for stream in reversed(self._recent):
            if is_sequential(stream.end, start, chunk_size):
                self._recent.remove(stream)
                self._recent.append(stream)
                stream.end, stream.reads = end, stream.reads + 1
                if fill_ahead:
                    stream.window = min(max(max_window, fill_ahead), max(fill_ahead, 2 * stream.window))
                return stream
        stream = Stream(end=end, window=fill_ahead if missed else 0)
        self._recent = [*self._recent[-(MAX_STREAMS - 1):], stream]
        return stream


def read_ahead(end: int, *, chunk_size: int, chunks: int, fill_ahead: int, in_flight: Collection[int],
               filled: Callable[[int], bool], unit: int = FILL_AHEAD_TASK_CHUNKS, planned: int = 0) -> list[Run]:
    """The runs to fill after a read ending at `end`: the next `fill_ahead` chunks that are neither filled
    nor being filled (nor before `planned`, which was seen to already), in tasks of at most `unit` chunks:
    small ones around a single miss (a reader's own chunk is not held up behind them), large ones ahead of
    a sequential reader."""
    first = -(-end // chunk_size)
    ahead = [chunk for chunk in range(max(first, planned), min(chunks, first + fill_ahead))
             if chunk not in in_flight and not filled(chunk)]
    return chunk_runs(ahead, unit)


def plan_learned(runs: deque[Run], *, budget: int, task_chunks: int, in_flight: Collection[int],
                 filled: Callable[[int], bool]) -> list[Run]:
    """About `budget` runs taken from the front of a learned prefetch's queue (afsd/ondemand/trace.py), without
    the chunks that are filled or being filled already (a reader got there first)."""
    planned: list[Run] = []
    while runs and len(planned) < budget:
        first, count = runs.popleft()
        planned += chunk_runs([chunk for chunk in range(first, first + count)
                               if chunk not in in_flight and not filled(chunk)], task_chunks)
    return planned


def plan_prefetch(cursor: int, *, size: int, chunk_size: int, budget: int, task_chunks: int,
                  first_hole: Callable[[int], int | None], in_flight: Collection[int],
                  filled: Callable[[int], bool]) -> tuple[list[Run], int]:
    """Up to `budget` runs of holes to fill in the background, found from `cursor` on (wrapping around
    once), and where the next round goes on. `first_hole(offset)` is the first hole at or after
    `offset` (None: no hole up to the end)."""
    chunks = -(-size // chunk_size)
    planned: set[int] = set()
    runs: list[Run] = []
    wrapped = False
    for _ in range(PREFETCH_STEPS):
        if len(runs) >= budget:
            break
        hole = first_hole(cursor)
        if hole is None:
            if wrapped or cursor == 0:
                break
            cursor, wrapped = 0, True
            continue
        chunk = hole // chunk_size
        run: list[int] = []
        while (chunk < chunks and len(run) < task_chunks and chunk not in in_flight and chunk not in planned
               and not filled(chunk)):
            run.append(chunk)
            chunk += 1
        cursor = min(size, (chunk + (0 if run else 1)) * chunk_size)
        if run:
            runs.append((run[0], len(run)))
            planned.update(run)
    return runs, cursor
