"""The fscache supervisor: holds /dev/cachefiles, keeps the blob registrations, runs the worker.

Data flow:
    reader -> erofs (fscache mode, -o fsid=NAME) -> cachefiles -> request on /dev/cachefiles
    -> worker (worker.py): OPEN -> "lookup NAME" here -> copen; READ -> RangeSource.fetch -> pwrite into
       the object's anon fd -> READ_COMPLETE; CLOSE -> close the anon fd
This process reads no requests and does no I/O for them: it binds the cache (device.py) before it
detaches, so a bind failure is the launcher's one-line error, then keeps the device fd open for as
long as it lives. Because the device stays open, a worker that dies (crash, kill -9, hang, upgrade)
costs no reader an error: the kernel keeps every unanswered request, the supervisor starts a new
worker with the same fd, and that worker writes `restore` (Linux 6.8+) so the requests its
predecessor had read are delivered again; reads of objects whose anon fds died re-OPEN them first.
If this process dies, the cache dies with it (the kernel fails every pending read): mounts must be
made again. It is small and protected from the OOM killer for that reason.

Messages on DIR/supervisor.sock (root only) are afsd/ondemand/supervised/protocol.py's: clients send
Register (`copy_path`, "" for none, is a plain file the worker keeps a copy of the blob's verified bytes
in, see copy.py), Unregister, StatusRequest, Watch (then a BlobComplete per blob whose cache file and copy
became whole), RestartWorker and Shutdown, one Reply each; the kernel worker connects to the same socket
and says Hello.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afsd.errors import AfsdError
from afsd.ondemand import _daemon
from afsd.ondemand._wire import AsyncChannel, ProtocolError, peer_pid
from afsd.ondemand.cachefiles.counters import SUPERVISOR_COUNTERS, WORKER_COUNTERS
from afsd.ondemand.cachefiles.device import BoundCache, CachefilesError, bind_ondemand
from afsd.ondemand.cachefiles.mount import fscache_mounts
from afsd.ondemand.cachefiles.paths import StatePaths
from afsd.ondemand.cachefiles.settings import SUPERVISOR_MODULE, Settings
from afsd.ondemand.spec import BlobSpec
from afsd.ondemand.supervised import protocol as p
from afsd.ondemand.supervised.protocol import DaemonState, Role, StopCause, SupervisorStatus, WorkerState
from afsd.ondemand.supervised.settings import supervisor_parser
from afsd.ondemand.supervised.totals import WorkerTotals

REPORT_TIMEOUT = 5.0
KEY_BYTES_MAX = 200    # the kernel BUG()s on cookie keys over 252 bytes; keep well below
WORKER_MODULE = "afsd.ondemand.cachefiles.worker"


class RequestError(Exception):
    """A control request that cannot be carried out; the message goes back to the caller."""


@dataclass
class Registered:
    spec: BlobSpec
    source: dict[str, Any]
    prefetch: bool
    copy_path: str = ""      # where the worker also writes the blob's bytes ("": nowhere)
    complete: bool = False   # a worker found (or made) the cache file whole
    copy_complete: bool = False        # ... and the copy (a worker said so)
    present_bytes: int | None = None   # as a worker last counted them (None: not yet; the cache file keeps them)
    learned: list[list[int]] = field(default_factory=list)   # (protocol.Register)
    record: float = 0.0

    @property
    def ready(self) -> bool:
        return self.complete and (not self.copy_path or self.copy_complete)

    def registration(self) -> p.Registration:
        return p.Registration(spec=self.spec, source=self.source, prefetch=self.prefetch, copy_path=self.copy_path,
                              complete=self.complete, learned=self.learned, record=self.record)


@dataclass(eq=False)
class WorkerProcess:
    process: asyncio.subprocess.Process
    started: float
    channel: AsyncChannel | None = None
    state: WorkerState = WorkerState.STARTING
    stop_cause: StopCause | None = None       # why we stopped it (None: we did not)
    last_report: float = 0.0
    replies: dict[int, asyncio.Future[p.Reply]] = field(default_factory=dict)


class Supervisor:
    def __init__(self, paths: StatePaths, settings: Settings, bound: BoundCache) -> None:
        self.paths = paths
        self.settings = settings
        self.bound = bound
        self.log = _daemon.setup_logging("fscache-supervisor")
        self.blobs: dict[str, Registered] = {}
        self.worker: WorkerProcess | None = None
        self.reported = WorkerTotals()                    # the workers' counters, over restarts
        self.fetched = WorkerTotals()                     # what their sources counted (afsd_fetch_* on the node)
        self.restarts = dict.fromkeys(SUPERVISOR_COUNTERS, 0)
        self.watchers: set[AsyncChannel] = set()
        self.started = time.time()
        self.state = DaemonState.STARTING
        self.stopped = asyncio.Event()                    # set when the supervisor is to stop
        self.next_request_id = 1
        self.status_snapshot: SupervisorStatus | None = None

    # == the processes ===============================================================================

    async def run(self, listener: socket.socket, *, snapshot_period: float = 0.0) -> None:
        """Serve until `shutdown` (or SIGTERM); `snapshot_period` > 0 refreshes `status_snapshot` (metrics)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopped.set)
        tasks = [asyncio.create_task(self._accept(listener)), asyncio.create_task(self._run_workers())]
        if snapshot_period > 0:
            tasks.append(asyncio.create_task(self._refresh_snapshot(snapshot_period)))
        self.state = DaemonState.SERVING
        self.log.info("serving the cachefiles cache %s (tag %s, failover %s)", self.bound.cache_dir,
                      self.bound.tag, "available" if self.bound.failover else "NOT available: kernel < 6.8")
        try:
            await self.stopped.wait()
        finally:
            self.state = DaemonState.STOPPING
            await self._stop_worker(StopCause.SHUTDOWN)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            listener.close()
            self.paths.supervisor_socket.unlink(missing_ok=True)
            os.close(self.bound.fd)   # with the last anon fd gone, the kernel withdraws the cache
            self.log.info("stopped")

    async def _run_workers(self) -> None:
        """Keep one worker running; a replacement re-delivers what its predecessor left (`restore`)."""
        restore, quick_deaths = False, 0
        while True:
            worker = await self._start_worker(restore)
            code = await self._watch(worker)
            self.worker = None
            self.reported.retire(worker.process.pid)   # its last report; what it did after that is not counted
            self.fetched.retire(worker.process.pid)
            if worker.channel is not None:
                worker.channel.close()
            for future in worker.replies.values():
                if not future.done():
                    future.set_exception(RequestError("the worker went away"))
            if self.state is not DaemonState.SERVING:
                return
            self.restarts["worker_restarts"] += 1
            if worker.stop_cause is StopCause.UPGRADE:
                self.restarts["worker_upgrades"] += 1
            elif worker.stop_cause is StopCause.HUNG:
                self.restarts["worker_hangs"] += 1
            else:
                self.restarts["worker_deaths"] += 1
            cause = worker.stop_cause or StopCause.DIED
            self.log.warning("worker %d exited (%s, status %s); starting a new one that restores pending requests",
                             worker.process.pid, cause.value, code)
            restore = True
            lived = time.monotonic() - worker.started
            quick_deaths = quick_deaths + 1 if lived < 5.0 and worker.stop_cause is None else 0
            if quick_deaths:
                await asyncio.sleep(min(self.settings.restart_backoff, 0.1 * 2 ** quick_deaths))

    async def _refresh_snapshot(self, period: float) -> None:
        while True:
            await self.status()
            await asyncio.sleep(period)

    async def _start_worker(self, restore: bool) -> WorkerProcess:
        command = [sys.executable, "-m", WORKER_MODULE, "--socket",
                   str(self.paths.supervisor_socket), "--device-fd", str(self.bound.fd), *self.settings.to_arguments()]
        if restore and self.bound.failover:
            command.append("--restore")
        process = await asyncio.create_subprocess_exec(*command, pass_fds=(self.bound.fd,),
                                                       stdin=asyncio.subprocess.DEVNULL)
        self.worker = WorkerProcess(process, time.monotonic())
        self.log.info("started worker %d%s", process.pid, " (restore)" if restore else "")
        return self.worker

    async def _watch(self, worker: WorkerProcess) -> int:
        """Wait for the worker to exit; kill it if it stops reporting (a hung request loop)."""
        waiting = asyncio.create_task(worker.process.wait())
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=1.0)
                if done:
                    return waiting.result()
                since = time.monotonic() - (worker.last_report or worker.started)
                if since > self.settings.worker_timeout + (0 if worker.last_report else 60.0) \
                        and worker.stop_cause is None:
                    self.log.error("worker %d sent nothing for %.0f s: killing it", worker.process.pid, since)
                    worker.state, worker.stop_cause = WorkerState.STOPPING, StopCause.HUNG
                    worker.process.kill()
        finally:
            if not waiting.done():
                worker.process.kill()
                await waiting

    async def _stop_worker(self, cause: StopCause) -> None:
        worker = self.worker
        if worker is None or worker.process.returncode is not None:
            return
        worker.state, worker.stop_cause = WorkerState.STOPPING, cause
        worker.process.terminate()   # it stops reading, leaves unanswered requests to its successor
        try:
            await asyncio.wait_for(worker.process.wait(), 10.0)
        except TimeoutError:
            worker.process.kill()
            await worker.process.wait()

    # == connections ================================================================================

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        connections: set[asyncio.Task[None]] = set()
        while True:
            sock, _ = await loop.sock_accept(listener)
            task = asyncio.create_task(self._serve_connection(AsyncChannel(sock), sock))
            connections.add(task)
            task.add_done_callback(connections.discard)

    async def _serve_connection(self, channel: AsyncChannel, sock: socket.socket) -> None:
        try:
            first = await channel.receive()
            if first is None:
                return
            try:
                message = p.parse(first[0])
            except ProtocolError as e:
                request_id = first[0].get("id")
                await channel.send(p.Reply(id=request_id if type(request_id) is int else 0, ok=False,
                                           error=f"malformed request: {e}").to_json())
                return
            if isinstance(message, p.Hello) and message.role is Role.KERNEL_WORKER:
                await self._serve_worker(channel, peer_pid(sock))
                return
            reply = await self._control(message)
            await channel.send(reply.to_json())
            if isinstance(message, p.Shutdown) and reply.ok:
                self.stopped.set()   # after the reply went out
            elif isinstance(message, p.Watch):
                await self._serve_watcher(channel)
        except OSError:
            pass
        finally:
            channel.close()

    async def _serve_watcher(self, channel: AsyncChannel) -> None:
        """Keep a watcher's connection until it closes it; `_announce` writes to it meanwhile."""
        self.watchers.add(channel)
        try:
            while await channel.receive() is not None:
                pass
        finally:
            self.watchers.discard(channel)

    async def _announce(self, registered: Registered) -> None:
        """Tell every watcher that a blob is ready (its cache file whole, and its copy if it has one)."""
        message = p.BlobComplete(name=registered.spec.name, path=registered.copy_path).to_json()
        for channel in list(self.watchers):
            with contextlib.suppress(OSError):
                await channel.send(message)

    async def _serve_worker(self, channel: AsyncChannel, pid: int) -> None:
        worker = self.worker
        if worker is None or worker.process.pid != pid:
            self.log.error("a process (pid %d) that is not our current worker said hello: ignored", pid)
            return
        worker.channel, worker.state = channel, WorkerState.READY
        worker.last_report = time.monotonic()
        self.log.info("worker %d is serving", pid)
        while (item := await channel.receive()) is not None:
            worker.last_report = time.monotonic()
            try:
                message = p.parse(item[0])
            except ProtocolError as e:
                self.log.error("worker %d sent a malformed message: %s", pid, e)
                continue
            if isinstance(message, p.Lookup):
                registered = self.blobs.get(message.name)
                reply = p.Reply(id=message.id, registration=registered.registration() if registered else None)
                await channel.send(reply.to_json())
            elif isinstance(message, p.Heartbeat):
                self.reported.report(pid, message.counters)
                self.fetched.report(pid, message.fetch)
            elif isinstance(message, (p.BlobComplete, p.CopyComplete)):
                await self._completed(message)
            elif isinstance(message, p.Reply):
                future = worker.replies.pop(message.id, None)
                if future is not None and not future.done():
                    future.set_result(message)

    async def _completed(self, message: p.BlobComplete | p.CopyComplete) -> None:
        registered = self.blobs.get(message.name)
        if registered is not None:
            await self._mark(registered, cache=isinstance(message, p.BlobComplete),
                             copy=isinstance(message, p.CopyComplete))

    async def _mark(self, registered: Registered, *, cache: bool, copy: bool) -> None:
        """Note that the cache file (`cache`) or the copy (`copy`) of a blob is whole; tell the watchers
        once both are."""
        was_ready = registered.ready
        if cache and not registered.complete:
            registered.complete = True
            self.log.info("blob %s is complete in the cache", registered.spec.name)
        if copy and registered.copy_path:
            registered.copy_complete = True
        if registered.ready and not was_ready:
            await self._announce(registered)

    async def _ask_worker(self, message: p.Message) -> p.Reply | None:
        worker = self.worker
        if worker is None or worker.channel is None:
            return None
        request_id = self.next_request_id
        self.next_request_id += 1
        future = worker.replies[request_id] = asyncio.get_running_loop().create_future()
        try:
            await worker.channel.send(message.to_json() | {"id": request_id})
            return await asyncio.wait_for(future, REPORT_TIMEOUT)
        except (TimeoutError, RequestError, OSError):
            return None
        finally:
            worker.replies.pop(request_id, None)

    # == control requests ===========================================================================

    async def _control(self, message: p.Message) -> p.Reply:
        reply = p.Reply(id=message.id)
        try:
            if isinstance(message, p.Register):
                reply = p.Reply(id=message.id, blob=self._register(message.spec, message.source, message.prefetch,
                                                                   message.copy_path, message.learned, message.record))
            elif isinstance(message, p.TraceRequest):   # the worker records (it sees the READs)
                answer = await self._ask_worker(message)
                reply = p.Reply(id=message.id, trace=answer.trace if answer is not None else None)
            elif isinstance(message, p.Unregister):
                await self._unregister(message.name, force=message.force)
            elif isinstance(message, p.StatusRequest):
                reply = p.Reply(id=message.id, status=await self.status())
            elif isinstance(message, p.RestartWorker):
                await self._stop_worker(StopCause.UPGRADE)
            elif isinstance(message, p.Shutdown):
                self._check_unused(force=message.force)
            elif not isinstance(message, p.Watch):
                raise RequestError(f"unknown request {message.op!r}")
        except RequestError as e:
            reply = p.Reply(id=message.id, ok=False, error=str(e))
        return reply

    def _register(self, spec: BlobSpec, source: dict[str, Any], prefetch: bool, copy_path: str,
                  learned: list[list[int]], record: float) -> p.BlobStatus:
        name = spec.name
        if not name or len(name.encode()) > KEY_BYTES_MAX or not all(0x21 <= ord(c) < 0x7F and c != "/" for c in name):
            raise RequestError(f"blob name {name!r} cannot be an fscache key: use up to {KEY_BYTES_MAX} printable "
                               "ASCII characters without '/' or spaces")
        existing = self.blobs.get(name)
        if existing is not None:
            if existing.spec.size != spec.size or existing.spec.blob_digest != spec.blob_digest:
                raise RequestError(f"blob {name} is already registered with other contents "
                                   f"({existing.spec.blob_digest}, {existing.spec.size} bytes)")
            # The newer settings serve later OPENs (a worker holding the blob open keeps its own).
            if existing.copy_path != copy_path:
                existing.copy_complete = False
            existing.source, existing.prefetch, existing.copy_path = source, prefetch, copy_path
            existing.learned, existing.record = learned, record
            return self._blob_status(existing, p.BlobReport())
        registered = self.blobs[name] = Registered(spec, source, prefetch, copy_path, learned=learned, record=record)
        self.log.info("registered blob %s (%d bytes, source %s, prefetch %s, copy %s)", name, spec.size,
                      source.get("kind", "?"), prefetch, copy_path or "none")
        return self._blob_status(registered, p.BlobReport())

    async def _unregister(self, name: str, *, force: bool) -> None:
        if name not in self.blobs:
            raise RequestError(f"blob {name} is not registered")
        mounted = fscache_mounts().get(name)
        if mounted and not force:
            raise RequestError(f"blob {name} is still mounted at {', '.join(mounted)}: unmount it first")
        del self.blobs[name]
        worker = self.worker
        if worker is not None and worker.channel is not None:
            with contextlib.suppress(OSError):
                await worker.channel.send(p.Forget(name=name).to_json())
        self.log.info("unregistered blob %s", name)

    def _check_unused(self, *, force: bool) -> None:
        mounted = fscache_mounts()
        if mounted and not force:
            where = ", ".join(f"{fsid} at {points[0]}" for fsid, points in sorted(mounted.items()))
            raise RequestError(f"erofs mounts in fscache mode still use the cache ({where}): unmount them first "
                               "(stopping now would fail every uncached read of theirs)")

    async def status(self) -> SupervisorStatus:
        worker = self.worker
        answer = await self._ask_worker(p.Report())
        report = answer.report if answer is not None and answer.report is not None else p.WorkerReport()
        if worker is not None and answer is not None and answer.report is not None:
            self.reported.report(worker.process.pid, report.counters)
            self.fetched.report(worker.process.pid, report.fetch)
        counters = {**self.reported.totals(WORKER_COUNTERS), **self.restarts}
        blobs = []
        for name, registered in list(self.blobs.items()):
            seen = report.blobs.get(name, p.BlobReport())
            # (the worker's BlobComplete or CopyComplete may still be on its way)
            await self._mark(registered, cache=seen.complete, copy=seen.copy_complete)
            if seen.present_bytes is not None:   # a worker counts only blobs it holds open
                registered.present_bytes = seen.present_bytes
            blobs.append(self._blob_status(registered, seen))
        workers = [] if worker is None else [p.WorkerStatus(
            pid=worker.process.pid, role=Role.KERNEL_WORKER, state=worker.state, tasks=report.reads_in_flight,
            silent_for=round(time.monotonic() - worker.last_report, 3) if worker.channel else None)]
        self.status_snapshot = SupervisorStatus(
            backend="fscache", pid=os.getpid(), state=self.state, uptime=time.time() - self.started,
            settings=dataclasses.asdict(self.settings), counters={k: float(v) for k, v in counters.items()},
            workers=workers, blobs=blobs, fetch=self.fetched.totals(),
            details={"cache_dir": str(self.bound.cache_dir), "tag": self.bound.tag, "failover": self.bound.failover,
                     "open_objects": report.open_objects, "reads_in_flight": report.reads_in_flight})
        return self.status_snapshot

    def _blob_status(self, registered: Registered, seen: p.BlobReport) -> p.BlobStatus:
        complete = registered.complete
        return p.BlobStatus(
            name=registered.spec.name, size=registered.spec.size, complete=complete,
            present_bytes=registered.spec.size if complete else registered.present_bytes,
            path=registered.copy_path, path_complete=registered.copy_complete, prefetch=registered.prefetch,
            filled_bytes=seen.filled_bytes,
            details={"source": registered.source.get("kind", ""), "open_objects": seen.open_objects,
                     "copy_error": seen.copy_error, "fetcher": seen.fetcher, **seen.learned})


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = supervisor_parser(SUPERVISOR_MODULE, "Hold /dev/cachefiles in on-demand mode and run the worker that "
                               "serves erofs blobs mounted with -o fsid=NAME.", Settings,
                               daemon_help="detach once the cache is bound")
    parser.add_argument("--cache-dir", type=Path, help="cachefiles cache directory (default STATE_DIR/cache)")
    args = parser.parse_args(argv)
    return args, Settings.from_namespace(args)


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    paths = StatePaths(args.state_dir.absolute())
    try:
        paths.ensure()
    except (AfsdError, OSError) as e:
        print(f"afsd fscache: cannot use the state directory {paths.root}: {e}", file=sys.stderr)
        return 1
    lock = _daemon.try_lock(paths.supervisor_lock)
    if lock is None:
        print(f"an fscache supervisor already runs for {paths.root}", file=sys.stderr)
        return 0    # the caller wanted one running: there is one
    # Bind before detaching: what goes wrong here is the launcher's error line (stderr, exit 1).
    try:
        bound = bind_ondemand(args.cache_dir or paths.default_cache_dir, settings.tag)
    except CachefilesError as e:
        print(f"afsd fscache: {e}", file=sys.stderr)
        return 1
    announce = _daemon.detach_if(args.daemon, paths.supervisor_log)
    _daemon.protect_from_oom_killer()
    supervisor = Supervisor(paths, settings, bound)
    # Before announcing: a launcher that saw us start can connect at once.
    listener = paths.listen(paths.supervisor_socket)
    if args.metrics_listen:
        from afsd.ondemand.cachefiles.metrics import StatusCollector
        from afsd.ondemand.supervised.metrics import serve_status_metrics
        serve_status_metrics(args.metrics_listen, StatusCollector(lambda: supervisor.status_snapshot))
    announce(True)
    asyncio.run(supervisor.run(listener, snapshot_period=1.0 if args.metrics_listen else 0.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
