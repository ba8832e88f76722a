"""A fetch worker: fills ranges of marked blobs with verified bytes, as the supervisor asks.

Where it sits: supervisor --(blob spec + fill fd, fill tasks)--> worker --(RangeSource.fetch)--> peers;
worker --(pwrite through the fill fd)--> blob file; worker --(done / failed)--> supervisor, which then
answers the kernel. Workers hold no kernel state the readers depend on: the supervisor may kill one at
any moment (it stopped heartbeating, or died) and give its tasks to another.

Messages on the supervisor's socket (afsd/ondemand/supervised/protocol.py):
    -> Hello(FETCH_WORKER), then every `heartbeat` seconds a Heartbeat with the fetch counters' totals
    <- ServeBlob + the blob's fill fd (opened before the blob was marked, so its writes raise no fanotify
       events; a worker must never write the blob through any other fd)
    <- Forget                          the blob is complete or unregistered: drop it
    <- Fill                            -> FillDone | FillFailed
    <- Cancel                          nobody waits for it any more
The worker only writes holes (SEEK_HOLE), so bytes a reader may already see are never rewritten.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import sys
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from afsd.ondemand import _daemon
from afsd.ondemand._wire import AsyncChannel, ProtocolError
from afsd.ondemand.sources import SourceFactory, worker_sources
from afsd.ondemand.sparse import holes, write_at
from afsd.ondemand.spec import BlobSpec, FetchedRange, Priority, RangeSource
from afsd.ondemand.supervised import protocol as p

log = logging.getLogger("afsd.fanotify.worker")


# RangeFetcher.stats() keys -> the names the supervisor counts them under (sent with each heartbeat).
FETCH_COUNTERS = {"failovers": "fetch_failovers", "verification_failures": "fetch_verification_failures"}


@dataclass(eq=False)
class WorkerBlob:
    name: str
    spec: BlobSpec
    fill_fd: int
    config: dict[str, Any]
    source: RangeSource | None = None
    counted: dict[str, int] = field(default_factory=dict)   # the source's fetch counters already reported
    writes_in_flight: int = 0
    forgotten: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class FetchWorker:
    def __init__(self, socket_path: str, heartbeat: float, factory: SourceFactory) -> None:
        self.socket_path = socket_path
        self.heartbeat = heartbeat
        self.blobs: dict[str, WorkerBlob] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}      # fills, by task id
        self.chores: set[asyncio.Task[None]] = set()        # forgetting blobs, reporting: kept, awaited at exit
        self.factory = factory
        self.writer = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="fill")
        self.channel: AsyncChannel | None = None
        self.counted: dict[str, int] = dict.fromkeys(FETCH_COUNTERS.values(), 0)   # totals, this process

    async def run(self) -> None:
        self.channel = await AsyncChannel.connect(self.socket_path)
        await self.channel.send(p.Hello(role=p.Role.FETCH_WORKER).to_json())
        beats = asyncio.create_task(self._heartbeats())
        try:
            while (item := await self.channel.receive()) is not None:
                frame, fds = item
                try:
                    self._handle(p.parse(frame), fds)
                except ProtocolError as e:
                    log.error("the supervisor sent a malformed message: %s", e)
                    for fd in fds:
                        os.close(fd)
        finally:
            beats.cancel()
            for task in list(self.tasks.values()):
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            for blob in list(self.blobs.values()):
                await self._forget(blob)
            while self.chores:   # (each is bounded: source closes time out, reports fail on a closed link)
                await asyncio.gather(*self.chores, return_exceptions=True)
            await asyncio.wait_for(self.factory.close(), 5.0)
            self.channel.close()

    @property
    def link(self) -> AsyncChannel:
        """The connection to the supervisor (made first thing in `run`)."""
        if self.channel is None:
            raise RuntimeError("the worker is not connected to its supervisor yet")
        return self.channel

    def _chore(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run `coroutine` as a task this worker keeps (the loop itself holds only weak references)."""
        task = asyncio.create_task(coroutine)
        self.chores.add(task)
        task.add_done_callback(self.chores.discard)

    async def _heartbeats(self) -> None:
        while True:
            for blob in self.blobs.values():
                self._count_fetches(blob)
            await self.link.send(p.Heartbeat(tasks=len(self.tasks), counters=dict(self.counted),
                                             fetch=self.factory.metrics()).to_json())
            await asyncio.sleep(self.heartbeat)

    def _count_fetches(self, blob: WorkerBlob) -> None:
        """Add what `blob`'s fetcher counted since last time to this process's totals."""
        stats = getattr(blob.source, "stats", None)
        if stats is None:
            return
        now = stats()
        for key, name in FETCH_COUNTERS.items():
            self.counted[name] += int(now.get(key, 0)) - blob.counted.get(key, 0)
            blob.counted[key] = int(now.get(key, 0))

    def _handle(self, message: p.Message, fds: list[int]) -> None:
        if isinstance(message, p.ServeBlob) and fds:
            old = self.blobs.pop(message.name, None)
            if old is not None:
                self._chore(self._forget(old))
            self.blobs[message.name] = WorkerBlob(message.name, message.spec, fds.pop(0), message.source)
        elif isinstance(message, p.Forget):
            blob = self.blobs.pop(message.name, None)
            if blob is not None:
                self._chore(self._forget(blob))
        elif isinstance(message, p.Fill):
            blob = self.blobs.get(message.name)
            if blob is None:
                self._chore(self._report(p.FillFailed(task=message.task,
                                                      error=f"worker does not know blob {message.name}")))
            else:
                task = asyncio.create_task(self._fill(message.task, blob, message.offset, message.length,
                                                      message.priority))
                self.tasks[message.task] = task
                blob.tasks.add(task)
                task.add_done_callback(lambda t, i=message.task, b=blob: (self.tasks.pop(i, None), b.tasks.discard(t)))
        elif isinstance(message, p.Cancel):
            task = self.tasks.get(message.task)
            if task is not None:
                task.cancel()
        for fd in fds:
            os.close(fd)

    async def _fill(self, task_id: int, blob: WorkerBlob, offset: int, length: int, priority: Priority) -> None:
        try:
            if blob.source is None:
                blob.source = self.factory.make(blob.spec, blob.config)
            fetched = await blob.source.fetch(offset, length, priority)
            fetched.require_covers(offset, offset + length)
            written = await self._write_holes(blob, fetched)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported; the supervisor fails the waiting reads (EIO)
            log.error("blob %s: fill of bytes %d-%d failed: %s", blob.name, offset, offset + length, e)
            await self._report(p.FillFailed(task=task_id, error=str(e) or type(e).__name__))
            return
        await self._report(p.FillDone(task=task_id, written=written, source=fetched.source))

    async def _write_holes(self, blob: WorkerBlob, fetched: FetchedRange) -> int:
        if blob.forgotten:
            raise RuntimeError(f"blob {blob.name} was dropped")
        # The fd must stay open until the writing thread is really done, even if this task is
        # cancelled meanwhile: the thread, not the task, releases it.
        blob.writes_in_flight += 1
        loop = asyncio.get_running_loop()
        future = self.writer.submit(write_holes, blob.fill_fd, fetched.offset, fetched.data, blob.spec.size)
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._write_finished, blob))
        return await asyncio.wrap_future(future)

    def _write_finished(self, blob: WorkerBlob) -> None:
        blob.writes_in_flight -= 1
        if blob.forgotten and blob.writes_in_flight == 0:
            os.close(blob.fill_fd)

    async def _forget(self, blob: WorkerBlob) -> None:
        blob.forgotten = True
        self._count_fetches(blob)
        for task in list(blob.tasks):
            task.cancel()
        if blob.writes_in_flight == 0:
            os.close(blob.fill_fd)
        if blob.source is not None:
            try:
                await asyncio.wait_for(blob.source.close(), 5.0)
            except Exception as e:  # noqa: BLE001 - best effort at teardown
                log.warning("closing the source of blob %s: %s", blob.name, e)

    async def _report(self, message: p.FillDone | p.FillFailed) -> None:
        try:
            await self.link.send(message.to_json())
        except OSError:
            pass  # the supervisor is gone; run() ends at EOF


def write_holes(fd: int, offset: int, data: bytes, size: int) -> int:
    """pwrite the parts of `data` (blob bytes at `offset`) that are holes in the file; bytes written."""
    end = min(size, offset + len(data))
    view = memoryview(data)
    return sum(write_at(fd, view[hole - offset:hole - offset + length], hole)
               for hole, length in holes(fd, offset, end))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m afsd.ondemand.fanotify.worker")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--heartbeat", type=float, default=0.5)
    parser.add_argument("--sources", required=True, help="module:callable making this worker's SourceFactory")
    parser.add_argument("--sources-path", default="", help="a directory to import the source factory from first")
    args = parser.parse_args(argv)
    if not _daemon.die_with_parent():   # never outlive the supervisor
        return 0
    _daemon.setup_logging("fetch-worker")
    factory = worker_sources(args.sources, args.sources_path, log)
    asyncio.run(FetchWorker(args.socket, args.heartbeat, factory).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
