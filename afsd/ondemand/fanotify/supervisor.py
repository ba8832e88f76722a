"""The fanotify supervisor: owns the pre-content group, the marks and every pending event.

Data flow:
    reader -> erofs (file-backed) -> blob file (marked) -> kernel -> FAN_PRE_ACCESS event
    -> supervisor: range present? answer FAN_ALLOW at once : journal it, ask a fetch worker to fill
       the chunks that hold its holes -> worker: RangeSource.fetch (verified) -> pwrite via fill fd
       -> "done" -> supervisor re-checks the range (SEEK_HOLE) -> FAN_ALLOW
    A reader is let onto a range only once that range has no hole; every other outcome is FAN_DENY with
    EIO (the fetch failed, or the fetch deadline passed): never zeros, never a reader blocked forever.

The supervisor is synchronous (one selectors loop) and does no network I/O and no fetching, so the
thing that can lose events has little that can go wrong. Fetch workers (worker.py) are its children:
a worker that dies or stops heartbeating is killed, reaped and replaced, and its unfinished fills are
dispatched again, so the readers they were for still get the right bytes. The keeper (keeper.py)
holds duplicates of the group fd and the fill fds: if the supervisor itself dies, the group survives,
the keeper starts a new supervisor, and that one answers what its predecessor left (journal.py).

Control protocol on DIR/supervisor.sock (framed JSON, afsd/ondemand/_wire.py; root only), one reply per
request:
    register {name, path, spec, source, prefetch}   unregister {name, force}   status
    watch (then a stream of {"op": "event", "event": "complete", "name": ...})
    shutdown {force} (everything stops)   restart (exit; the keeper starts a new supervisor)
Workers connect to the same socket and say hello {role: "worker"}; see worker.py for their messages.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

from afsd.fsutil import write_json_atomically
from afsd.ondemand import _daemon
from afsd.ondemand._wire import Connection, peer_pid
from afsd.ondemand.fanotify import _sys
from afsd.ondemand.fanotify.blobfile import BlobFileError, check_blob_file, mounts_of
from afsd.ondemand.fanotify.journal import Journal, JournaledEvent, reserve_fd_numbers
from afsd.ondemand.fanotify.keeperlink import KeeperLink, KeeperUnavailableError, launch_keeper
from afsd.ondemand.fanotify.model import Blob, PendingEvent, Task, Worker, chunk_runs
from afsd.ondemand.fanotify.paths import StatePaths
from afsd.ondemand.fanotify.settings import SUPERVISOR_MODULE, Settings, command_line
from afsd.ondemand.sparse import first_hole, holes, present_bytes
from afsd.ondemand.spec import BlobSpec, Priority
from afsd.ondemand.supervised.settings import supervisor_parser

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)
MAX_PLANS_PER_EVENT = 4       # fills that finished yet left the range with holes: give up after this
PREFETCH_RETRY = 10.0         # seconds before prefetch of a blob whose prefetch fill failed resumes
FILL_AHEAD_TASK_CHUNKS = 2    # fill-ahead goes in tasks this small, spread over the workers


def source_kind(source: str) -> str:
    """"local", "peer" or "other" for a fill's source label ("local", "peer:HOST:PORT", "local+peer:...",
    a lab source's own name): where the bytes came from, for the per-source byte counters."""
    kinds = {part.split(":", 1)[0] for part in source.split("+") if part}
    if "peer" in kinds:
        return "peer"
    return "local" if kinds == {"local"} else "other"


class RegistrationError(Exception):
    """A register/unregister request that cannot be carried out; the message goes to the caller."""


class Supervisor:
    def __init__(self, paths: StatePaths, settings: Settings, journal: Journal,
                 leftovers: list[JournaledEvent], placeholders: set[int], argv: list[str]) -> None:
        self.paths = paths
        self.settings = settings
        self.journal = journal
        self.leftovers = leftovers
        self.placeholders = placeholders
        self.argv = argv
        self.log = _daemon.setup_logging("supervisor")
        self.selector = selectors.DefaultSelector()
        self.group_fd = -1
        self.group_recovered = False
        self.keeper: KeeperLink | None = None
        self.keeper_launcher: subprocess.Popen | None = None
        self.supervisor_restarts = 0
        self.blobs: dict[str, Blob] = {}
        self.by_inode: dict[tuple[int, int], Blob] = {}
        self.pending: set[PendingEvent] = set()
        self.queue: list[Task] = []
        self.workers: dict[int, Worker] = {}
        self.next_worker_id = 1
        self.next_task_id = 1
        self.respawn_times: list[float] = []
        self.worker_spawn_at: float | None = None
        self.watchers: set[Connection] = set()
        self.started = time.time()
        self.stopping = False
        self.restart_requested = False
        self.exit_code = 0
        self.metrics_enabled = False
        self.last_snapshot = 0.0
        self.counters: dict[str, int] = {name: 0 for name in (
            "events_total", "events_allowed_present", "events_allowed_filled", "events_denied_failed",
            "events_denied_timeout", "events_denied_unknown", "events_recovered", "events_swept",
            "events_redispatched", "tasks_dispatched", "tasks_done", "tasks_failed", "tasks_redispatched",
            "tasks_cancelled", "bytes_filled", "bytes_prefetched", "worker_restarts", "worker_deaths",
            "worker_hangs", "keeper_restarts", "blobs_completed", "bytes_filled_local", "bytes_filled_peer",
            "bytes_filled_other", "fetch_failovers", "fetch_verification_failures")}
        self.latency = {"present": [0] * (len(LATENCY_BUCKETS) + 1), "filled": [0] * (len(LATENCY_BUCKETS) + 1)}
        self.latency_sum = {"present": 0.0, "filled": 0.0}
        self.status_snapshot: dict[str, Any] = {}

    # == startup ===================================================================================

    def start(self) -> None:
        held_fills = self._attach_keeper(spawn=True)
        if self.group_fd < 0:
            self.group_fd = _sys.new_pre_content_group()
            assert self.keeper is not None
            self.keeper.hold_group(self.group_fd)
            self._flush_keeper()
        self._load_blobs(held_fills)
        if self.group_recovered:
            self._take_over_predecessor_events()
        else:
            # No group survived: whatever the journal lists was answered by the kernel (FAN_ALLOW).
            self.journal.reset()
            self._release_placeholders()
        self.listener = self.paths.listen(self.paths.supervisor_socket)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.selector.register(self.group_fd, selectors.EVENT_READ, self._on_group_readable)
        for _ in range(self.settings.workers):
            self._spawn_worker()
        self.log.info("serving %d blobs (group %s, %d workers)", len(self.blobs),
                      "recovered from the keeper" if self.group_recovered else "new", self.settings.workers)

    def _attach_keeper(self, spawn: bool) -> dict[str, int]:
        """Connect to the keeper (starting one if needed) and take back what it holds: sets the group fd
        if it held one (we then serve a predecessor's group); returns the fill fds by blob name."""
        link, held = KeeperLink.connect(self.paths, self.settings.orphan_deadline, self.argv, spawn=spawn)
        self.supervisor_restarts = held.respawns
        if held.group_fd is not None:
            if self.group_fd >= 0:
                os.close(held.group_fd)     # ours is authoritative (a keeper replaced while we ran)
            else:
                self.group_fd = held.group_fd
                self.group_recovered = True
        self.keeper = link
        self.selector.register(link.connection.sock, selectors.EVENT_READ, self._on_keeper_io)
        return held.fills

    def _flush_keeper(self) -> None:
        if self.keeper is None:
            raise RegistrationError("the keeper is being restarted: try again in a moment")
        try:
            self.keeper.flush()
        except KeeperUnavailableError as e:
            raise RegistrationError(f"{e}: try again in a moment") from None

    def _load_blobs(self, held_fills: dict[str, int]) -> None:
        for record_path in sorted(self.paths.blobs.glob("*.json")):
            try:
                record = json.loads(record_path.read_text())
                spec = BlobSpec.from_json(record["spec"])
            except (OSError, ValueError, KeyError) as e:
                self.log.error("ignoring unreadable blob record %s: %s", record_path, e)
                continue
            fill_fd = held_fills.pop(spec.name, None)
            if not os.path.exists(record["path"]):
                self.log.warning("forgetting blob %s: %s is gone", spec.name, record["path"])
                record_path.unlink(missing_ok=True)
                if fill_fd is not None:
                    os.close(fill_fd)
                continue
            try:
                if fill_fd is not None and self.group_recovered:
                    self._adopt(record, spec, fill_fd)
                else:
                    if fill_fd is not None:
                        os.close(fill_fd)
                    blob = self._register(spec, record["path"], record.get("source", {}),
                                          bool(record.get("prefetch")), from_record=True)
                    # Registered before, but the group that served it is gone: reads in between saw zeros.
                    blob.tainted = not blob.complete
                    if blob.tainted:
                        write_json_atomically(record_path, {**record, "tainted": True})
                        self.log.error("blob %s was served by a group that no longer exists: reads of its "
                                       "unfilled ranges since then returned zeros; remount it", spec.name)
            except (RegistrationError, OSError) as e:
                self.log.error("cannot resume blob %s (%s): %s", spec.name, record["path"], e)
        for fd in held_fills.values():   # fill fds of blobs whose record is gone (unregister interrupted)
            os.close(fd)

    def _adopt(self, record: dict[str, Any], spec: BlobSpec, fill_fd: int) -> None:
        """A blob our predecessor registered: the mark still exists and fill_fd is its pre-mark fd."""
        st = os.fstat(fill_fd)
        blob = Blob(name=spec.name, path=record["path"], spec=spec, source=record.get("source", {}),
                    prefetch=bool(record.get("prefetch")), fill_fd=fill_fd, inode=(st.st_dev, st.st_ino),
                    tainted=bool(record.get("tainted")))
        self.blobs[blob.name] = blob
        self.by_inode[blob.inode] = blob
        self._check_complete(blob)

    def _take_over_predecessor_events(self) -> None:
        """Answer what the previous supervisor left: journaled events get filled and allowed; any other
        event it had read (not journaled yet) is found by the sweep and failed with EIO."""
        journaled = {entry.fd for entry in self.leftovers}
        swept = _sys.sweep_unanswered(self.group_fd, self.journal.slots, journaled)
        self.counters["events_swept"] += len(swept)
        if swept:
            self.log.error("failed %d events the previous supervisor had read but not journaled", len(swept))
        now = time.monotonic()
        for entry in self.leftovers:
            blob = self.by_inode.get((entry.dev, entry.ino))
            self.counters["events_recovered"] += 1
            if blob is None or blob.fill_fd is None and not blob.complete:
                self.counters["events_denied_unknown"] += 1
                _sys.respond(self.group_fd, entry.fd, False, errno.EIO)
                self.journal.clear(entry.fd)
                if entry.fd in self.placeholders:
                    os.close(entry.fd)
                    self.placeholders.discard(entry.fd)
                continue
            event = PendingEvent(fd=entry.fd, blob=blob, start=entry.offset, end=entry.offset + entry.count,
                                 received=now, deadline=now + self.settings.fetch_deadline, owned=False,
                                 placeholder=entry.fd in self.placeholders)
            blob.pending.add(event)
            self.pending.add(event)
            self._plan(event)
        self.leftovers = []
        self.log.info("took over %d pending events from the previous supervisor", len(journaled))

    def _release_placeholders(self) -> None:
        for fd in self.placeholders:
            os.close(fd)
        self.placeholders = set()

    # == the loop ==================================================================================

    def serve(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        last_tick = 0.0
        while not self.stopping:
            for key, mask in self.selector.select(self._timeout()):
                key.data(key.fileobj, mask)
            if self.restart_requested:
                self._request_restart()
                break
            now = time.monotonic()
            self._expire_events(now)
            if now - last_tick >= 0.1:
                last_tick = now
                self._tick(now)
        return self.exit_code

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.restart_requested = True   # acted on by the loop, between two events

    def _timeout(self) -> float:
        now = time.monotonic()
        soonest = now + 0.1
        for event in self.pending:
            soonest = min(soonest, event.deadline)
        return max(0.0, soonest - now)

    def _tick(self, now: float) -> None:
        self._expire_unwaited_tasks(now)
        self._check_workers(now)
        self._maintain_keeper()
        for blob in list(self.blobs.values()):
            self._prefetch(blob)
        if self.metrics_enabled and now - self.last_snapshot >= 1.0:
            self.last_snapshot = now
            self.status_snapshot = self.status()

    # == events ====================================================================================

    def _on_group_readable(self, fd: int, mask: int) -> None:
        for _ in range(64):  # then let other sources in
            try:
                data = os.read(self.group_fd, 1 << 16)
            except BlockingIOError:
                return
            for event in _sys.parse_events(data):
                self._on_event(event)

    def _on_event(self, raw: _sys.Event) -> None:
        self.counters["events_total"] += 1
        if raw.fd < 0:
            self.log.error("fanotify event without fd (mask %#x): the queue overflowed?", raw.mask)
            return
        received = time.monotonic()
        try:
            st = os.fstat(raw.fd)
        except OSError as e:   # cannot happen for an fd the kernel just gave us; never let it through
            self.log.error("cannot stat the fd of an event: %s", e)
            _sys.respond(self.group_fd, raw.fd, False, errno.EIO)
            return
        blob = self.by_inode.get((st.st_dev, st.st_ino))
        if blob is None or (blob.fill_fd is None and not blob.complete):
            # A file we no longer serve (unregistered while still in use): never let it read holes.
            self.counters["events_denied_unknown"] += 1
            _sys.respond(self.group_fd, raw.fd, False, errno.EIO)
            os.close(raw.fd)
            return
        size = blob.spec.size
        start = min(raw.offset if raw.offset is not None else 0, size)
        end = size if raw.count is None else min(size, start + raw.count)
        if blob.complete or blob.fill_fd is None or first_hole(blob.fill_fd, start, end) is None:
            self.counters["events_allowed_present"] += 1
            _sys.respond(self.group_fd, raw.fd, True)
            os.close(raw.fd)
            self._observe("present", time.monotonic() - received)
            self._read_ahead(blob, start, end, missed=False)
            return
        self.journal.record(raw.fd, st.st_dev, st.st_ino, start, end - start)
        event = PendingEvent(fd=raw.fd, blob=blob, start=start, end=end, received=received,
                             deadline=received + self.settings.fetch_deadline, owned=True)
        blob.pending.add(event)
        self.pending.add(event)
        self._plan(event)
        self._read_ahead(blob, start, end, missed=True)

    def _plan(self, event: PendingEvent) -> None:
        """Allow the event if its range is filled; otherwise make sure a task is filling every chunk
        with a hole in it. The only way to FAN_ALLOW a pending event."""
        blob = event.blob
        assert blob.fill_fd is not None or blob.complete
        gaps = [] if blob.complete or blob.fill_fd is None else holes(blob.fill_fd, event.start, event.end)
        if not gaps:
            self._answer(event, allow=True)
            return
        event.plans += 1
        if event.plans > MAX_PLANS_PER_EVENT:
            self.log.error("blob %s: bytes %d-%d still have holes after %d fills: failing the read",
                           blob.name, event.start, event.end, MAX_PLANS_PER_EVENT)
            self.counters["events_denied_failed"] += 1
            self._answer(event, allow=False)
            return
        size = blob.spec.chunk_size
        needed = sorted({c for offset, length in gaps for c in range(offset // size, (offset + length - 1) // size + 1)})
        if blob.failed_until and self._recently_failed(blob, needed):
            self.counters["events_denied_failed"] += 1
            self._answer(event, allow=False)
            return
        missing = []
        for chunk in needed:
            task = blob.inflight.get(chunk)
            if task is not None:
                task.events.add(event)
                event.tasks.add(task)
            else:
                missing.append(chunk)
        for first, count in chunk_runs(missing, self.settings.task_chunks):
            task = self._new_task(blob, first, count, Priority.DEMAND)
            task.events.add(event)
            event.tasks.add(task)
            self._dispatch(task)

    def _read_ahead(self, blob: Blob, start: int, end: int, *, missed: bool) -> None:
        """Keep the `fill_ahead` chunks after a read being filled, in small tasks of their own so that a
        reader's own chunk is not held up by them. After a miss always (a reader will likely want the
        next bytes); after a read of filled bytes only when it continues the last read (a sequential
        reader): the window slides along with it, so it rarely waits on the network."""
        size = blob.spec.chunk_size
        sequential = blob.read_end - size <= start <= blob.read_end + size
        blob.read_end = end
        if not self.settings.fill_ahead or blob.complete or blob.fill_fd is None or not (missed or sequential):
            return
        first = -(-end // size)
        ahead = [chunk for chunk in range(first, min(blob.chunks, first + self.settings.fill_ahead))
                 if chunk not in blob.inflight and not self._chunk_filled(blob, chunk)]
        for run_start, count in chunk_runs(ahead, FILL_AHEAD_TASK_CHUNKS):
            self._dispatch(self._new_task(blob, run_start, count, Priority.DEMAND))

    def _recently_failed(self, blob: Blob, chunks: list[int]) -> bool:
        now = time.monotonic()
        for chunk in [c for c, until in blob.failed_until.items() if until <= now]:
            del blob.failed_until[chunk]
        return any(chunk in blob.failed_until for chunk in chunks)

    def _remember_failure(self, task: Task) -> None:
        until = time.monotonic() + self.settings.failure_memory
        for chunk in range(task.first_chunk, task.first_chunk + task.chunk_count):
            task.blob.failed_until[chunk] = until

    def _chunk_filled(self, blob: Blob, chunk: int) -> bool:
        assert blob.fill_fd is not None
        start = chunk * blob.spec.chunk_size
        return first_hole(blob.fill_fd, start, min(blob.spec.size, start + blob.spec.chunk_size)) is None

    def _answer(self, event: PendingEvent, *, allow: bool, timed_out: bool = False) -> None:
        if event.answered:
            return
        event.answered = True
        _sys.respond(self.group_fd, event.fd, allow, errno.EIO)
        self.journal.clear(event.fd)
        if event.owned:
            os.close(event.fd)
        elif event.placeholder:
            os.close(event.fd)
            self.placeholders.discard(event.fd)
        if allow:
            self.counters["events_allowed_filled"] += 1
            self._observe("filled", time.monotonic() - event.received)
        event.blob.pending.discard(event)
        self.pending.discard(event)
        for task in list(event.tasks):
            task.events.discard(event)
            if not allow and not task.events and task.priority == Priority.DEMAND:
                if timed_out:
                    self._remember_failure(task)
                self._cancel(task)
        event.tasks.clear()

    def _expire_events(self, now: float) -> None:
        for event in [e for e in self.pending if e.deadline <= now]:
            self.log.error("blob %s: bytes %d-%d not filled within %.1f s: failing the read with EIO",
                           event.blob.name, event.start, event.end, self.settings.fetch_deadline)
            self.counters["events_denied_timeout"] += 1
            self._answer(event, allow=False, timed_out=True)

    def _expire_unwaited_tasks(self, now: float) -> None:
        """Fill-ahead and prefetch tasks have no reader to time out with: give them the same deadline,
        so a hung provider cannot pile them up in the workers."""
        for blob in self.blobs.values():
            for task in {id(t): t for t in blob.inflight.values()}.values():
                if not task.events and now - task.created > self.settings.fetch_deadline:
                    self.log.error("blob %s: background fill of bytes %d-%d not done within %.1f s: cancelled",
                                   blob.name, task.offset, task.offset + task.length, self.settings.fetch_deadline)
                    self._remember_failure(task)
                    if task.priority == Priority.PREFETCH:
                        blob.prefetch_paused_until = now + PREFETCH_RETRY
                    self._cancel(task)

    def _observe(self, kind: str, seconds: float) -> None:
        buckets = self.latency[kind]
        for index, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                buckets[index] += 1
                break
        else:
            buckets[-1] += 1
        self.latency_sum[kind] += seconds

    # == tasks =====================================================================================

    def _new_task(self, blob: Blob, first: int, count: int, priority: Priority) -> Task:
        task = Task(id=self.next_task_id, blob=blob, first_chunk=first, chunk_count=count, priority=priority,
                    created=time.monotonic())
        self.next_task_id += 1
        for chunk in range(first, first + count):
            blob.inflight[chunk] = task
        if priority == Priority.PREFETCH:
            blob.prefetch_inflight += 1
        return task

    def _dispatch(self, task: Task) -> None:
        ready = [w for w in self.workers.values() if w.ready]
        if not ready:
            self.queue.append(task)
            return
        worker = min(ready, key=lambda w: len(w.tasks))
        task.worker = worker
        task.dispatches += 1
        worker.tasks[task.id] = task
        self.counters["tasks_dispatched"] += 1
        assert worker.connection is not None
        worker.connection.send({"op": "fill", "task": task.id, "name": task.blob.name, "offset": task.offset,
                                "length": task.length, "priority": int(task.priority)})
        self._update_interest(worker.connection)

    def _dispatch_queue(self) -> None:
        queued, self.queue = self.queue, []
        for task in sorted(queued, key=lambda t: t.priority):
            self._dispatch(task)

    def _release_task(self, task: Task) -> None:
        blob = task.blob
        for chunk in range(task.first_chunk, task.first_chunk + task.chunk_count):
            if blob.inflight.get(chunk) is task:
                del blob.inflight[chunk]
        if task.priority == Priority.PREFETCH:
            blob.prefetch_inflight -= 1
        if task.worker is not None:
            task.worker.tasks.pop(task.id, None)
            task.worker = None
        if task in self.queue:
            self.queue.remove(task)

    def _cancel(self, task: Task) -> None:
        worker = task.worker
        self._release_task(task)
        self.counters["tasks_cancelled"] += 1
        if worker is not None and worker.ready:
            assert worker.connection is not None
            worker.connection.send({"op": "cancel", "task": task.id})
            self._update_interest(worker.connection)

    def _task_finished(self, task: Task, ok: bool, message: dict[str, Any]) -> None:
        blob = task.blob
        self._release_task(task)
        if ok:
            self.counters["tasks_done"] += 1
            written = int(message.get("written", 0))
            blob.filled_bytes += written
            self.counters["bytes_filled"] += written
            self.counters[f"bytes_filled_{source_kind(str(message.get('source', '')))}"] += written
            if task.priority == Priority.PREFETCH:
                self.counters["bytes_prefetched"] += written
        else:
            self.counters["tasks_failed"] += 1
            self.log.error("blob %s: filling bytes %d-%d failed: %s", blob.name, task.offset,
                           task.offset + task.length, message.get("error", "?"))
            if task.priority == Priority.PREFETCH:
                blob.prefetch_paused_until = time.monotonic() + PREFETCH_RETRY
            self._remember_failure(task)
        for event in list(task.events):
            event.tasks.discard(task)
            if event.answered:
                continue
            if not ok:
                self.counters["events_denied_failed"] += 1
                self._answer(event, allow=False)
            elif not event.tasks:
                self._plan(event)
        task.events.clear()
        if blob.name in self.blobs:
            self._check_complete(blob)
            self._prefetch(blob)

    # == background prefetch =======================================================================

    def _prefetch(self, blob: Blob) -> None:
        if (not blob.prefetch or blob.complete or blob.fill_fd is None
                or time.monotonic() < blob.prefetch_paused_until):
            return
        size, chunk_size = blob.spec.size, blob.spec.chunk_size
        wrapped = False
        for _ in range(64):
            if blob.prefetch_inflight >= self.settings.prefetch_inflight:
                return
            hole = first_hole(blob.fill_fd, blob.prefetch_cursor, size)
            if hole is None:
                if wrapped or blob.prefetch_cursor == 0:
                    return
                blob.prefetch_cursor, wrapped = 0, True
                continue
            chunk = hole // chunk_size
            run = []
            while (chunk < blob.chunks and len(run) < self.settings.task_chunks and chunk not in blob.inflight
                   and not self._chunk_filled(blob, chunk)):
                run.append(chunk)
                chunk += 1
            blob.prefetch_cursor = min(size, (chunk + (0 if run else 1)) * chunk_size)
            if run:
                self._dispatch(self._new_task(blob, run[0], len(run), Priority.PREFETCH))

    # == workers ===================================================================================

    def _spawn_worker(self) -> None:
        command = [sys.executable, "-m", "afsd.ondemand.fanotify.worker",
                   "--socket", str(self.paths.supervisor_socket), "--heartbeat", str(self.settings.heartbeat)]
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, close_fds=True)
        worker = Worker(id=self.next_worker_id, process=process, pidfd=os.pidfd_open(process.pid),
                        started=time.monotonic())
        self.next_worker_id += 1
        self.workers[process.pid] = worker
        self.selector.register(worker.pidfd, selectors.EVENT_READ, lambda _fd, _m, w=worker: self._reap(w))
        self.log.info("started fetch worker %d (pid %d)", worker.id, process.pid)

    def _kill(self, worker: Worker, why: str) -> None:
        if worker.killed:
            return
        worker.killed = why
        (self.log.info if self.stopping else self.log.error)("killing fetch worker %d (pid %d): %s", worker.id,
                                                             worker.process.pid, why)
        try:
            signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if worker.connection is not None:
            self._close_connection(worker.connection)
            worker.connection = None

    def _reap(self, worker: Worker) -> None:
        """The worker process is gone (pidfd readable): only now is it safe to give its fills to
        another worker (a stopped process could otherwise still write)."""
        worker.process.wait()
        self.selector.unregister(worker.pidfd)
        os.close(worker.pidfd)
        del self.workers[worker.process.pid]
        if worker.connection is not None:
            self._close_connection(worker.connection)
            worker.connection = None
        if self.stopping:
            return
        if not worker.hung:
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
        self.respawn_times = [t for t in self.respawn_times if now - t < 30] + [now]
        delay = 0.0 if len(self.respawn_times) <= 5 else min(5.0, 0.1 * 2 ** (len(self.respawn_times) - 5))
        if delay:
            self.worker_spawn_at = now + delay
        else:
            self._spawn_worker()
        self._dispatch_queue()

    def _check_workers(self, now: float) -> None:
        for worker in list(self.workers.values()):
            if worker.killed:
                continue
            if worker.connection is None and now - worker.started > max(15.0, self.settings.worker_timeout):
                self.counters["worker_hangs"] += 1
                worker.hung = True
                self._kill(worker, "it never connected")
            elif worker.connection is not None and now - worker.last_seen > self.settings.worker_timeout:
                self.counters["worker_hangs"] += 1
                worker.hung = True
                self._kill(worker, f"no heartbeat for {now - worker.last_seen:.1f} s (hung or stopped)")
        if self.worker_spawn_at is not None and now >= self.worker_spawn_at:
            self.worker_spawn_at = None
            missing = self.settings.workers - len(self.workers)
            for _ in range(missing):
                self._spawn_worker()

    def _worker_hello(self, connection: Connection, pid: int) -> Worker | None:
        worker = self.workers.get(pid)
        if worker is None or worker.killed or worker.connection is not None:
            self.log.error("refusing a worker hello from pid %d: not a worker we started", pid)
            self._close_connection(connection)
            return None
        worker.connection = connection
        worker.last_seen = time.monotonic()
        self.selector.modify(connection.sock, selectors.EVENT_READ,
                             lambda _s, m, w=worker: self._on_worker_io(w, m))
        for blob in self.blobs.values():
            if blob.fill_fd is not None:
                self._send_blob(connection, blob)
        self._update_interest(connection)
        self._dispatch_queue()
        return worker

    def _send_blob(self, connection: Connection, blob: Blob) -> None:
        assert blob.fill_fd is not None
        connection.send({"op": "blob", "name": blob.name, "path": blob.path, "spec": blob.spec.to_json(),
                         "source": blob.source}, [blob.fill_fd])

    def _on_worker_io(self, worker: Worker, mask: int) -> None:
        connection = worker.connection
        if connection is None:
            return
        messages = connection.on_ready(mask)
        if messages is None:
            self._kill(worker, "its connection closed")
            return
        if mask & selectors.EVENT_READ:   # bytes arrived (maybe not a whole message yet): it is alive
            self._worker_messages(worker, messages)
        if worker.connection is not None:
            self._update_interest(worker.connection)

    def _worker_messages(self, worker: Worker, messages: list[tuple[dict[str, Any], list[int]]]) -> None:
        worker.last_seen = time.monotonic()
        for message, fds in messages:
            for fd in fds:
                os.close(fd)
            op = message.get("op")
            if op in ("done", "failed"):
                task = worker.tasks.get(int(message["task"]))
                if task is not None:
                    self._task_finished(task, op == "done", message)
            elif op == "heartbeat":   # carries what the worker's fetchers counted since its last one
                for name in ("fetch_failovers", "fetch_verification_failures"):
                    self.counters[name] += int(message.get(name, 0))

    # == the keeper ================================================================================

    def _on_keeper_io(self, sock: socket.socket, mask: int) -> None:
        link = self.keeper
        if link is None:
            return
        connection = link.connection
        messages = connection.on_ready(mask)
        if messages is None:
            self.selector.unregister(connection.sock)
            link.close()
            self.keeper = None
            if not self.stopping:
                self.counters["keeper_restarts"] += 1
                self.log.error("the keeper died: starting a new one (until then, if this supervisor "
                               "dies too, readers of unfilled ranges see zeros)")
                self._maintain_keeper()
            return
        for _message, fds in messages:
            for fd in fds:
                os.close(fd)
        self._update_interest(connection)

    def _maintain_keeper(self) -> None:
        """Replace a dead keeper without blocking the loop: launch it, connect on a later tick."""
        if self.keeper is not None or self.stopping:
            return
        if self.keeper_launcher is None:
            self.keeper_launcher = launch_keeper(self.paths, self.settings.orphan_deadline)
            return
        if self.keeper_launcher.poll() is None:
            return
        self.keeper_launcher = None
        try:
            held = self._attach_keeper(spawn=False)
        except OSError as e:
            self.log.error("cannot reach the new keeper: %s", e)
            return
        for fd in held.values():
            os.close(fd)
        assert self.keeper is not None
        self.keeper.hold_group(self.group_fd)
        for blob in self.blobs.values():
            if blob.fill_fd is not None:
                self.keeper.hold_blob(blob.name, blob.fill_fd)
        self._update_interest(self.keeper.connection)
        self.log.info("a new keeper (pid %d) holds the group and %d fill fds", self.keeper.pid, len(self.blobs))

    # == control requests ==========================================================================

    def _accept(self, listener: socket.socket, mask: int) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            connection = Connection(sock)
            self.selector.register(sock, selectors.EVENT_READ,
                                   lambda _s, m, c=connection: self._on_control_io(c, m))

    def _on_control_io(self, connection: Connection, mask: int) -> None:
        messages = connection.on_ready(mask)
        if messages is None:
            self._close_connection(connection)
            return
        for index, (message, fds) in enumerate(messages):
            for fd in fds:
                os.close(fd)
            if message.get("op") == "hello" and message.get("role") == "worker":
                worker = self._worker_hello(connection, peer_pid(connection.sock))
                if worker is not None:
                    self._worker_messages(worker, messages[index + 1:])
                return
            self._control(connection, message)
        if not connection.closed:
            self._update_interest(connection)

    def _control(self, connection: Connection, message: dict[str, Any]) -> None:
        op = message.get("op")
        reply: dict[str, Any] = {"op": "reply", "id": message.get("id")}
        try:
            if op == "register":
                blob = self._register(BlobSpec.from_json(message["spec"]), message["path"],
                                      message.get("source") or {}, bool(message.get("prefetch")))
                reply["blob"] = self._blob_status(blob)
            elif op == "unregister":
                self._unregister(message["name"], force=bool(message.get("force")))
            elif op == "status":
                reply["status"] = self.status()
            elif op == "watch":
                self.watchers.add(connection)
            elif op == "shutdown":
                self._shutdown(force=bool(message.get("force")))
            elif op == "restart":
                self._request_restart()
            else:
                raise RegistrationError(f"unknown request {op!r}")
            reply["ok"] = True
        except (RegistrationError, BlobFileError) as e:
            reply.update(ok=False, error=str(e))
        except (KeyError, ValueError, TypeError) as e:
            reply.update(ok=False, error=f"malformed {op} request: {e!r}")
        connection.send(reply)
        if self.stopping:   # the loop ends after this request: deliver the reply first
            connection.sock.setblocking(True)
            connection.flush()

    def _register(self, spec: BlobSpec, path: str, source: dict[str, Any], prefetch: bool, *,
                  from_record: bool = False) -> Blob:
        existing = self.blobs.get(spec.name)
        if existing is not None:
            if existing.path != path:
                raise RegistrationError(f"blob {spec.name} is already registered at {existing.path}")
            return existing
        if not os.path.isabs(path):
            raise RegistrationError(f"blob path {path} is not absolute")
        mounted_at = [] if from_record else mounts_of(path)
        if mounted_at:
            raise RegistrationError(
                f"blob {path} is already mounted at {mounted_at[0]} without a fanotify mark (its reads "
                "would see holes as zeros): unmount it, register, then mount")
        if not os.path.exists(path):
            raise RegistrationError(f"blob {path} does not exist: create it with prepare_blob first")
        # A mark of ours left on the inode by an unregister (_retire) would make the fill fd we are about
        # to open raise events on its own writes: remove it first (nobody has the blob mounted).
        _sys.unmark_path(self.group_fd, path)
        try:
            fill_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise RegistrationError(f"cannot open blob {path}: {e.strerror}") from None
        try:
            inode, complete = check_blob_file(spec, path, fill_fd)
            blob = Blob(name=spec.name, path=path, spec=spec, source=source, prefetch=prefetch, fill_fd=fill_fd,
                        inode=inode, complete=complete)
            if not blob.complete:
                if not from_record:
                    write_json_atomically(self.paths.blob_record(spec.name), {
                        "path": path, "spec": spec.to_json(), "source": source, "prefetch": prefetch})
                if self.keeper is None:
                    raise RegistrationError("the keeper is being restarted: try again in a moment")
                self.keeper.hold_blob(spec.name, fill_fd)
                self._flush_keeper()   # the keeper's copy is in flight before the mark exists
                # Evictable: see _retire (an unregistered blob's mark must not pin its inode).
                _sys.mark_pre_access(self.group_fd, fill_fd, evictable=True)
        except BaseException:
            os.close(fill_fd)
            if not from_record:
                self.paths.blob_record(spec.name).unlink(missing_ok=True)
            if self.keeper is not None:
                self.keeper.drop_blob(spec.name)
            raise
        if blob.complete:
            os.close(fill_fd)
            blob.fill_fd = None
            self.paths.blob_record(spec.name).unlink(missing_ok=True)
        self.blobs[blob.name] = blob
        self.by_inode[blob.inode] = blob
        for worker in self.workers.values():
            if worker.ready and blob.fill_fd is not None:
                assert worker.connection is not None
                self._send_blob(worker.connection, blob)
                self._update_interest(worker.connection)
        self._prefetch(blob)
        self.log.info("registered blob %s (%s, %d bytes, %s)", blob.name, path, spec.size,
                      "complete" if blob.complete else "filling on demand")
        return blob

    def _unregister(self, name: str, *, force: bool) -> None:
        blob = self.blobs.get(name)
        if blob is None:
            raise RegistrationError(f"blob {name} is not registered")
        if not blob.complete and not force:
            mounted_at = mounts_of(blob.path)
            if mounted_at:
                raise RegistrationError(f"blob {name} is still mounted at {mounted_at[0]} and not complete: "
                                        "unmount it first (or force, and its unfilled reads fail with EIO)")
        for event in list(blob.pending):
            self.counters["events_denied_unknown"] += 1
            self._answer(event, allow=False)
        for task in list(blob.inflight.values()):
            self._cancel(task)
        self._forget_in_workers(blob)
        self._retire(blob)
        del self.blobs[name]
        self.by_inode.pop(blob.inode, None)
        self.paths.blob_record(name).unlink(missing_ok=True)
        self.log.info("unregistered blob %s", name)

    def _retire(self, blob: Blob) -> None:
        """Stop serving a blob. Its mark stays (evictable: it vanishes with the inode), so a mount we
        do not know about, e.g. a lazily detached one, gets EIO for unfilled ranges instead of zeros."""
        if blob.fill_fd is not None:
            if self.keeper is not None:
                self.keeper.drop_blob(blob.name)
            os.close(blob.fill_fd)
            blob.fill_fd = None

    def _forget_in_workers(self, blob: Blob) -> None:
        for worker in self.workers.values():
            if worker.ready:
                assert worker.connection is not None
                worker.connection.send({"op": "forget", "name": blob.name})
                self._update_interest(worker.connection)

    def _check_complete(self, blob: Blob) -> None:
        if blob.complete or blob.fill_fd is None or first_hole(blob.fill_fd, 0, blob.spec.size) is not None:
            return
        for event in list(blob.pending):
            self._plan(event)   # all filled: each is allowed
        for task in {id(t): t for t in blob.inflight.values()}.values():
            self._cancel(task)  # finished writing, or nothing left to write
        try:
            _sys.unmark_pre_access(self.group_fd, blob.fill_fd)
        except OSError as e:
            self.log.error("blob %s: cannot remove its mark: %s", blob.name, e)
        self._forget_in_workers(blob)
        if self.keeper is not None:
            self.keeper.drop_blob(blob.name)
        os.close(blob.fill_fd)
        blob.fill_fd = None
        blob.complete = True
        self.paths.blob_record(blob.name).unlink(missing_ok=True)
        self.counters["blobs_completed"] += 1
        self.log.info("blob %s is complete: mark removed", blob.name)
        for watcher in list(self.watchers):
            watcher.send({"op": "event", "event": "complete", "name": blob.name, "path": blob.path})
            self._update_interest(watcher)

    # == stopping ==================================================================================

    def _shutdown(self, *, force: bool) -> None:
        busy = [b.name for b in self.blobs.values() if not b.complete and mounts_of(b.path)]
        if busy and not force:
            raise RegistrationError(f"blobs still mounted and incomplete: {', '.join(busy)}: unmount them "
                                    "first (stopping now would let their readers see zeros)")
        self.log.info("shutting down in order")
        self.stopping = True
        for event in list(self.pending):
            self._answer(event, allow=False)
        for worker in list(self.workers.values()):
            self._kill(worker, "shutting down")
        for worker in list(self.workers.values()):
            worker.process.wait()
        if self.keeper is not None:
            self.keeper.bye()
            self._flush_keeper()
        for blob in self.blobs.values():
            if blob.fill_fd is not None:
                os.close(blob.fill_fd)
        self.journal.reset()
        self.paths.supervisor_socket.unlink(missing_ok=True)

    def _request_restart(self) -> None:
        """Exit without saying bye: the keeper keeps the group and starts a new supervisor (upgrades)."""
        self.log.info("exiting for a restart; pending events stay journaled for the successor")
        self.stopping = True
        for worker in list(self.workers.values()):
            self._kill(worker, "supervisor restarting")

    # == plumbing ==================================================================================

    def _update_interest(self, connection: Connection) -> None:
        if connection.closed:
            self._close_connection(connection)
            return
        try:
            key = self.selector.get_key(connection.sock)
        except (KeyError, ValueError):
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if connection.wants_write else 0)
        if key.events != events:
            self.selector.modify(connection.sock, events, key.data)

    def _close_connection(self, connection: Connection) -> None:
        self.watchers.discard(connection)
        try:
            self.selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass
        if connection.sock.fileno() >= 0:
            connection.close()

    # == status ====================================================================================

    def _blob_status(self, blob: Blob) -> dict[str, Any]:
        present = blob.spec.size if blob.complete or blob.fill_fd is None else present_bytes(blob.fill_fd, blob.spec.size)
        return {"name": blob.name, "path": blob.path, "size": blob.spec.size, "present_bytes": present,
                "state": "complete" if blob.complete else "filling", "tainted": blob.tainted,
                "prefetch": blob.prefetch, "pending_events": len(blob.pending),
                "inflight_tasks": len({id(t) for t in blob.inflight.values()}), "filled_bytes": blob.filled_bytes}

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "pid": os.getpid(), "uptime": time.time() - self.started, "group_recovered": self.group_recovered,
            "supervisor_restarts": self.supervisor_restarts, "keeper_pid": self.keeper.pid if self.keeper else 0,
            "settings": asdict(self.settings), "counters": dict(self.counters),
            "pending_events": len(self.pending), "queued_tasks": len(self.queue),
            "latency": {"buckets": list(LATENCY_BUCKETS),
                        **{kind: {"counts": list(counts), "sum": self.latency_sum[kind]}
                           for kind, counts in self.latency.items()}},
            "workers": [{"id": w.id, "pid": w.process.pid, "state": "killed" if w.killed else
                         ("ready" if w.connection else "starting"), "tasks": len(w.tasks),
                         "silent_for": round(now - w.last_seen, 3) if w.connection else None}
                        for w in self.workers.values()],
            "blobs": [self._blob_status(b) for b in self.blobs.values()],
        }


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = supervisor_parser(SUPERVISOR_MODULE, "Serve fanotify pre-content events for lazily filled erofs blobs.",
                               Settings, daemon_help="detach; exit once serving")
    args = parser.parse_args(argv)
    return args, Settings.from_namespace(args)


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    paths = StatePaths(args.state_dir.absolute())
    paths.ensure()
    lock = _daemon.try_lock(paths.supervisor_lock)
    if lock is None:
        print(f"a supervisor already runs for {paths.root}", file=sys.stderr)
        return 0    # the caller wanted one running: there is one
    # Before anything else opens an fd: keep the numbers of the predecessor's unanswered events taken.
    fd_limit = _daemon.set_fd_limit(settings.fd_limit)
    journal = Journal(paths.journal, fd_limit)
    leftovers = journal.pending()
    placeholders = reserve_fd_numbers({entry.fd for entry in leftovers})
    announce = _daemon.detach_if(args.daemon, paths.supervisor_log)
    _daemon.protect_from_oom_killer()
    # What the keeper runs to replace us: the same options, in the foreground (in its own session).
    respawn = command_line(paths.root, settings, metrics_listen=args.metrics_listen)
    supervisor = Supervisor(paths, settings, journal, leftovers, placeholders, respawn)
    try:
        supervisor.start()
    except Exception:
        supervisor.log.exception("cannot start")
        announce(False)
        return 1
    if args.metrics_listen:
        from afsd.ondemand.fanotify.metrics import StatusCollector
        from afsd.ondemand.supervised.metrics import serve_status_metrics
        supervisor.metrics_enabled = True
        supervisor.status_snapshot = supervisor.status()
        serve_status_metrics(args.metrics_listen, StatusCollector(lambda: supervisor.status_snapshot))
    announce(True)
    return supervisor.serve()


if __name__ == "__main__":
    sys.exit(main())
