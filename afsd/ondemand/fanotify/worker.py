"""A fetch worker: fills ranges of marked blobs with verified bytes, as the supervisor asks.

Where it sits: supervisor --(blob spec + fill fd, fill tasks)--> worker --(RangeSource.fill)--> peers;
the source hands each verified piece, as it arrives, to the blob's sink (afsd/ondemand/sinks.py: pwrite
of its holes through the fill fd, from a thread of the byte stream); worker --(written, then done /
failed)--> supervisor, which answers the kernel: a reader waiting on part of a long fill goes on as soon
as its bytes are written. Workers hold no kernel state the readers depend on: the supervisor may kill
one at any moment (it stopped heartbeating, or died) and give its tasks to another.

Messages on the supervisor's socket (afsd/ondemand/supervised/protocol.py):
    -> Hello(FETCH_WORKER), then every `heartbeat` seconds a Heartbeat with the fetch counters' totals and
       the bytes it wrote into blobs, by source (counters.FILLED_COUNTERS), every byte that landed counted
    <- ServeBlob + the blob's fill fd (opened before the blob was marked, so its writes raise no fanotify
       events; a worker must never write the blob through any other fd)
    <- Forget                          the blob is complete or unregistered: drop it
    <- Fill                            -> Written (per verified piece, merged), then FillDone | FillFailed
    <- Cancel                          nobody waits for it any more
The worker only writes holes (SEEK_HOLE), so bytes a reader may already see are never rewritten.
Written ranges are reported once per turn of the loop, adjacent ones merged, except the piece that ends a
task's range: its FillDone follows at once (a one-piece fill costs one message, not two).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from afsd.ondemand import _daemon
from afsd.ondemand.fanotify.counters import FILLED_COUNTERS, source_kind
from afsd.ondemand._wire import AsyncChannel, ProtocolError
from afsd.ondemand.sources import SourceFactory, fill_from, preload_sources, worker_sources
from afsd.ondemand.sinks import FdSink, hole_sink
from afsd.ondemand.spec import BlobSpec, Priority, RangeSource
from afsd.ondemand.supervised import protocol as p

log = logging.getLogger("afsd.fanotify.worker")


# RangeFetcher.stats() keys -> the names the supervisor counts them under (sent with each heartbeat).
FETCH_COUNTERS = {"failovers": "fetch_failovers", "verification_failures": "fetch_verification_failures"}


@dataclass(eq=False)
class WorkerBlob:
    name: str
    spec: BlobSpec
    sink: FdSink
    config: dict[str, Any]
    source: RangeSource | None = None
    counted: dict[str, int] = field(default_factory=dict)   # the source's fetch counters already reported
    forgotten: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    written: list[tuple[int, int]] = field(default_factory=list)   # ranges written, not yet reported
    fills: dict[int, tuple[int, int]] = field(default_factory=dict)   # task id -> its range, while it runs
    source_kind: str = ""   # where its bytes come from now ("local", "peer", "other"; "" not known yet)


class FetchWorker:
    def __init__(self, socket_path: str, heartbeat: float, factory: SourceFactory) -> None:
        self.socket_path = socket_path
        self.heartbeat = heartbeat
        self.blobs: dict[str, WorkerBlob] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}      # fills, by task id
        self.chores: set[asyncio.Task[None]] = set()        # forgetting blobs, reporting: kept, awaited at exit
        self.factory = factory
        self.channel: AsyncChannel | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.unreported: dict[str, WorkerBlob] = {}         # blobs with written ranges to report
        # totals, this process: the fetch counters and the bytes written into blobs
        self.counted: dict[str, int] = dict.fromkeys([*FETCH_COUNTERS.values(), *FILLED_COUNTERS], 0)

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.channel = await AsyncChannel.connect(self.socket_path)
        await self.channel.send(p.Hello(role=p.Role.FETCH_WORKER).to_json())
        beats = asyncio.create_task(self._heartbeats())
        self._chore(preload_sources(self.factory, log))
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
        if now.get("source"):   # the provider the fetcher reads from now: where the next bytes come from
            blob.source_kind = source_kind(now["source"])
        for key, name in FETCH_COUNTERS.items():
            self.counted[name] += int(now.get(key, 0)) - blob.counted.get(key, 0)
            blob.counted[key] = int(now.get(key, 0))

    def _handle(self, message: p.Message, fds: list[int]) -> None:
        if isinstance(message, p.ServeBlob) and fds:
            old = self.blobs.pop(message.name, None)
            if old is not None:
                self._chore(self._forget(old))
            name, fd = message.name, fds.pop(0)
            served: list[WorkerBlob] = []   # (the sink's writes count for this blob even once it is dropped)
            sink = hole_sink(fd, message.spec.size,
                             lambda offset, length, written: self._written_soon(served[0], offset, length, written))
            served.append(WorkerBlob(name, message.spec, sink, message.source))
            self.blobs[name] = served[0]
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
                blob.fills[message.task] = (message.offset, message.offset + message.length)
                task.add_done_callback(lambda t, i=message.task, b=blob: (self.tasks.pop(i, None), b.tasks.discard(t),
                                                                          b.fills.pop(i, None)))
        elif isinstance(message, p.Cancel):
            task = self.tasks.get(message.task)
            if task is not None:
                task.cancel()
        for fd in fds:
            os.close(fd)

    async def _fill(self, task_id: int, blob: WorkerBlob, offset: int, length: int, priority: Priority) -> None:
        try:
            if blob.forgotten:
                raise RuntimeError(f"blob {blob.name} was dropped")
            if blob.source is None:
                blob.source = self.factory.make(blob.spec, blob.config)
            filled = await fill_from(blob.source, offset, length, priority, blob.sink)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported; the supervisor fails the waiting reads (EIO)
            log.error("blob %s: fill of bytes %d-%d failed: %s", blob.name, offset, offset + length, e)
            await self._report(p.FillFailed(task=task_id, error=str(e) or type(e).__name__))
            return
        blob.source_kind = source_kind(filled.source)
        await self._report(p.FillDone(task=task_id, written=filled.written, source=filled.source))

    # -- written ranges: reported as they land, merged, once per turn of the loop ---------------------

    def _written_soon(self, served: WorkerBlob, offset: int, length: int, written: int) -> None:
        """From a writing thread: `length` bytes at `offset` of blob `served` are in the blob file, `written`
        of them put there by this write."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._written, served, offset, length, written)

    def _written(self, served: WorkerBlob, offset: int, length: int, written: int) -> None:
        self._count_written(served, written)
        blob = self.blobs.get(served.name)
        if blob is None or blob.forgotten:
            return
        if any(start <= offset and offset + length >= end for start, end in blob.fills.values()):
            return   # the last piece of a fill: its FillDone, which follows at once, says it
        if blob.written and blob.written[-1][0] + blob.written[-1][1] == offset:
            blob.written[-1] = (blob.written[-1][0], blob.written[-1][1] + length)
        else:
            blob.written.append((offset, length))
        if not self.unreported:
            asyncio.get_running_loop().call_soon(self._report_all_written)
        self.unreported[served.name] = blob

    def _count_written(self, blob: WorkerBlob, written: int) -> None:
        """Count bytes this worker wrote into `blob`'s file, by where they came from (the provider its source
        reads from: known from the source's label, its fetcher's current provider or the last fill's
        source). Counted even once the blob was dropped (a fill cancelled as its blob became whole sends
        no FillDone): the bytes are in the file."""
        if not written:
            return
        if not blob.source_kind and blob.source is not None:
            stats = getattr(blob.source, "stats", None)
            label = getattr(blob.source, "label", "") or (stats().get("source") if stats is not None else "")
            blob.source_kind = source_kind(label) if label else ""
        self.counted["bytes_filled"] += written
        self.counted[f"bytes_filled_{blob.source_kind or 'other'}"] += written

    def _report_all_written(self) -> None:
        blobs, self.unreported = list(self.unreported.values()), {}
        for blob in blobs:
            self._report_written(blob)

    def _report_written(self, blob: WorkerBlob) -> None:
        ranges, blob.written = blob.written, []
        for offset, length in ranges:
            self._chore(self._report(p.Written(name=blob.name, offset=offset, length=length)))

    async def _forget(self, blob: WorkerBlob) -> None:
        blob.forgotten = True
        self._count_fetches(blob)
        for task in list(blob.tasks):
            task.cancel()
        blob.sink.close()
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
