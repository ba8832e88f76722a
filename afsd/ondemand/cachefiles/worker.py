"""The fscache worker: answers the kernel's cachefiles requests for erofs blobs mounted in fscache mode.

Where it sits: kernel -> /dev/cachefiles (fd inherited from the supervisor) -> this request loop:
    OPEN  (volume "erofs,<domain or fsid>", cookie = the blob's name, an anon fd)
          -> ask the supervisor for the blob's registration -> `copen <id>,<exact size>` (or -ENOENT)
          -> if the cache file is not whole yet: its learned ranges, then (prefetch on) every hole, in the
             background (prefetch.py)
    READ  (object, offset, length) -> widen to aligned units (settings.read_unit, whole chunks, never past
          the blob's end; a unit being filled already is waited for, and a sequential reader gets the
          units after its own filled before it asks: readahead.py) -> RangeSource.fetch (verified against
          the blob's chunk digests; the cluster's RangeFetcher fails over between layerstores) -> pwrite
          through the anon fd (C shim, no GIL, in a writer thread) -> CACHEFILES_IOC_READ_COMPLETE, ALWAYS:
          without data only when every source failed (the reader then gets EIO, never a hang)
    CLOSE -> close the object's anon fd (once no fetch or write still uses it)
A blob registered with a `copy_path` also gets a plain copy of every verified range (copy.py).
The loop only reads requests and starts tasks: fetches run concurrently on the event loop, writes in
threads. When the worker is told to stop (SIGTERM: an upgrade) or dies, it answers nothing more; the
supervisor starts a successor that writes `restore`, so the kernel hands it whatever was unanswered.
This process is the "kernel worker" (it reads and answers /dev/cachefiles and owns the anon fds); its
supervisor only holds the device open.

Messages on the supervisor's socket (afsd/ondemand/supervised/protocol.py):
    -> Hello(KERNEL_WORKER), a Heartbeat with the counters' totals every `heartbeat` s, BlobComplete (the
       cache file is whole), CopyComplete (so is the copy)
    -> Lookup                   <- Reply with the blob's Registration (None: nobody registered it)
    <- Report                   -> Reply with a WorkerReport
    <- TraceRequest             -> Reply with the recording of a blob's first READs (afsd/ondemand/trace.py)
    <- Forget                   the blob was unregistered: stop writing its copy; drop its source once
                                its objects close
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import errno
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from afsd.ondemand import _daemon
from afsd.ondemand._wire import AsyncChannel, ProtocolError
from afsd.ondemand.cachefiles import _shim
from afsd.ondemand.cachefiles.copy import BlobCopy, Copies
from afsd.ondemand.cachefiles.prefetch import BackgroundFill
from afsd.ondemand.cachefiles.readahead import BlobFills, ReadFills
from afsd.ondemand.cachefiles.counters import WORKER_COUNTERS
from afsd.ondemand.cachefiles.settings import Settings
from afsd.ondemand.sinks import FdSink
from afsd.ondemand.sources import LocalFileSource, fill_from, preload_sources, worker_sources
from afsd.ondemand.sparse import first_hole, present_bytes
from afsd.ondemand.spec import BlobSpec, FetchedRange, Priority, RangeSource
from afsd.ondemand.supervised import protocol as p
from afsd.ondemand.trace import LearnedPrefetch, TraceRecorder

log = logging.getLogger("afsd.fscache.worker")

PAGE = 4096
LOOKUP_TIMEOUT = 30.0
ATTACH_WAIT = 10.0          # seconds to retry ENOBUFS right after copen (the backing file is being attached)
DRAIN_BATCH = 64            # requests taken per wake-up before other work gets a turn


def round_up(value: int, unit: int = PAGE) -> int:
    return -(-value // unit) * unit


@dataclass(eq=False)
class ServedBlob:
    name: str
    spec: BlobSpec
    config: dict[str, Any]
    prefetch: bool
    complete: bool = False
    source: RangeSource | None = None
    objects: set[OpenObject] = field(default_factory=set)
    prefetcher: asyncio.Task[None] | None = None
    unit: int = 0           # bytes one miss is widened to: settings.read_unit in whole chunks
    forgotten: bool = False
    filled_bytes: int = 0
    copy: BlobCopy | None = None
    copier: asyncio.Task[None] | None = None   # filling the copy's holes from the source
    recorder: TraceRecorder | None = None      # its first READs, for the cluster to learn
    learned: LearnedPrefetch | None = None     # what the cluster learned readers read first: fetched first
    fills: BlobFills = field(default_factory=BlobFills)   # fills in flight by unit; its sequential readers


@dataclass(eq=False)
class OpenObject:
    object_id: int
    fd: int
    blob: ServedBlob
    users: int = 0          # fetches/writes/completions that still need fd
    closed: bool = False    # CLOSE arrived (or the worker stops): fd goes when users reach 0
    whole: bool = False     # a fill's write found the cache file without holes (set in the writing thread)
    sink: FdSink = field(init=False)   # fills write through it; it closes fd once no write is in progress

    def __post_init__(self) -> None:
        self.sink = FdSink(self.fd, self.blob.spec.size, self._put)

    def _put(self, fd: int, offset: int, data: memoryview) -> int:
        """In a source's thread: verified bytes into the cache file (and first into the blob's copy)."""
        written, whole = write_and_check(fd, data, offset, self.blob.spec.size, self.blob.copy)
        self.whole = self.whole or whole
        return written

    def close_fd(self) -> None:
        if self.fd >= 0:
            self.sink.close()
            self.fd = -1


class KernelWorker:
    def __init__(self, device_fd: int, socket_path: str, settings: Settings, *, restore: bool) -> None:
        self.device_fd = device_fd
        self.socket_path = socket_path
        self.settings = settings
        self.restore = restore
        self.reader = _shim.RequestReader(device_fd)
        self.objects: dict[int, OpenObject] = {}
        self.blobs: dict[str, ServedBlob] = {}
        self.factory = worker_sources(settings.sources, settings.sources_path, log)
        self.writer = concurrent.futures.ThreadPoolExecutor(settings.writer_threads, thread_name_prefix="cache-write")
        self.tasks: set[asyncio.Task[None]] = set()
        self.counters: dict[str, int] = dict.fromkeys(WORKER_COUNTERS, 0)
        self.reads_in_flight = 0
        self.lookups: dict[int, asyncio.Future[p.Reply]] = {}
        self.copies = Copies(self.writer, self._fetch, self._spawn, self._copy_completed)
        self.read_fills = ReadFills(self._fill, self._release, self.tasks, self.counters,
                                    window=settings.stream_window, inflight=settings.ahead_inflight)
        self.next_id = 1
        self.stopping = asyncio.Event()
        self.channel: AsyncChannel | None = None

    # == lifecycle ==================================================================================

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        self.channel = await AsyncChannel.connect(self.socket_path)
        await self.channel.send(p.Hello(role=p.Role.KERNEL_WORKER).to_json())
        helpers = [asyncio.create_task(self._receive()), asyncio.create_task(self._heartbeats()),
                   asyncio.create_task(preload_sources(self.factory, log))]
        if self.restore:
            # Requests our predecessor read but did not answer are delivered again (Linux 6.8+).
            os.write(self.device_fd, b"restore")
            self.counters["restores"] += 1
            log.info("restored the requests a previous worker left unanswered")
        loop.add_reader(self.device_fd, self._on_device_readable)
        try:
            await self.stopping.wait()
        finally:
            loop.remove_reader(self.device_fd)
            await self._stop(helpers)

    def _on_sigterm(self) -> None:
        log.info("asked to stop: unanswered requests are left to the next worker")
        self.stopping.set()

    async def _stop(self, helpers: list[asyncio.Task[None]]) -> None:
        """Leave unanswered requests to the successor: cancelled READs are not completed."""
        for task in [*self.tasks, *helpers]:
            task.cancel()
        await asyncio.gather(*self.tasks, *helpers, return_exceptions=True)
        await asyncio.to_thread(self.writer.shutdown, wait=True)
        for obj in self.objects.values():
            obj.close_fd()
        for blob in self.blobs.values():
            if blob.copy is not None:
                blob.copy.close()
            if blob.source is not None:
                try:
                    await asyncio.wait_for(blob.source.close(), 5.0)
                except Exception as e:  # noqa: BLE001 - best effort at exit
                    log.warning("closing the source of blob %s: %s", blob.name, e)
        try:
            await asyncio.wait_for(self.factory.close(), 5.0)
        except Exception as e:  # noqa: BLE001 - best effort at exit
            log.warning("closing the source channels: %s", e)
        if self.channel is not None:
            self.channel.close()

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("request task failed: %r", task.exception(), exc_info=task.exception())

    # == the request loop ============================================================================

    def _on_device_readable(self) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                request = self.reader.next()
            except OSError as e:
                if e.errno == errno.EBADMSG:   # the shim closed a malformed OPEN's anon fd and failed it
                    log.error("%s: failed it (a malformed OPEN's mount fails)", e)
                    continue
                log.error("%s", e)
                if e.errno == errno.EIO:   # the cache is dead (its backing filesystem failed): nothing to serve
                    self.stopping.set()
                return
            if request is None:
                return     # drained (not EOF: the device never ends)
            self._dispatch(request)

    def _dispatch(self, request: _shim.Request) -> None:
        counter = f"requests_{_shim.OPCODE_NAMES.get(request.opcode, 'other')}"
        self.counters[counter] = self.counters.get(counter, 0) + 1
        if request.opcode == _shim.OP_OPEN:
            self._spawn(self._open(request))
        elif request.opcode == _shim.OP_READ:
            obj = self.objects.get(request.object_id)
            if obj is None:
                # Cannot be answered (the ioctl needs the object's anon fd). Only happens if anon fds crossed
                # process boundaries, which we never do; a re-OPEN precedes reads of objects we do not hold.
                self.counters["reads_orphaned"] += 1
                log.error("READ %d for object %d, which this worker never opened", request.msg_id, request.object_id)
                return
            obj.users += 1
            self.reads_in_flight += 1
            self._spawn(self._read(obj, request))
        elif request.opcode == _shim.OP_CLOSE:
            obj = self.objects.pop(request.object_id, None)
            if obj is not None:
                self._close(obj)
        else:
            log.error("unknown request opcode %d (message %d)", request.opcode, request.msg_id)

    # -- OPEN --------------------------------------------------------------------------------------

    async def _open(self, request: _shim.Request) -> None:
        name = request.cookie_key.decode("ascii", errors="replace")
        try:
            blob = await self._blob(name)
        except Exception as e:  # noqa: BLE001 - the OPEN fails; the mount says so
            log.error("OPEN of %s: cannot look the blob up: %s", name, e)
            blob = None
        if blob is None:
            self.counters["opens_unknown"] += 1
            log.error("OPEN of %s (volume %s): no such blob is registered: failing it with ENOENT", name,
                      request.volume_key.decode("ascii", errors="replace"))
            os.close(request.anon_fd)
            self._copen(request.msg_id, -errno.ENOENT)
            return
        obj = OpenObject(request.object_id, request.anon_fd, blob)
        self.objects[obj.object_id] = obj
        blob.objects.add(obj)
        if not self._copen(request.msg_id, blob.spec.size):
            self.counters["opens_failed"] += 1
            self.objects.pop(obj.object_id, None)
            self._close(obj)
            return
        log.info("opened blob %s as object %d (%d bytes)", name, obj.object_id, blob.spec.size)
        obj.users += 1
        try:
            await self._after_open(obj)
        finally:
            self._release(obj)

    def _copen(self, msg_id: int, size: int) -> bool:
        try:
            os.write(self.device_fd, f"copen {msg_id},{size}".encode())
            return True
        except OSError as e:
            log.error("copen %d,%d failed: %s", msg_id, size, e.strerror)
            return False

    async def _blob(self, name: str) -> ServedBlob | None:
        """The blob registered as `name`, as the supervisor knows it (it holds the registrations)."""
        known = self.blobs.get(name)
        if known is not None and not known.forgotten:
            return known
        registration = (await self._ask(p.Lookup(name=name))).registration
        if registration is None:
            return None
        spec, copy_path = registration.spec, registration.copy_path
        if known is not None and known.spec.blob_digest == spec.blob_digest:   # unregistered, then again
            known.forgotten = False
            known.config, known.prefetch = registration.source, registration.prefetch
            known.copy = BlobCopy(copy_path, spec.size) if copy_path else None   # (forget retired the old one)
            return known
        blob = self.blobs[name] = ServedBlob(
            name, spec, registration.source, registration.prefetch,
            unit=max(spec.chunk_size, round_up(self.settings.read_unit, spec.chunk_size)),
            copy=BlobCopy(copy_path, spec.size) if copy_path else None)
        if registration.record > 0:
            blob.recorder = TraceRecorder(spec.size, registration.record)
        if registration.learned:
            blob.learned = LearnedPrefetch.plan([(int(o), int(n)) for o, n in registration.learned], size=spec.size,
                                                chunk_size=blob.unit, task_chunks=1)
            self.counters["learned_blobs"] += 1
        return blob

    async def _after_open(self, obj: OpenObject) -> None:
        blob = obj.blob
        try:
            whole = await self._until_attached(lambda: first_hole(obj.fd, 0, blob.spec.size) is None, obj)
        except OSError as e:   # READs still work; only prefetch and the completeness check wait
            log.warning("blob %s: cannot inspect its cache file after OPEN: %s", blob.name, e)
            return
        if whole:
            self._mark_complete(blob)
            self.copies.complete_soon(blob)   # (already complete in this worker: the copy may be new)
            return
        recorder = blob.recorder
        if recorder is not None and await asyncio.to_thread(present_bytes, obj.fd, blob.spec.size) \
                and recorder.opened_at is None:   # (bytes that a READ since brought in are no reason)
            recorder.spoil()   # bytes cached before this OPEN will raise no READ
        if (blob.prefetch or blob.learned is not None) and blob.prefetcher is None:
            blob.prefetcher = self._spawn(self._prefetch(blob))

    async def _prefetch(self, blob: ServedBlob) -> None:
        try:
            await BackgroundFill(blob, fill=self._fill, until_attached=self._until_attached, release=self._release,
                                 on_whole=self._mark_complete, inflight=self.settings.prefetch_inflight,
                                 learned_inflight=self.settings.learned_inflight, counters=self.counters).run()
        finally:
            blob.prefetcher = None

    async def _until_attached(self, probe: Any, obj: OpenObject) -> Any:
        """Run `probe` in a thread, retrying ENOBUFS: right after copen the kernel may still be attaching
        the object's backing file (docs/kernel-protocols.md)."""
        deadline = asyncio.get_running_loop().time() + ATTACH_WAIT
        while True:
            try:
                return await asyncio.to_thread(probe)
            except OSError as e:
                if e.errno != errno.ENOBUFS or obj.closed or asyncio.get_running_loop().time() > deadline:
                    raise
            await asyncio.sleep(0.05)

    # -- READ --------------------------------------------------------------------------------------

    async def _read(self, obj: OpenObject, request: _shim.Request) -> None:
        """Fill the missed range and ALWAYS complete the request (unless this worker is stopping)."""
        blob = obj.blob
        start = request.offset - request.offset % PAGE
        end = min(round_up(request.offset + request.length), round_up(blob.spec.size))
        if blob.recorder is not None:
            blob.recorder.observe(start, end, time.monotonic())
        try:
            try:
                if start >= blob.spec.size:
                    raise ValueError(f"READ at {request.offset} is past the end of the blob ({blob.spec.size} bytes)")
                await self.read_fills.fill(obj, start, end)
            except asyncio.CancelledError:
                raise   # this worker is stopping: the request stays for its successor (restore)
            except Exception as e:  # noqa: BLE001 - answered without data: the reader gets EIO
                self.counters["reads_failed"] += 1
                log.error("READ %d of blob %s bytes %d-%d failed, the reader gets EIO: %s", request.msg_id,
                          blob.name, start, end, e)
            try:
                _shim.read_complete(obj.fd, request.msg_id)
            except OSError as e:
                log.error("%s (blob %s)", e, blob.name)
        finally:
            self.reads_in_flight -= 1
            self._release(obj)

    async def _fill(self, obj: OpenObject, start: int, end: int, priority: Priority) -> int:
        """Fill [start, end), widened to whole units, into the cache file (each verified piece written as it
        arrives, through the object's sink); bytes written."""
        blob = obj.blob
        unit, size = blob.unit, blob.spec.size
        first, last = start - start % unit, min(size, round_up(end, unit))
        if priority != Priority.DEMAND and blob.recorder is not None and blob.recorder.is_open(time.monotonic()):
            blob.recorder.spoil()   # reads of what this writes will raise no READ
        filled = await fill_from(self._source(blob), first, last - first, priority, obj.sink)
        filled.require_covers(start, min(end, size))
        blob.filled_bytes += filled.written
        self.counters["bytes_prefetch" if priority == Priority.PREFETCH else "bytes_demand"] += filled.written
        if obj.whole:
            self._mark_complete(blob)
        return filled.written

    async def _fetch(self, blob: ServedBlob, start: int, end: int, priority: Priority) -> FetchedRange:
        """[start, end) of the blob from its source (verified there), starting on a page boundary."""
        fetched = await self._source(blob).fetch(start, end - start, priority)
        if fetched.offset % PAGE:
            raise ValueError(f"the source returned a range at {fetched.offset}, not on a page boundary")
        return fetched

    def _source(self, blob: ServedBlob) -> RangeSource:
        if blob.source is None:
            blob.source = self.factory.make(blob.spec, blob.config)
            if isinstance(blob.source, LocalFileSource):
                # Read the local copy past the page cache: the kernel keeps what readers read in the
                # erofs page cache and the cache file is written with O_DIRECT, so a buffered read would
                # only add a third copy of each byte to memory and a kernel copy to every fill (in the
                # lab VM a cold 256 MiB read takes 2.08 CPU seconds buffered, 0.22 with O_DIRECT).
                blob.source.direct = True
        return blob.source

    def _mark_complete(self, blob: ServedBlob) -> None:
        if blob.complete:
            return
        blob.complete = True
        self.counters["blobs_completed"] += 1
        log.info("blob %s is complete in the cache", blob.name)
        self._spawn(self._send(p.BlobComplete(name=blob.name)))
        self.copies.complete_soon(blob)

    def _copy_completed(self, blob: ServedBlob) -> None:
        self._spawn(self._send(p.CopyComplete(name=blob.name)))

    # -- CLOSE -------------------------------------------------------------------------------------

    def _close(self, obj: OpenObject) -> None:
        obj.closed = True
        blob = obj.blob
        blob.objects.discard(obj)
        if not blob.objects:
            if blob.prefetcher is not None:
                blob.prefetcher.cancel()
            self.read_fills.stop(blob)
            self.copies.stop(blob)
            if blob.forgotten:
                self._drop(blob)
        self._release(obj, 0)

    def _release(self, obj: OpenObject, count: int = 1) -> None:
        obj.users -= count
        if obj.closed and obj.users == 0:
            obj.close_fd()

    def _drop(self, blob: ServedBlob) -> None:
        if self.blobs.get(blob.name) is blob:
            del self.blobs[blob.name]
        if blob.source is not None:
            self._spawn(close_quietly(blob.source, blob.name))
            blob.source = None

    # == the supervisor link =========================================================================

    @property
    def link(self) -> AsyncChannel:
        """The connection to the supervisor (made first thing in `run`)."""
        if self.channel is None:
            raise RuntimeError("the worker is not connected to its supervisor yet")
        return self.channel

    async def _receive(self) -> None:
        while (item := await self.link.receive()) is not None:
            try:
                self._on_message(p.parse(item[0]))
            except ProtocolError as e:
                log.error("the supervisor sent a malformed message: %s", e)
        log.info("the supervisor closed our link: stopping")
        self.stopping.set()

    def _on_message(self, message: p.Message) -> None:
        if isinstance(message, p.Reply):
            future = self.lookups.pop(message.id, None)
            if future is not None and not future.done():
                future.set_result(message)
        elif isinstance(message, p.Report):
            self._spawn(self._send(p.Reply(id=message.id, report=self.report())))
        elif isinstance(message, p.TraceRequest):
            blob = self.blobs.get(message.name)
            trace = None if blob is None or blob.recorder is None else \
                blob.recorder.take(time.monotonic(), close=message.close)
            self._spawn(self._send(p.Reply(id=message.id, trace=trace)))
        elif isinstance(message, p.Forget):
            blob = self.blobs.get(message.name)
            if blob is not None:
                blob.forgotten = True
                self.copies.retire(blob)
                if not blob.objects:
                    self._drop(blob)

    async def _ask(self, message: p.Message) -> p.Reply:
        request_id, self.next_id = self.next_id, self.next_id + 1
        future = self.lookups[request_id] = asyncio.get_running_loop().create_future()
        try:
            await self._send(message, request_id)
            return await asyncio.wait_for(future, LOOKUP_TIMEOUT)
        finally:
            self.lookups.pop(request_id, None)

    async def _send(self, message: p.Message, request_id: int | None = None) -> None:
        frame = message.to_json() if request_id is None else message.to_json() | {"id": request_id}
        try:
            await self.link.send(frame)
        except OSError:
            self.stopping.set()

    async def _heartbeats(self) -> None:
        while True:
            await self._send(p.Heartbeat(tasks=self.reads_in_flight, counters=dict(self.counters),
                                         fetch=self.factory.metrics()))
            await asyncio.sleep(self.settings.heartbeat)

    def report(self) -> p.WorkerReport:
        blobs = {}
        for name, blob in self.blobs.items():
            present = None
            obj = next(iter(blob.objects), None)
            if obj is not None and obj.fd >= 0 and not blob.complete:
                try:
                    present = present_bytes(obj.fd, blob.spec.size)
                except OSError:
                    pass
            stats = getattr(blob.source, "stats", None)
            blobs[name] = p.BlobReport(
                open_objects=len(blob.objects), complete=blob.complete, filled_bytes=blob.filled_bytes,
                present_bytes=present, copy_complete=bool(blob.copy and blob.copy.complete),
                copy_error=blob.copy.error if blob.copy else "", fetcher=stats() if callable(stats) else {},
                learned=blob.learned.details(reads_seen=False) if blob.learned is not None else {})
        return p.WorkerReport(counters=dict(self.counters), fetch=self.factory.metrics(), blobs=blobs,
                              open_objects=len(self.objects), reads_in_flight=self.reads_in_flight)


# == helpers that run in writer threads ===============================================================

def write_and_check(fd: int, data: bytes | memoryview, offset: int, size: int,
                    copy: BlobCopy | None = None) -> tuple[int, bool]:
    """Write `data` at `offset` into an object's cache file, and first into the blob's `copy`; (bytes
    written, whether the cache file is now whole)."""
    if copy is not None:
        # Copy first: then a whole cache file means every byte this worker put there is in the copy too
        # (unless a copy write failed, which the completion fill repairs).
        copy.tee(data, offset)
    written = _shim.pwrite_aligned(fd, data, offset)
    return written, first_hole(fd, 0, size) is None


async def close_quietly(source: RangeSource, name: str) -> None:
    try:
        await asyncio.wait_for(source.close(), 5.0)
    except Exception as e:  # noqa: BLE001 - best effort
        log.warning("closing the source of blob %s: %s", name, e)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m afsd.ondemand.cachefiles.worker")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--device-fd", type=int, required=True)
    parser.add_argument("--restore", action="store_true", help="re-deliver what a previous worker left (restore)")
    Settings.add_arguments(parser)
    args = parser.parse_args(argv)
    if not _daemon.die_with_parent():   # the cache dies with the supervisor: so do we
        return 0
    _daemon.setup_logging("fscache-kernel-worker")
    _daemon.set_fd_limit()   # as many open blobs (one anon fd each) as this process may have
    asyncio.run(KernelWorker(args.device_fd, args.socket, Settings.from_namespace(args), restore=args.restore).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
