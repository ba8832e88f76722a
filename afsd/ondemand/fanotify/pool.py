"""The fanotify supervisor's fetch workers: start them, take their hello, hand them blobs and fill tasks,
notice when one dies or stops heartbeating, and give its unfinished tasks to another.

Where it sits: supervisor.py owns the events and decides what to fill; this pool owns the worker
processes (its children) and the tasks dispatched to them, and reports each task's end back through
`PoolOwner.task_finished`. A worker's tasks move to another worker only once its process is reaped (its
pidfd is readable): a stopped process could otherwise still write into a blob.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Protocol

from afsd.ondemand._wire import Connection, ProtocolError
from afsd.ondemand.fanotify.links import Links
from afsd.ondemand.fanotify.model import Blob, Task, Worker
from afsd.ondemand.fanotify.paths import StatePaths
from afsd.ondemand.fanotify.settings import Settings
from afsd.ondemand.supervised import protocol as p
from afsd.ondemand.supervised.protocol import DaemonState, Role, StopCause, WorkerState, WorkerStatus
from afsd.ondemand.supervised.totals import WorkerTotals

WORKER_MODULE = "afsd.ondemand.fanotify.worker"
RESPAWN_WINDOW = 30.0        # more than RESPAWN_FREE restarts within this many seconds back off
RESPAWN_FREE = 5
MAX_RESPAWN_DELAY = 5.0
HELLO_TIMEOUT = 15.0         # at least this long to say hello after starting (a loaded machine is slow)


class PoolOwner(Protocol):
    state: DaemonState   # workers lost while the owner is not SERVING are not replaced

    def blobs_to_serve(self) -> Iterable[Blob]:
        """Every blob a new worker must know (those with a fill fd)."""

    def task_finished(self, task: Task, ok: bool, message: p.FillDone | p.FillFailed) -> None:
        """A worker finished `task` (the pool has already released it)."""

    def range_written(self, name: str, offset: int, length: int) -> None:
        """A worker's fill in progress put bytes [offset, offset + length) of blob `name` in place."""


class WorkerPool:
    def __init__(self, paths: StatePaths, settings: Settings, selector: selectors.BaseSelector, links: Links,
                 counters: dict[str, int], owner: PoolOwner, log: logging.Logger) -> None:
        self.paths = paths
        self.settings = settings
        self.selector = selector
        self.links = links
        self.counters = counters
        self.owner = owner
        self.log = log
        self.workers: dict[int, Worker] = {}       # by pid
        self.queue: list[Task] = []                # tasks waiting for a ready worker
        self.reported = WorkerTotals()             # the workers' own counters (fetch failovers, ...)
        self.fetched = WorkerTotals()              # what their sources counted (afsd_fetch_* on the node)
        self._next_id = 1
        self._respawn_times: list[float] = []
        self._spawn_at: float | None = None

    # -- processes ------------------------------------------------------------------------------------

    def start(self) -> None:
        for _ in range(self.settings.workers):
            self._spawn()

    def _spawn(self) -> None:
        command = [sys.executable, "-m", WORKER_MODULE, "--socket", str(self.paths.supervisor_socket),
                   "--heartbeat", str(self.settings.heartbeat), "--sources", self.settings.sources,
                   "--sources-path", self.settings.sources_path]
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, close_fds=True)
        worker = Worker(id=self._next_id, process=process, pidfd=os.pidfd_open(process.pid), started=time.monotonic())
        self._next_id += 1
        self.workers[process.pid] = worker
        self.selector.register(worker.pidfd, selectors.EVENT_READ, lambda _fd, _m, w=worker: self._reap(w))
        self.log.info("started fetch worker %d (pid %d)", worker.id, process.pid)

    @property
    def _replacing(self) -> bool:
        return self.owner.state is DaemonState.SERVING

    def stop_all(self, why: str) -> None:
        """Kill every worker (the owner is no longer SERVING: shutting down or restarting); nothing is
        redispatched and nobody replaced."""
        for worker in list(self.workers.values()):
            self.kill(worker, StopCause.SHUTDOWN, why)

    def wait_all(self) -> None:
        for worker in list(self.workers.values()):
            worker.process.wait()

    def kill(self, worker: Worker, cause: StopCause, why: str) -> None:
        if worker.state is WorkerState.STOPPING:
            return
        worker.state, worker.stop_cause = WorkerState.STOPPING, cause
        (self.log.error if self._replacing else self.log.info)("killing fetch worker %d (pid %d): %s", worker.id,
                                                               worker.process.pid, why)
        try:
            signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._disconnect(worker)

    def _disconnect(self, worker: Worker) -> None:
        if worker.connection is not None:
            self.links.close(worker.connection)
            worker.connection = None

    def _reap(self, worker: Worker) -> None:
        """The worker process is gone (pidfd readable): only now may its fills go to another worker."""
        worker.process.wait()
        self.selector.unregister(worker.pidfd)
        os.close(worker.pidfd)
        del self.workers[worker.process.pid]
        self._disconnect(worker)
        self.reported.retire(worker.process.pid)
        self.fetched.retire(worker.process.pid)
        if not self._replacing:
            return
        if worker.stop_cause is not StopCause.HUNG:
            self.counters["worker_deaths"] += 1
            self.log.error("fetch worker %d (pid %d) died (status %s)", worker.id, worker.process.pid,
                           worker.process.returncode)
        tasks = list(worker.tasks.values())
        worker.tasks.clear()
        self.counters["tasks_redispatched"] += len(tasks)
        self.counters["events_redispatched"] += sum(len(t.events) for t in tasks)
        for task in tasks:
            task.worker = None
            self.queue.append(task)
        self.counters["worker_restarts"] += 1
        now = time.monotonic()
        self._respawn_times = [t for t in self._respawn_times if now - t < RESPAWN_WINDOW] + [now]
        excess = len(self._respawn_times) - RESPAWN_FREE
        if excess > 0:
            self._spawn_at = now + min(MAX_RESPAWN_DELAY, 0.1 * 2 ** excess)
        else:
            self._spawn()
        self.dispatch_queue()

    def check(self, now: float) -> None:
        """Kill workers that never said hello or stopped heartbeating; start delayed replacements."""
        hello_deadline = max(HELLO_TIMEOUT, self.settings.worker_timeout)
        for worker in list(self.workers.values()):
            if worker.state is WorkerState.STARTING and now - worker.started > hello_deadline:
                self.counters["worker_hangs"] += 1
                self.kill(worker, StopCause.HUNG, "it never connected")
            elif worker.state is WorkerState.READY and now - worker.last_seen > self.settings.worker_timeout:
                self.counters["worker_hangs"] += 1
                self.kill(worker, StopCause.HUNG, f"no heartbeat for {now - worker.last_seen:.1f} s (hung or stopped)")
        if self._spawn_at is not None and now >= self._spawn_at:
            self._spawn_at = None
            for _ in range(self.settings.workers - len(self.workers)):
                self._spawn()

    # -- the link to each worker ----------------------------------------------------------------------

    def hello(self, connection: Connection, pid: int, rest: list[tuple[dict, list[int]]]) -> None:
        """A connection said hello as a fetch worker: adopt it if it is one we started and wait for."""
        worker = self.workers.get(pid)
        if worker is None or worker.state is not WorkerState.STARTING:
            self.log.error("refusing a worker hello from pid %d: not a worker we started", pid)
            self.links.close(connection)
            return
        worker.connection, worker.state = connection, WorkerState.READY
        worker.last_seen = time.monotonic()
        self.links.rebind(connection, lambda _s, m, w=worker: self._on_io(w, m))
        for blob in self.owner.blobs_to_serve():
            self.serve(worker, blob)
        self.dispatch_queue()
        self._on_messages(worker, rest)

    def serve(self, worker: Worker, blob: Blob) -> None:
        """Give `worker` the blob's spec, source and fill fd."""
        if worker.ready and worker.connection is not None and blob.fill_fd is not None:
            self.links.send(worker.connection, p.ServeBlob(name=blob.name, path=blob.path, spec=blob.spec,
                                                           source=blob.source), [blob.fill_fd])

    def serve_everywhere(self, blob: Blob) -> None:
        for worker in self.workers.values():
            self.serve(worker, blob)

    def forget_everywhere(self, blob: Blob) -> None:
        for worker in self.workers.values():
            if worker.ready and worker.connection is not None:
                self.links.send(worker.connection, p.Forget(name=blob.name))

    def _on_io(self, worker: Worker, mask: int) -> None:
        connection = worker.connection
        if connection is None:
            return
        messages = connection.on_ready(mask)
        if messages is None:
            self.kill(worker, StopCause.DIED, "its connection closed")
            return
        if mask & selectors.EVENT_READ:   # bytes arrived (maybe not a whole message yet): it is alive
            self._on_messages(worker, messages)
        if worker.connection is not None:
            self.links.update(worker.connection)

    def _on_messages(self, worker: Worker, messages: list[tuple[dict, list[int]]]) -> None:
        worker.last_seen = time.monotonic()
        for frame, fds in messages:
            for fd in fds:
                os.close(fd)
            try:
                message = p.parse(frame)
            except ProtocolError as e:
                self.kill(worker, StopCause.DIED, f"it sent a malformed message: {e}")
                return
            if isinstance(message, (p.FillDone, p.FillFailed)):
                task = worker.tasks.get(message.task)
                if task is not None:
                    self.release(task)
                    self.owner.task_finished(task, isinstance(message, p.FillDone), message)
            elif isinstance(message, p.Written):
                self.owner.range_written(message.name, message.offset, message.length)
            elif isinstance(message, p.Heartbeat):
                self.reported.report(worker.process.pid, message.counters)
                self.fetched.report(worker.process.pid, message.fetch)

    # -- tasks ----------------------------------------------------------------------------------------

    def dispatch(self, task: Task) -> None:
        """Send `task` to the ready worker with the fewest tasks (queued while none is ready)."""
        ready = [w for w in self.workers.values() if w.ready]
        if not ready:
            self.queue.append(task)
            return
        worker = min(ready, key=lambda w: len(w.tasks))
        task.worker = worker
        task.dispatches += 1
        worker.tasks[task.id] = task
        self.counters["tasks_dispatched"] += 1
        if worker.connection is not None:
            self.links.send(worker.connection, p.Fill(task=task.id, name=task.blob.name, offset=task.offset,
                                                      length=task.length, priority=task.priority))

    def dispatch_queue(self) -> None:
        queued, self.queue = self.queue, []
        for task in sorted(queued, key=lambda t: t.priority):
            self.dispatch(task)

    def release(self, task: Task) -> None:
        """Take `task` off its worker and the queue (done, failed or cancelled)."""
        if task.worker is not None:
            task.worker.tasks.pop(task.id, None)
            task.worker = None
        if task in self.queue:
            self.queue.remove(task)

    def cancel(self, task: Task) -> None:
        worker = task.worker
        self.release(task)
        if worker is not None and worker.ready and worker.connection is not None:
            self.links.send(worker.connection, p.Cancel(task=task.id))

    def status(self, now: float) -> list[WorkerStatus]:
        return [WorkerStatus(pid=w.process.pid, role=Role.FETCH_WORKER, state=w.state, tasks=len(w.tasks),
                             silent_for=round(now - w.last_seen, 3) if w.ready else None)
                for w in self.workers.values()]
