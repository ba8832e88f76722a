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

Control protocol on DIR/supervisor.sock (framed JSON, afsd/ondemand/_wire.py; root only), one
reply per request: register {spec, source, prefetch, copy_path}  unregister {name, force}  status
restart-worker  shutdown {force}. `copy_path` (optional, "" for none) is a plain file the worker keeps
a copy of the blob's verified bytes in (see worker.py). The worker connects to the same socket.
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
from afsd.ondemand._wire import AsyncChannel, peer_pid
from afsd.ondemand.cachefiles.counters import SUPERVISOR_COUNTERS, WORKER_COUNTERS
from afsd.ondemand.cachefiles.device import BoundCache, CachefilesError, bind_ondemand
from afsd.ondemand.cachefiles.mount import fscache_mounts
from afsd.ondemand.cachefiles.paths import StatePaths
from afsd.ondemand.cachefiles.settings import SUPERVISOR_MODULE, Settings
from afsd.ondemand.spec import BlobSpec
from afsd.ondemand.supervised.settings import supervisor_parser

REPORT_TIMEOUT = 5.0
KEY_BYTES_MAX = 200    # the kernel BUG()s on cookie keys over 252 bytes; keep well below


class RequestError(Exception):
    """A control request that cannot be carried out; the message goes back to the caller."""


@dataclass
class Registration:
    spec: BlobSpec
    source: dict[str, Any]
    prefetch: bool
    copy_path: str = ""      # where the worker also writes the blob's bytes ("": nowhere)
    complete: bool = False   # a worker found (or made) the cache file whole
    present_bytes: int | None = None   # as a worker last counted them (None: not yet; the cache file keeps them)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.spec.name, "spec": self.spec.to_json(), "source": self.source,
                "prefetch": self.prefetch, "copy_path": self.copy_path, "complete": self.complete}


@dataclass(eq=False)
class WorkerProcess:
    process: asyncio.subprocess.Process
    started: float
    channel: AsyncChannel | None = None
    last_report: float = 0.0
    counters: dict[str, float] = field(default_factory=dict)
    replies: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    stop_reason: str = ""    # why we stopped it ("" while we did not)


class Supervisor:
    def __init__(self, paths: StatePaths, settings: Settings, bound: BoundCache) -> None:
        self.paths = paths
        self.settings = settings
        self.bound = bound
        self.log = _daemon.setup_logging("fscache-supervisor")
        self.blobs: dict[str, Registration] = {}
        self.worker: WorkerProcess | None = None
        self.totals = dict.fromkeys(WORKER_COUNTERS, 0)   # of the workers that are gone
        self.restarts = dict.fromkeys(SUPERVISOR_COUNTERS, 0)
        self.started = time.time()
        self.stopped = asyncio.Event()
        self.stopping = False
        self.next_request_id = 1
        self.status_snapshot: dict[str, Any] = {}

    # == the processes ===============================================================================

    async def run(self, listener: socket.socket, *, snapshot_period: float = 0.0) -> None:
        """Serve until `shutdown` (or SIGTERM); `snapshot_period` > 0 refreshes `status_snapshot` (metrics)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopped.set)
        tasks = [asyncio.create_task(self._accept(listener)), asyncio.create_task(self._run_workers())]
        if snapshot_period > 0:
            tasks.append(asyncio.create_task(self._refresh_snapshot(snapshot_period)))
        self.log.info("serving the cachefiles cache %s (tag %s, failover %s)", self.bound.cache_dir,
                      self.bound.tag, "available" if self.bound.failover else "NOT available: kernel < 6.8")
        try:
            await self.stopped.wait()
        finally:
            self.stopping = True
            await self._stop_worker("shutting down")
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
            for name in WORKER_COUNTERS:   # its last report; what it did after that is not counted
                self.totals[name] += worker.counters.get(name, 0)
            if worker.channel is not None:
                worker.channel.close()
            for future in worker.replies.values():
                if not future.done():
                    future.set_exception(RequestError("the worker went away"))
            if self.stopping:
                return
            self.restarts["worker_restarts"] += 1
            if worker.stop_reason == "upgrade":
                self.restarts["worker_upgrades"] += 1
            elif worker.stop_reason == "hung":
                self.restarts["worker_hangs"] += 1
            else:
                self.restarts["worker_deaths"] += 1
            self.log.warning("worker %d exited (%s, status %s); starting a new one that restores pending requests",
                             worker.process.pid, worker.stop_reason or "died", code)
            restore = True
            lived = time.monotonic() - worker.started
            quick_deaths = quick_deaths + 1 if lived < 5.0 and not worker.stop_reason else 0
            if quick_deaths:
                await asyncio.sleep(min(self.settings.restart_backoff, 0.1 * 2 ** quick_deaths))

    async def _refresh_snapshot(self, period: float) -> None:
        while True:
            await self.status()
            await asyncio.sleep(period)

    async def _start_worker(self, restore: bool) -> WorkerProcess:
        command = [sys.executable, "-m", "afsd.ondemand.cachefiles.worker", "--socket",
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
                        and not worker.stop_reason:
                    self.log.error("worker %d sent nothing for %.0f s: killing it", worker.process.pid, since)
                    worker.stop_reason = "hung"
                    worker.process.kill()
        finally:
            if not waiting.done():
                worker.process.kill()
                await waiting

    async def _stop_worker(self, reason: str) -> None:
        worker = self.worker
        if worker is None or worker.process.returncode is not None:
            return
        worker.stop_reason = reason
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
            message, _ = first
            if message.get("op") == "hello" and message.get("role") == "worker":
                await self._serve_worker(channel, peer_pid(sock))
                return
            reply = await self._control(message)
            await channel.send(reply)
            if message.get("op") == "shutdown" and reply["ok"]:
                self.stopped.set()   # after the reply went out
        except OSError:
            pass
        finally:
            channel.close()

    async def _serve_worker(self, channel: AsyncChannel, pid: int) -> None:
        worker = self.worker
        if worker is None or worker.process.pid != pid:
            self.log.error("a process (pid %d) that is not our current worker said hello: ignored", pid)
            return
        worker.channel = channel
        worker.last_report = time.monotonic()
        self.log.info("worker %d is serving", pid)
        while (item := await channel.receive()) is not None:
            message, _ = item
            op = message.get("op")
            worker.last_report = time.monotonic()
            if op == "lookup":
                registration = self.blobs.get(str(message.get("name")))
                await channel.send({"op": "reply", "id": message.get("id"),
                                    "blob": registration.to_json() if registration else None})
            elif op == "stats":
                worker.counters = message.get("counters", {})
            elif op == "complete":
                registration = self.blobs.get(str(message.get("name")))
                if registration is not None and not registration.complete:
                    registration.complete = True
                    self.log.info("blob %s is complete in the cache", registration.spec.name)
            elif op == "reply":
                future = worker.replies.pop(int(message.get("id", 0)), None)
                if future is not None and not future.done():
                    future.set_result(message)

    async def _ask_worker(self, message: dict[str, Any]) -> dict[str, Any] | None:
        worker = self.worker
        if worker is None or worker.channel is None:
            return None
        request_id = self.next_request_id
        self.next_request_id += 1
        future = worker.replies[request_id] = asyncio.get_running_loop().create_future()
        try:
            await worker.channel.send({**message, "id": request_id})
            return await asyncio.wait_for(future, REPORT_TIMEOUT)
        except (TimeoutError, RequestError, OSError):
            return None
        finally:
            worker.replies.pop(request_id, None)

    # == control requests ===========================================================================

    async def _control(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        reply: dict[str, Any] = {"op": "reply", "id": message.get("id"), "ok": True}
        try:
            if op == "register":
                reply["blob"] = self._register(BlobSpec.from_json(message["spec"]), message.get("source") or {},
                                               bool(message.get("prefetch")), str(message.get("copy_path") or ""))
            elif op == "unregister":
                await self._unregister(str(message["name"]), force=bool(message.get("force")))
            elif op == "status":
                reply["status"] = await self.status()
            elif op == "restart-worker":
                await self._stop_worker("upgrade")
            elif op == "shutdown":
                self._check_unused(force=bool(message.get("force")))
            else:
                raise RequestError(f"unknown request {op!r}")
        except RequestError as e:
            reply.update(ok=False, error=str(e))
        except (KeyError, ValueError, TypeError) as e:
            reply.update(ok=False, error=f"malformed {op} request: {e!r}")
        return reply

    def _register(self, spec: BlobSpec, source: dict[str, Any], prefetch: bool, copy_path: str) -> dict[str, Any]:
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
            existing.source, existing.prefetch, existing.copy_path = source, prefetch, copy_path
            return existing.to_json()
        registration = self.blobs[name] = Registration(spec, source, prefetch, copy_path)
        self.log.info("registered blob %s (%d bytes, source %s, prefetch %s, copy %s)", name, spec.size,
                      source.get("kind", "?"), prefetch, copy_path or "none")
        return registration.to_json()

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
                await worker.channel.send({"op": "forget", "name": name})
        self.log.info("unregistered blob %s", name)

    def _check_unused(self, *, force: bool) -> None:
        mounted = fscache_mounts()
        if mounted and not force:
            where = ", ".join(f"{fsid} at {points[0]}" for fsid, points in sorted(mounted.items()))
            raise RequestError(f"erofs mounts in fscache mode still use the cache ({where}): unmount them first "
                               "(stopping now would fail every uncached read of theirs)")

    async def status(self) -> dict[str, Any]:
        worker = self.worker
        report = await self._ask_worker({"op": "report"}) or {}
        if worker is not None and report.get("counters"):
            worker.counters = report["counters"]
        current = report.get("counters") or (worker.counters if worker else {})
        counters = {name: self.totals[name] + current.get(name, 0) for name in WORKER_COUNTERS}
        counters.update(self.restarts)
        in_worker = report.get("blobs", {})
        blobs = []
        for name, registration in self.blobs.items():
            seen = in_worker.get(name, {})
            complete = registration.complete or bool(seen.get("complete"))
            if seen.get("present_bytes") is not None:   # a worker counts only blobs it holds open
                registration.present_bytes = seen["present_bytes"]
            blobs.append({"name": name, "size": registration.spec.size, "prefetch": registration.prefetch,
                          "source": registration.source.get("kind", ""), "complete": complete,
                          "open_objects": seen.get("open_objects", 0), "copy_path": registration.copy_path,
                          "copy_error": seen.get("copy_error", ""),
                          "present_bytes": registration.spec.size if complete else registration.present_bytes,
                          "fetcher": seen.get("fetcher", {})})
        self.status_snapshot = {
            "pid": os.getpid(), "uptime": time.time() - self.started, "cache_dir": str(self.bound.cache_dir),
            "tag": self.bound.tag, "failover": self.bound.failover, "settings": dataclasses.asdict(self.settings),
            "worker": {"pid": worker.process.pid if worker else 0,
                       "state": "ready" if worker and worker.channel else "starting" if worker else "none",
                       "open_objects": report.get("open_objects", 0), "reads_in_flight": report.get("reads_in_flight", 0)},
            "counters": counters, "blobs": blobs}
        return self.status_snapshot


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
