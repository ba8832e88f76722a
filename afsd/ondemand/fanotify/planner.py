"""What to fill next, decided without touching the kernel: the fanotify supervisor's fill planning as pure
functions of what is present, what is being filled and what failed recently.

Where it sits: the supervisor (supervisor.py) reads an event, asks the blob file where its holes are
(SEEK_HOLE), and hands that to `plan_event`; after each event `Streams` (afsd/ondemand/streams.py, shared
with the fscache worker) tells which reader it was and how far ahead of it to fill, and `read_ahead` picks
those chunks; in the background `plan_learned` takes what the cluster learned readers read first (in that
order), then `plan_prefetch` walks the holes. The
supervisor turns the answers into fill tasks. Everything here works on chunk indexes and byte offsets
only, so it is unit-tested without root or a kernel (tests/test_fanotify_planner.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from afsd.ondemand.streams import FILL_AHEAD_TASK_CHUNKS, Run, chunk_runs, read_ahead

__all__ = ["FILL_AHEAD_TASK_CHUNKS", "EventPlan", "FailureMemory", "chunks_under", "plan_event", "plan_learned",
           "plan_prefetch", "read_ahead"]

MAX_PLANS_PER_EVENT = 4       # fills that finished yet left the range with holes: give up after this
PREFETCH_STEPS = 64           # hole lookups per prefetch round (then other work gets a turn)


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
