"""The fanotify supervisor: owns the pre-content group, the marks and every pending event.

Data flow:
    reader -> erofs (file-backed) -> blob file (marked) -> kernel -> FAN_PRE_ACCESS event
    -> supervisor: range present? answer FAN_ALLOW at once : journal it, ask a fetch worker to fill
       the chunks that hold its holes -> worker: RangeSource.fetch (verified) -> pwrite via fill fd
       -> FillDone -> supervisor re-checks the range (SEEK_HOLE) -> FAN_ALLOW
    A reader is let onto a range only once that range has no hole; every other outcome is FAN_DENY with
    EIO (the fetch failed, or the fetch deadline passed): never zeros, never a reader blocked forever.

The supervisor is synchronous (one selectors loop) and does no network I/O and no fetching, so the
thing that can lose events has little that can go wrong. Its jobs, one module each: this one runs the
loop and answers events once their range is filled; intake.py reads events (present ranges are answered in
C) and journals and plans the others; planner.py decides what to fill (pure functions); pool.py runs the
fetch workers (worker.py), its children, replacing one that dies or stops heartbeating and dispatching
its unfinished fills again; blobs.py registers blobs (fill fd, mark, record on disk). The keeper
(keeper.py, driven through keeperlink.py) holds duplicates of the group fd and the fill fds: if the
supervisor itself dies, the group survives, the keeper starts a new supervisor, and that one answers what
its predecessor left (journal.py).

Messages on DIR/supervisor.sock (root only) are afsd/ondemand/supervised/protocol.py's: clients send
Register, Unregister, StatusRequest, Watch (then BlobComplete per completed blob), Shutdown and Restart
(exit; the keeper starts a new supervisor); fetch workers connect to the same socket and say Hello.
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import selectors
import signal
import sys
import time
from dataclasses import asdict

from afsd.ondemand import _daemon
from afsd.ondemand.fanotify import _sys, takeover
from afsd.ondemand.fanotify.blobs import BlobTable
from afsd.ondemand.fanotify.control import ControlRequests
from afsd.ondemand.fanotify.counters import COUNTERS, FILLED_COUNTERS, WORKER_COUNTERS, source_kind
from afsd.ondemand.fanotify.inline import FILLED, NOT_HERE, InlineFills
from afsd.ondemand.fanotify.intake import EventIntake
from afsd.ondemand.fanotify.journal import Journal, JournaledEvent, reserve_fd_numbers
from afsd.ondemand.fanotify.keeperlink import KeeperHolder
from afsd.ondemand.fanotify.links import Links
from afsd.ondemand.fanotify.model import Blob, EventLatency, PendingEvent, Task
from afsd.ondemand.fanotify.paths import StatePaths
from afsd.ondemand.fanotify.planner import FILL_AHEAD_TASK_CHUNKS, plan_event, plan_learned, plan_prefetch, read_ahead
from afsd.ondemand.fanotify.pool import WorkerPool
from afsd.ondemand.fanotify.settings import SUPERVISOR_MODULE, Settings, command_line
from afsd.ondemand.fanotify.startup import startup_gate, startup_over
from afsd.ondemand.sparse import first_hole, holes
from afsd.ondemand.spec import Priority
from afsd.ondemand.supervised import protocol as p
from afsd.ondemand.supervised.protocol import DaemonState, SupervisorStatus
from afsd.ondemand.supervised.settings import supervisor_parser
from afsd.ondemand.trace import LearnedPrefetch, LearnedTimeline, TraceRecorder

PREFETCH_RETRY = 10.0         # seconds before prefetch of a blob whose prefetch fill failed resumes
TICK = 0.1                    # seconds between housekeeping rounds (deadlines, workers, keeper, prefetch)


class Supervisor:
    def __init__(self, paths: StatePaths, settings: Settings, journal: Journal,
                 leftovers: list[JournaledEvent], placeholders: set[int], argv: list[str]) -> None:
        self.paths = paths
        self.settings = settings
        self.journal = journal
        self.leftovers = leftovers
        self.placeholders = placeholders
        self.log = _daemon.setup_logging("supervisor")
        self.selector = selectors.DefaultSelector()
        self.links = Links(self.selector)
        self.state = DaemonState.STARTING
        self.group_fd = -1
        self.group_recovered = False
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.keeper = KeeperHolder(paths, settings.orphan_deadline, argv, self.selector,
                                   lambda: (self.group_fd, self.blobs.fill_fds()), self.counters, self.log)
        self.blobs = BlobTable(paths, self.keeper, self.log)
        self.pool = WorkerPool(paths, settings, self.selector, self.links, self.counters, self, self.log)
        self.inline = InlineFills(settings.inline_fill, self.group_fd, self.log)
        self.control = ControlRequests(self)
        self.intake = EventIntake(self)
        self.pending: set[PendingEvent] = set()
        self.next_task_id = 1
        self.latency = EventLatency()
        self.started = time.time()
        self.exit_code = 0
        self.metrics_enabled = False
        self.last_snapshot = 0.0
        self.status_snapshot: SupervisorStatus | None = None

    # == startup ===================================================================================

    def start(self) -> None:
        held = self.keeper.attach(spawn=True)
        if held.group_fd is not None:        # we serve a predecessor's group
            self.group_fd, self.group_recovered = held.group_fd, True
        else:
            self.group_fd = _sys.new_pre_content_group()
            self.keeper.hold_group(self.group_fd)
            self.keeper.flush()
        self.blobs.group_fd = self.inline.group_fd = self.group_fd
        takeover.load_blobs(self, held.fills)
        if self.group_recovered:
            takeover.take_over_predecessor_events(self)
        else:
            # No group survived: whatever the journal lists was answered by the kernel (FAN_ALLOW).
            self.journal.reset()
            takeover.release_placeholders(self)
        self.listener = self.paths.listen(self.paths.supervisor_socket)
        self.selector.register(self.listener, selectors.EVENT_READ, self.control.accept)
        self.intake.start(self.group_fd, self.selector)
        self.pool.start()
        self.state = DaemonState.SERVING
        self.log.info("serving %d blobs (group %s, %d workers)", len(self.blobs),
                      "recovered from the keeper" if self.group_recovered else "new", self.settings.workers)

    # == the loop ==================================================================================

    def serve(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        last_tick = 0.0
        while self.state is DaemonState.SERVING:
            for key, mask in self.selector.select(self._timeout()):
                key.data(key.fileobj, mask)
            now = time.monotonic()
            self._expire_events(now)
            if now - last_tick >= TICK:
                last_tick = now
                self._tick(now)
        if self.state is DaemonState.RESTARTING:
            self.log.info("exiting for a restart; pending events stay journaled for the successor")
            self.keeper.stop_replacing()
            self.pool.stop_all("supervisor restarting")
        return self.exit_code

    def _on_sigterm(self, signum: int, frame: object) -> None:
        if self.state is DaemonState.SERVING:
            self.state = DaemonState.RESTARTING   # acted on by the loop, between two events

    def _timeout(self) -> float:
        now = time.monotonic()
        soonest = now + TICK
        for event in self.pending:
            soonest = min(soonest, event.deadline)
        return max(0.0, soonest - now)

    def _tick(self, now: float) -> None:
        self._expire_unwaited_tasks(now)
        self.pool.check(now)
        self.keeper.maintain()
        for blob in self.blobs:
            self.prefetch(blob)
        if self.metrics_enabled and now - self.last_snapshot >= 1.0:
            self.last_snapshot = now
            self.status_snapshot = self.status()

    # == events ====================================================================================

    def served_here(self, fd: int, st: os.stat_result, blob: Blob, start: int, end: int, received: float) -> bool:
        """Answer an event of a blob with a copy on this machine in one C call (inline.py: the range checked,
        filled from the copy if it has holes, checked again, allowed), journaled before and cleared after; only
        while no fill task is at work in the blob and none failed lately. False: the event (not noted yet) is the
        planner's."""
        local = self.inline.local(blob)
        if local is None or blob.inflight or blob.failures.remembers_any(received):
            return False
        self.journal.record(fd, st.st_dev, st.st_ino, start, end - start)
        served = self.inline.serve(local, fd, start, end)
        if served.outcome == NOT_HERE:
            return False
        if served.outcome < 0:
            self._inline_filled(blob, served.written, served.error, (served.chunks,))
            return False   # the planner finds the failure remembered: the read fails
        os.sched_yield()   # a reader woken onto this CPU goes first; the bookkeeping below can wait for it
        self.journal.clear(fd)
        os.close(fd)
        self.note_read(blob, start, end, received)
        now = time.monotonic()
        filled = served.outcome == FILLED
        if filled:
            self.counters["events_allowed_filled"] += 1
            self.counters["events_filled_demand"] += 1
            self._inline_filled(blob, served.written, "", ())
            self.latency.observe("filled", now - received)
            if blob.recorder is not None:
                blob.recorder.stalled(received, now)
        else:
            self.counters["events_allowed_present"] += 1
            self.latency.observe("present", now - received)
        self.keep_ahead(blob, start, end, missed=filled)
        if filled:
            self.check_complete(blob)
        return True

    def plan(self, event: PendingEvent, gaps: list[tuple[int, int]] | None = None) -> None:
        """Allow the event if its range is filled; otherwise make sure a task is filling every chunk
        with a hole in it. The only way to FAN_ALLOW a pending event. `gaps`: its range's holes, when
        they were just looked up."""
        blob = event.blob
        if blob.fill_fd is None and not blob.complete:   # no longer served: never let a reader onto holes
            self.log.error("blob %s: a pending read of bytes %d-%d outlived the blob's fill fd: failing it",
                           blob.name, event.start, event.end)
            self.counters["events_denied_unknown"] += 1
            self.answer(event, allow=False)
            return
        if gaps is None:
            gaps = [] if blob.fill_fd is None else holes(blob.fill_fd, event.start, event.end)
        plan = plan_event(gaps, chunk_size=blob.spec.chunk_size, plans=event.plans + 1,
                          task_chunks=self.settings.task_chunks, in_flight=blob.inflight, failures=blob.failures,
                          now=time.monotonic())
        if plan.allow:
            self.answer(event, allow=True)
            return
        event.plans += 1
        if plan.fail:
            if plan.exhausted:
                self.log.error("blob %s: bytes %d-%d %s: failing the read", blob.name, event.start, event.end,
                               plan.fail)
            self.counters["events_denied_failed"] += 1
            self.answer(event, allow=False)
            return
        filled = self._fill_inline(blob, plan.fill) if plan.fill and not plan.join else None
        if filled is not None:
            event.demand = True
            self.plan(event)   # now filled (allowed), or its chunks failed (denied)
            if filled:
                self.check_complete(blob)   # (once the reader is on its way)
            return
        for chunk in plan.join:
            task = blob.inflight[chunk]
            task.events.add(event)
            event.tasks.add(task)
            event.demand |= task.priority != Priority.PREFETCH   # (a read's own fill, or read ahead of one)
            event.learned |= task.learned
        for first, count in plan.fill:
            task = self._new_task(blob, first, count, Priority.DEMAND)
            task.events.add(event)
            event.tasks.add(task)
            event.demand = True
            self.pool.dispatch(task)

    def note_read(self, blob: Blob, start: int, end: int, now: float) -> None:
        """A read reached us (filled or not): record it, and count prefetched chunks it uses."""
        if blob.recorder is not None:
            blob.recorder.observe(start, end, now)
        elif blob.startup is not None:
            blob.startup.read(now)
        if blob.learned is not None:
            timeline = blob.learned.timeline
            if timeline.first_read is None:
                timeline.first_read, timeline.bytes_at_first_read = now, blob.learned.prefetched_bytes
            touched, used = blob.learned.mark_read(start, end)
            self.counters["learned_bytes_read"] += touched
            self.counters["learned_bytes_used"] += used

    def _fill_inline(self, blob: Blob, runs: tuple[tuple[int, int], ...]) -> bool | None:
        """Fill `runs` here and now if inline.py may (a small miss from a file on this machine): whether
        that fill succeeded, or None when it is a worker's."""
        result = self.inline.fill(blob, runs)
        if result is None:
            return None
        return self._inline_filled(blob, *result, runs)

    def _inline_filled(self, blob: Blob, written: int, error: str, runs: tuple[tuple[int, int], ...]) -> bool:
        """Count a fill done here; a failed one is logged and its chunks' failure remembered."""
        self.counters["fills_inline"] += 1
        self._count_filled(blob, written, "file", by_worker=False)
        if error:
            self.counters["fills_inline_failed"] += 1
            self.log.error("blob %s: filling chunks %s failed: %s", blob.name, list(runs), error)
            for first, count in runs:
                self._remember_failed(blob, first, count)
        return not error

    def keep_ahead(self, blob: Blob, start: int, end: int, *, missed: bool) -> None:
        """Keep filling ahead of the reader this read belongs to (planner.Streams): a sequential reader's
        window grows to `stream_window` chunks, filled in tasks of `task_chunks`, so bytes come at the
        link's rate before it asks; around a miss of any other reader, `fill_ahead` chunks in small tasks."""
        if blob.complete or blob.fill_fd is None:
            return
        chunk_size = blob.spec.chunk_size
        stream = blob.streams.follow(start, end, chunk_size=chunk_size, missed=missed,
                                     fill_ahead=self.settings.fill_ahead, max_window=self.settings.stream_window)
        if not stream.window:
            return
        if not missed and blob.learned is not None and blob.learned.covers(end - 1):
            return   # the learned trace knows what comes next better than a guess (a miss past it reads ahead)
        unit = self.settings.task_chunks if stream.sequential else FILL_AHEAD_TASK_CHUNKS
        window_end = min(blob.chunks, -(-end // chunk_size) + stream.window)
        if window_end < blob.chunks and window_end - stream.planned < min(unit, stream.window):
            return   # topped up in whole units: a window sliding one chunk per read would make 1-chunk tasks
        runs = read_ahead(end, chunk_size=chunk_size, chunks=blob.chunks, fill_ahead=stream.window,
                          in_flight=blob.inflight, filled=lambda chunk: self._chunk_filled(blob, chunk), unit=unit,
                          planned=stream.planned)
        stream.planned = window_end
        for first, count in runs:
            self.pool.dispatch(self._new_task(blob, first, count, Priority.AHEAD))

    def _chunk_filled(self, blob: Blob, chunk: int) -> bool:
        if blob.fill_fd is None:   # complete (or no longer served: nothing is filled for it any more)
            return True
        start = chunk * blob.spec.chunk_size
        return first_hole(blob.fill_fd, start, min(blob.spec.size, start + blob.spec.chunk_size)) is None

    def _remember_failure(self, task: Task) -> None:
        self._remember_failed(task.blob, task.first_chunk, task.chunk_count)

    def _remember_failed(self, blob: Blob, first: int, count: int) -> None:
        blob.failures.remember(first, count, time.monotonic() + self.settings.failure_memory)

    def _count_filled(self, blob: Blob, written: int, source: str, *, by_worker: bool) -> None:
        """A fill's bytes: in the blob's status; in the byte counters only when the supervisor wrote them
        (a worker counts what it writes itself, in its heartbeats, cancelled fills included)."""
        blob.filled_bytes += written
        if not by_worker:
            self.counters["bytes_filled"] += written
            self.counters[f"bytes_filled_{source_kind(source)}"] += written

    def answer(self, event: PendingEvent, *, allow: bool, timed_out: bool = False) -> None:
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
            self.counters["events_filled_demand"] += event.demand
            now = time.monotonic()
            self.latency.observe("filled", now - event.received)
            if event.blob.recorder is not None:   # the reader's wait does not count against its recording window
                event.blob.recorder.stalled(event.received, now)
            if event.learned and event.blob.learned is not None:
                self._learned_waited(event.blob.learned.timeline, now - event.received)
        event.blob.pending.discard(event)
        self.pending.discard(event)
        for task in list(event.tasks):
            task.events.discard(event)
            if not allow and not task.events and task.priority == Priority.DEMAND:
                if timed_out:
                    self._remember_failure(task)
                self.cancel(task)
        event.tasks.clear()

    def _expire_events(self, now: float) -> None:
        for event in [e for e in self.pending if e.deadline <= now]:
            self.log.error("blob %s: bytes %d-%d not filled within %.1f s: failing the read with EIO",
                           event.blob.name, event.start, event.end, self.settings.fetch_deadline)
            self.counters["events_denied_timeout"] += 1
            self.answer(event, allow=False, timed_out=True)

    def _expire_unwaited_tasks(self, now: float) -> None:
        """Fill-ahead and prefetch tasks have no reader to time out with: give them the same deadline,
        so a hung provider cannot pile them up in the workers."""
        for blob in self.blobs:
            for task in blob.tasks():
                if not task.events and now - task.created > self.settings.fetch_deadline:
                    self.log.error("blob %s: background fill of bytes %d-%d not done within %.1f s: cancelled",
                                   blob.name, task.offset, task.offset + task.length, self.settings.fetch_deadline)
                    self._remember_failure(task)
                    if task.priority == Priority.PREFETCH:
                        blob.prefetch_paused_until = now + PREFETCH_RETRY
                    self.cancel(task)

    # == tasks =====================================================================================

    def _new_task(self, blob: Blob, first: int, count: int, priority: Priority, *, learned: bool = False) -> Task:
        task = Task(id=self.next_task_id, blob=blob, first_chunk=first, chunk_count=count, priority=priority,
                    created=time.monotonic(), learned=learned)
        self.next_task_id += 1
        for chunk in range(first, first + count):
            blob.inflight[chunk] = task
        if priority == Priority.PREFETCH:
            blob.prefetch_inflight += 1
        return task

    def _unfill(self, task: Task) -> None:
        """Take a finished or cancelled task off its blob's chunks."""
        blob = task.blob
        for chunk in range(task.first_chunk, task.first_chunk + task.chunk_count):
            if blob.inflight.get(chunk) is task:
                del blob.inflight[chunk]
        if task.priority == Priority.PREFETCH:
            blob.prefetch_inflight -= 1

    def cancel(self, task: Task) -> None:
        self._unfill(task)
        self.counters["tasks_cancelled"] += 1
        self.pool.cancel(task)

    def blobs_to_serve(self) -> list[Blob]:
        return [blob for blob in self.blobs if blob.fill_fd is not None]

    def task_finished(self, task: Task, ok: bool, message: p.FillDone | p.FillFailed) -> None:
        blob = task.blob
        self._unfill(task)
        if isinstance(message, p.FillDone):
            self.counters["tasks_done"] += 1
            self._count_filled(blob, message.written, message.source, by_worker=True)
            if task.priority == Priority.PREFETCH:
                self.counters["bytes_prefetched"] += message.written
            if task.learned and blob.learned is not None:
                self.counters["learned_bytes_prefetched"] += task.length
                self.counters["learned_bytes_used"] += blob.learned.mark_prefetched(
                    range(task.first_chunk, task.first_chunk + task.chunk_count))
                if not blob.learned.runs and not any(t.learned for t in blob.tasks()):
                    self._learned_finished(blob)
        else:
            self.counters["tasks_failed"] += 1
            self.log.error("blob %s: filling bytes %d-%d failed: %s", blob.name, task.offset,
                           task.offset + task.length, message.error)
            if task.priority == Priority.PREFETCH:
                blob.prefetch_paused_until = time.monotonic() + PREFETCH_RETRY
            self._remember_failure(task)
        for event in list(task.events):
            event.tasks.discard(task)
            if event.answered:
                continue
            if not ok:
                self.counters["events_denied_failed"] += 1
                self.answer(event, allow=False)
            elif not event.tasks:
                self.plan(event)
        task.events.clear()
        if self.blobs.get(blob.name) is blob:
            self.check_complete(blob)
            self.prefetch(blob)

    def range_written(self, name: str, offset: int, length: int) -> None:
        """Let on every reader waiting only for bytes a fill in progress has now written."""
        blob = self.blobs.get(name)
        if blob is None or blob.fill_fd is None:
            return
        end = offset + length
        for event in [e for e in blob.pending if e.start < end and offset < e.end]:
            if first_hole(blob.fill_fd, event.start, event.end) is None:
                self.answer(event, allow=True)

    def learn(self, blob: Blob, learned: list[list[int]], record: float) -> None:
        """A blob just registered: record its first reads for `record` seconds, and fetch the `learned`
        ranges ([offset, length], what readers of it read first) before anything else in the background."""
        if blob.complete:
            return
        blob.recorder = TraceRecorder(blob.spec.size, record) if record > 0 else None
        blob.startup = startup_gate(blob, record=record, quiet=self.settings.startup_quiet)
        if learned:
            blob.learned = LearnedPrefetch.plan([(int(o), int(n)) for o, n in learned], size=blob.spec.size,
                                                chunk_size=blob.spec.chunk_size, task_chunks=self.settings.task_chunks)
            self.counters["learned_blobs"] += 1

    def prefetch(self, blob: Blob) -> None:
        """Fill in the background, at prefetch priority: first the blob's learned ranges in their order
        (`learned_inflight` tasks at a time), then, with `prefetch`, its holes (`prefetch_inflight` at a time,
        once its startup is over: startup.py)."""
        fill_fd = blob.fill_fd
        if blob.complete or fill_fd is None or time.monotonic() < blob.prefetch_paused_until:
            return
        if blob.learned is not None and blob.learned.runs:
            for first, count in plan_learned(blob.learned.runs, budget=self.settings.learned_inflight - blob.prefetch_inflight,
                                             task_chunks=self.settings.task_chunks, in_flight=blob.inflight,
                                             filled=lambda chunk: self._chunk_filled(blob, chunk)):
                if blob.learned.timeline.started is None:
                    blob.learned.timeline.started = time.monotonic()
                self.pool.dispatch(self._new_task(blob, first, count, Priority.PREFETCH, learned=True))
            if blob.learned.runs:
                return
        if not blob.prefetch or blob.leaving:
            return
        if not startup_over(blob, time.monotonic()):
            return   # it would compete with the startup's reads (and a blob filled whole loses its mark)
        if not blob.filling_rest:
            blob.filling_rest = True
            self.log.info("blob %s: its startup is over: filling the rest in the background", blob.name)
        size = blob.spec.size
        runs, blob.prefetch_cursor = plan_prefetch(
            blob.prefetch_cursor, size=size, chunk_size=blob.spec.chunk_size,
            budget=self.settings.prefetch_inflight - blob.prefetch_inflight, task_chunks=self.settings.task_chunks,
            first_hole=lambda offset: first_hole(fill_fd, offset, size), in_flight=blob.inflight,
            filled=lambda chunk: self._chunk_filled(blob, chunk))
        for first, count in runs:
            self.pool.dispatch(self._new_task(blob, first, count, Priority.PREFETCH))

    def _learned_waited(self, timeline: LearnedTimeline, seconds: float) -> None:
        timeline.waits += 1
        timeline.wait_seconds += seconds
        self.counters["learned_waits"] += 1
        self.counters["learned_wait_ms"] += round(seconds * 1000)

    def _learned_finished(self, blob: Blob) -> None:
        """The blob's learned stream fetched its last chunk: say how it went against the readers."""
        learned = blob.learned
        if learned is None or learned.timeline.finished is not None:
            return
        learned.timeline.finished = time.monotonic()
        shown = learned.timeline.details()
        self.log.info("blob %s: learned prefetch of %.1f MiB done (ms from registration: started %d, finished %d, "
                      "first read %d with %.1f MiB fetched); %d reads waited for it, %d ms in all", blob.name,
                      learned.prefetched_bytes / 2**20, shown["learned_started_ms"], shown["learned_finished_ms"],
                      shown["learned_first_read_ms"], shown["learned_bytes_at_first_read"] / 2**20,
                      shown["learned_waits"], shown["learned_wait_ms"])

    # == completion ================================================================================

    def check_complete(self, blob: Blob) -> None:
        if blob.complete or not self.blobs.is_whole(blob):
            return
        for event in list(blob.pending):
            self.plan(event)   # all filled: each is allowed
        for task in blob.tasks():
            self.cancel(task)  # finished writing, or nothing left to write
        self.pool.forget_everywhere(blob)
        self.inline.forget(blob)
        self.blobs.complete(blob)
        self.counters["blobs_completed"] += 1
        self.log.info("blob %s is complete: mark removed", blob.name)
        for watcher in list(self.links.watchers):
            self.links.send(watcher, p.BlobComplete(name=blob.name, path=blob.path))

    # == status ====================================================================================

    def status(self) -> SupervisorStatus:
        counters = {**self.counters, **self.pool.reported.totals(dict.fromkeys(WORKER_COUNTERS))}
        workers_filled = self.pool.reported.totals(dict.fromkeys(FILLED_COUNTERS))
        for name in FILLED_COUNTERS:   # the workers' writes, and the supervisor's own (inline fills)
            counters[name] += workers_filled[name]
        return SupervisorStatus(
            backend="fanotify", pid=os.getpid(), state=self.state, uptime=time.time() - self.started,
            settings=asdict(self.settings), counters={name: float(value) for name, value in counters.items()},
            workers=self.pool.status(time.monotonic()), blobs=[self.blobs.status(b) for b in self.blobs],
            fetch=self.pool.fetched.totals(),
            details={"group_recovered": self.group_recovered, "supervisor_restarts": self.keeper.supervisor_restarts,
                     "keeper_pid": self.keeper.pid, "pending_events": len(self.pending),
                     "queued_tasks": len(self.pool.queue), "latency": self.latency.to_json()})


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
    gc.freeze()   # what startup made lives as long as we do: collections walk only what events make
    return supervisor.serve()


if __name__ == "__main__":
    sys.exit(main())
