"""The fscache kernel worker's background fills of one blob, at PREFETCH priority (the source serves demand
READs first): first the blob's learned ranges (what the cluster learned readers read first, in that order:
afsd/ondemand/trace.py), then, with `prefetch`, every hole from the start, a read unit at a time, a few
units in flight.

Where it sits: worker.py runs one `BackgroundFill` per blob after its OPEN and cancels it when the blob's
last object closes; each unit goes through the worker's own fill (fetch, verify, write through the anon fd),
so prefetched bytes are checked like every other. The cache file raises no READ for bytes it holds, so a
recording of the blob's first reads is spoiled by anything filled meanwhile: while one is recorded, the
hole walk waits until the recording window is over (after a learned fill too: it would only compete with the
startup's reads).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from afsd.errors import AfsdError
from afsd.ondemand.sparse import first_hole
from afsd.ondemand.spec import Priority

if TYPE_CHECKING:
    from afsd.ondemand.cachefiles.worker import OpenObject, ServedBlob

log = logging.getLogger("afsd.fscache.worker")

Fill = Callable[["OpenObject", int, int, Priority], Awaitable[int]]
Unit = tuple["OpenObject", int, int]                       # (open object, start, end)
RECORDING_POLL = 0.2                                       # seconds between looks at a recording window


class BackgroundFill:
    def __init__(self, blob: ServedBlob, *, fill: Fill, until_attached: Callable[[Any, OpenObject], Awaitable[Any]],
                 release: Callable[[OpenObject], None], on_whole: Callable[[ServedBlob], None], inflight: int,
                 learned_inflight: int, counters: dict[str, int]) -> None:
        self.blob = blob
        self._fill = fill
        self._until_attached = until_attached
        self._release = release
        self._on_whole = on_whole
        self._inflight = max(1, inflight)
        self._learned_inflight = max(1, learned_inflight)
        self._counters = counters

    async def run(self) -> None:
        blob = self.blob
        try:
            if blob.learned is not None and blob.learned.runs:
                await self._fill_units(self._learned_units(), self._learned_inflight, learned=True)
            if not blob.prefetch:
                return
            if blob.recorder is not None:
                await self._startup_over()
            await self._fill_units(self._holes(), self._inflight)
            obj = self._open_object()
            size = blob.spec.size
            if not blob.complete and obj is not None and await asyncio.to_thread(first_hole, obj.fd, 0, size) is None:
                self._on_whole(blob)
        except (OSError, AfsdError, ValueError) as e:
            if blob.objects:   # (once its last object closed, failing writes are expected)
                log.warning("prefetch of blob %s stopped (it resumes at its next OPEN): %s", blob.name, e)

    def _open_object(self) -> OpenObject | None:
        return next((o for o in self.blob.objects if not o.closed), None)

    async def _startup_over(self) -> None:
        """Wait until the startup the blob's recording covers is over (TraceRecorder.startup_over)."""
        recorder = self.blob.recorder
        while recorder is not None and not recorder.startup_over(time.monotonic()):
            await asyncio.sleep(RECORDING_POLL)

    async def _fill_units(self, units: AsyncGenerator[Unit, None], inflight: int, *, learned: bool = False) -> None:
        """Fill what `units` yields, `inflight` at a time; the first failure stops the walk and is raised."""
        slots = asyncio.Semaphore(inflight)
        running: set[asyncio.Task[int]] = set()
        failed: list[BaseException] = []
        try:
            while not failed and not self.blob.complete:
                await slots.acquire()   # before looking: a slot may free up after demand reads filled more
                unit = await anext(units, None)
                if unit is None:
                    slots.release()
                    break
                obj, start, end = unit
                obj.users += 1
                task = asyncio.create_task(self._fill(obj, start, end, Priority.PREFETCH))
                running.add(task)

                def landed(task: asyncio.Task[int], obj: OpenObject = obj, start: int = start, end: int = end) -> None:
                    running.discard(task)
                    slots.release()
                    self._release(obj)
                    if task.cancelled():
                        return
                    if task.exception() is not None:
                        failed.append(task.exception())  # type: ignore[arg-type]
                    elif learned:
                        self._learned_landed(start, end)

                task.add_done_callback(landed)
            await asyncio.gather(*running, return_exceptions=True)
            if failed:
                raise failed[0]
        finally:
            for task in running:
                task.cancel()
            await units.aclose()

    def _learned_landed(self, start: int, end: int) -> None:
        learned = self.blob.learned
        if learned is not None:
            unit = learned.chunk_size
            self._counters["learned_bytes_prefetched"] += end - start
            learned.mark_prefetched(range(start // unit, -(-end // unit)))

    async def _learned_units(self) -> AsyncGenerator[Unit, None]:
        """The learned runs (in units of `LearnedPrefetch.chunk_size`, the blob's read unit) that still have a hole."""
        blob, learned = self.blob, self.blob.learned
        size = blob.spec.size
        while learned is not None and learned.runs:
            first, count = learned.runs.popleft()
            obj = self._open_object()
            if obj is None:
                return
            start, end = first * learned.chunk_size, min(size, (first + count) * learned.chunk_size)
            hole = await self._until_attached(lambda fd=obj.fd, s=start, e=end: first_hole(fd, s, e), obj)
            if hole is not None:
                yield obj, start, end

    async def _holes(self) -> AsyncGenerator[Unit, None]:
        """Every hole of the cache file from the start, a read unit at a time."""
        blob, position = self.blob, 0
        size, unit = blob.spec.size, blob.unit
        while position < size:
            obj = self._open_object()
            if obj is None:
                return
            hole = await self._until_attached(lambda fd=obj.fd, at=position: first_hole(fd, at, size), obj)
            if hole is None:
                return
            start = hole - hole % unit
            if start // unit not in blob.fills.by_unit:   # (else being filled for a reader already)
                yield obj, start, min(size, start + unit)
            position = start + unit
