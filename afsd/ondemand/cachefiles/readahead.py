"""How the fscache kernel worker fills for READs: one fill per read unit at a time, and ahead of sequential
readers.

Why: the kernel sends a READ only for a range its cache file lacks, and waits for the answer; a reader
served one unit per READ pays a whole round trip (fetch, verify, write, answer, the kernel's own read of
the cache file) per unit, one after the other. A reader whose READs continue one another (afsd/ondemand/
streams.py, shared with the fanotify backend) is sequential: the units after it are filled before it asks,
several at a time (the fetch, the digest check and the write of one run while the kernel reads another),
so most of its reads find their bytes in the cache file and raise no READ at all. Its window doubles with
each READ it still makes (it caught up with the fills), up to `stream_window` units. Random readers get
nothing beyond their unit: a reader is sequential only after SEQUENTIAL_AFTER READs in a row.

Where it sits: worker.py calls `ReadFills.fill` for every READ and `stop` when a blob's last object
closes. Every fill goes through the worker's own fill (fetch, verify every chunk, write through the anon
fd), so bytes filled ahead are checked like every other. A READ whose unit is being filled joins that
fill; if it fails (or is cancelled), the READ fills the range itself once more before it is answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from afsd.ondemand.sparse import first_hole
from afsd.ondemand.spec import Priority
from afsd.ondemand.streams import Streams, chunk_runs, read_ahead

if TYPE_CHECKING:
    from afsd.ondemand.cachefiles.worker import OpenObject, ServedBlob

log = logging.getLogger("afsd.fscache.worker")

Fill = Callable[["OpenObject", int, int, Priority], Awaitable[int]]

AHEAD_TASK_UNITS = 4        # a fill ahead of a sequential reader covers up to this many read units
FIRST_WINDOW = 2            # read units ahead of a reader once it is sequential (then doubling per READ)
SEQUENTIAL_AFTER = 3        # READs in a row that make a reader sequential (two adjacent random misses do not)


@dataclass(eq=False)
class BlobFills:
    """One blob's fills in flight, by read unit, and the readers seen through its READs."""

    streams: Streams = field(default_factory=Streams)
    by_unit: dict[int, asyncio.Task[int]] = field(default_factory=dict)
    ahead: set[asyncio.Task[int]] = field(default_factory=set)
    ahead_slots: asyncio.Semaphore | None = None   # made on first use (inside the worker's loop)


class ReadFills:
    def __init__(self, fill: Fill, release: Callable[[OpenObject], None], tasks: set[asyncio.Task[None]],
                 counters: dict[str, int], *, window: int, inflight: int) -> None:
        self._fill = fill
        self._release = release
        self._tasks = tasks          # the worker's: cancelled when it stops
        self._counters = counters
        self._window = window
        self._inflight = max(1, inflight)

    async def fill(self, obj: OpenObject, start: int, end: int) -> None:
        """Make [start, end) of `obj`'s blob present for a READ (raises if that failed: the reader gets EIO)."""
        blob = obj.blob
        if present(obj, start, end):   # a fill ahead of the reader got there after the kernel looked
            self._counters["reads_present"] += 1
            return
        fills = blob.fills
        unit = blob.unit
        units = range(start // unit, -(-min(end, blob.spec.size) // unit))
        joined = {fills.by_unit[u] for u in units if u in fills.by_unit}
        own = [self._start(obj, first, count, Priority.DEMAND)
               for first, count in chunk_runs([u for u in units if u not in fills.by_unit], len(units))]
        if own or joined & fills.ahead:   # (not another READ of a range some READ is filling: no progress)
            self._follow(obj, start, end)
        await asyncio.wait([*joined, *own])
        for task in own:
            task.result()   # this READ's own fill failed: so does the READ
        if joined and not present(obj, start, end):   # a fill it joined failed or was cancelled: once more
            await self._fill(obj, start, end, Priority.DEMAND)

    def stop(self, blob: ServedBlob) -> None:
        """The blob's last object closed: nobody reads what is being filled ahead."""
        for task in list(blob.fills.ahead):
            task.cancel()

    def _follow(self, obj: OpenObject, start: int, end: int) -> None:
        """Fill ahead of the reader this READ belongs to, if it is sequential."""
        blob = obj.blob
        if not self._window or blob.complete:
            return
        if blob.recorder is not None and blob.recorder.is_open(time.monotonic()):
            return   # bytes filled ahead raise no READ: they would spoil the recording of the blob's first reads
        unit, size = blob.unit, blob.spec.size
        units = -(-size // unit)
        stream = blob.fills.streams.follow(start, end, chunk_size=unit, missed=False, fill_ahead=FIRST_WINDOW,
                                           max_window=self._window, misses_only=True)   # (missed=False: no read-around at first)
        if stream.reads < SEQUENTIAL_AFTER:
            return
        window_end = min(units, -(-end // unit) + stream.window)
        if window_end < units and window_end - stream.planned < min(AHEAD_TASK_UNITS, stream.window):
            return   # topped up in whole tasks
        runs = read_ahead(end, chunk_size=unit, chunks=units, fill_ahead=stream.window, in_flight=blob.fills.by_unit,
                          filled=lambda u: present(obj, u * unit, min(size, (u + 1) * unit)), unit=AHEAD_TASK_UNITS,
                          planned=stream.planned)
        stream.planned = window_end
        for first, count in runs:
            self._start(obj, first, count, Priority.AHEAD)

    def _start(self, obj: OpenObject, first: int, count: int, priority: Priority) -> asyncio.Task[int]:
        """A task filling units [first, first + count), known by unit until it ends."""
        blob = obj.blob
        fills, unit = blob.fills, blob.unit
        start, end = first * unit, min(blob.spec.size, (first + count) * unit)
        obj.users += 1
        if priority == Priority.DEMAND:
            task = asyncio.create_task(self._fill(obj, start, end, priority))
        else:
            task = asyncio.create_task(self._ahead(obj, start, end))
            fills.ahead.add(task)
        self._tasks.add(task)  # type: ignore[arg-type]
        for u in range(first, first + count):
            fills.by_unit[u] = task

        def landed(task: asyncio.Task[int]) -> None:
            self._tasks.discard(task)  # type: ignore[arg-type]
            fills.ahead.discard(task)
            for u in range(first, first + count):
                if fills.by_unit.get(u) is task:
                    del fills.by_unit[u]
            self._release(obj)
            error = None if task.cancelled() else task.exception()   # (a READ's own: it raises it)
            if error is not None and priority != Priority.DEMAND:
                log.warning("blob %s: filling bytes %d-%d ahead of a reader failed (its READ fills them "
                            "itself): %s", blob.name, start, end, error)

        task.add_done_callback(landed)
        return task

    async def _ahead(self, obj: OpenObject, start: int, end: int) -> int:
        fills = obj.blob.fills
        if fills.ahead_slots is None:
            fills.ahead_slots = asyncio.Semaphore(self._inflight)
        async with fills.ahead_slots:
            if obj.closed or present(obj, start, end):
                return 0
            written = await self._fill(obj, start, end, Priority.AHEAD)
        self._counters["read_ahead_bytes"] += written
        return written


def present(obj: OpenObject, start: int, end: int) -> bool:
    """Whether [start, end) of the object's cache file has no hole (False if that cannot be told)."""
    try:
        return obj.fd >= 0 and first_hole(obj.fd, start, end) is None
    except OSError:
        return False
