"""The fanotify supervisor's event intake: read the group fd, answer present ranges in C, hand every
other event to the supervisor's planner in order, and do the present reads' bookkeeping in one batch.

Why the split: a learned start raises hundreds of events whose range the learned stream already filled.
Answering each in Python (a loop round: read, parse, fstat, blob lookup, SEEK_HOLE, answer, close) and
then recording it (trace, learned counters, read-ahead) cost about 150 µs of supervisor CPU, and the
reader's next event waited for it. afsd_take_events (c_ext/fanotify_shim.c) answers them with a few
syscalls each, waits a little for the next one (`LINGER_US`, only while no reader waits on a fill, never
past `BUDGET_US`, and not once anything else the loop watches is ready), and returns the answered ranges as
records; the bookkeeping runs once the run of present reads pauses. The rule is unchanged: FAN_ALLOW only
for a blob we serve through its fill fd (BlobTable.served, rebuilt whenever it changes) and a range with
no hole; misses, unknown files, events without a range and errors come back with their fd open and go to
`on_event`, the one Python path, as before.

Crash safety is unchanged (docs/fanotify-backend.md): a present range was never journaled (it is answered
before anything else happens to it); an event C left to Python is journaled by `on_event` as before; if
the supervisor dies between C's answer and the bookkeeping, only the records (trace, counters) are lost.
"""

from __future__ import annotations

import errno
import os
import selectors
import time
from typing import TYPE_CHECKING

from afsd.ondemand.fanotify import _sys
from afsd.ondemand.fanotify.model import Blob, PendingEvent
from afsd.ondemand.fanotify.shim import ffi, lib
from afsd.ondemand.sparse import holes

if TYPE_CHECKING:
    from afsd.ondemand.fanotify.supervisor import Supervisor

READ_BYTES = 1 << 16    # one read of the group fd takes up to this much (every event queued, mostly)
LINGER_US = 1000        # after answering present ranges, wait this long for the reader's next event
BUDGET_US = 5000        # most one call waits in all: the loop's timers (deadlines, ticks) come next
_RECORDS = READ_BYTES // _sys.EVENT_MIN_SIZE + 1   # room for one read's events (afsd_intake's rule)


class EventIntake:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self._buffer = ffi.new("uint8_t[]", READ_BYTES)
        # Twice one read's worth: after a read that answered everything, C reads once more before returning.
        self._events = ffi.new("struct afsd_event[]", 2 * _RECORDS)
        self._presents = ffi.new("struct afsd_present[]", 2 * _RECORDS)
        self._served = ffi.new("struct afsd_served[]", 0)
        self._served_version = -1
        c = self._c = ffi.new("struct afsd_intake *")
        c.buffer, c.buffer_size = self._buffer, READ_BYTES
        c.events, c.events_capacity = self._events, len(self._events)
        c.presents, c.presents_capacity = self._presents, len(self._presents)
        c.linger_us, c.budget_us = LINGER_US, BUDGET_US

    def start(self, group_fd: int, selector: selectors.BaseSelector) -> None:
        self._c.group_fd = group_fd
        # An epoll fd is readable while anything registered in it is: C stops waiting when the loop has work.
        self._c.wake_fd = selector.fileno() if isinstance(selector, selectors.EpollSelector) else -1
        selector.register(group_fd, selectors.EVENT_READ, self.on_readable)

    def _sync_served(self) -> None:
        """Give C the blobs served right now (never one we stopped serving: its fill fd may be reused)."""
        blobs = self.sup.blobs
        if blobs.changes == self._served_version:
            return
        served = blobs.served()
        table = ffi.new("struct afsd_served[]", len(served))
        for entry, (dev, ino, size, fill_fd) in zip(table, served):
            entry.dev, entry.ino, entry.size, entry.fill_fd = dev, ino, size, fill_fd
        self._served, self._served_version = table, blobs.changes
        self._c.served, self._c.served_count = table, len(served)

    def on_readable(self, fd: int, mask: int) -> None:
        sup = self.sup
        c = self._c
        for _ in range(64):  # then let other sources in
            self._sync_served()
            c.linger_us = 0 if sup.pending else LINGER_US   # a reader waiting on a fill must not wait on us
            lib.afsd_take_events(c)
            presents = self._note_presents(c.presents_count)   # (first: they were read first)
            for index in range(c.events_count):
                on_event(sup, _sys.event_of(self._events[index]))
            for blob, start, end in presents:   # what they imply, once the misses are on their way
                sup.keep_ahead(blob, start, end, missed=False)
            if c.error:
                raise OSError(-c.error, f"reading the fanotify group: {os.strerror(-c.error)}")
            if not c.more:
                return

    def _note_presents(self, count: int) -> list[tuple[Blob, int, int]]:
        """Count and record (trace, learned counters) the present ranges C answered, in the order they were
        read; returns them for read-ahead."""
        if not count:
            return []
        sup = self.sup
        counters = sup.counters
        counters["events_total"] += count
        counters["events_allowed_present"] += count
        counters["events_allowed_present_intake"] += count
        observe = sup.latency.observe
        at_inode = sup.blobs.at_inode
        noted = []
        for present in self._presents[0:count]:
            observe("present", present.answered - present.received)
            blob = at_inode(present.dev, present.ino)
            if blob is not None:   # (None: unregistered since; its served entry went with it)
                sup.note_read(blob, present.start, present.end, present.received)
                noted.append((blob, present.start, present.end))
        return noted


def on_event(sup: Supervisor, raw: _sys.Event) -> None:
    """An event C did not answer: deny it, answer it, or journal it and plan its fill."""
    sup.counters["events_total"] += 1
    if raw.fd < 0:
        sup.log.error("fanotify event without fd (mask %#x): the queue overflowed?", raw.mask)
        return
    received = time.monotonic()
    try:
        st = os.fstat(raw.fd)
    except OSError as e:   # cannot happen for an fd the kernel just gave us; never let it through
        sup.log.error("cannot stat the fd of an event: %s", e)
        _sys.respond(sup.group_fd, raw.fd, False, errno.EIO)
        return
    blob = sup.blobs.at_inode(st.st_dev, st.st_ino)
    if blob is None or (blob.fill_fd is None and not blob.complete):
        # A file we no longer serve (unregistered while still in use): never let it read holes.
        sup.counters["events_denied_unknown"] += 1
        _sys.respond(sup.group_fd, raw.fd, False, errno.EIO)
        os.close(raw.fd)
        return
    size = blob.spec.size
    start = min(raw.offset if raw.offset is not None else 0, size)
    end = size if raw.count is None else min(size, start + raw.count)
    if blob.fill_fd is not None and sup.served_here(raw.fd, st, blob, start, end, received):
        return
    gaps = [] if blob.complete or blob.fill_fd is None else holes(blob.fill_fd, start, end)
    if not gaps:   # (C answers these first; what reaches here: complete blobs, no range, a failed answer)
        _sys.respond(sup.group_fd, raw.fd, True)
        sup.journal.clear(raw.fd)   # (served_here may have journaled it)
        os.close(raw.fd)
        sup.counters["events_allowed_present"] += 1
        sup.latency.observe("present", time.monotonic() - received)
        sup.note_read(blob, start, end, received)
        sup.keep_ahead(blob, start, end, missed=False)
        return
    sup.note_read(blob, start, end, received)
    sup.journal.record(raw.fd, st.st_dev, st.st_ino, start, end - start)
    event = PendingEvent(fd=raw.fd, blob=blob, start=start, end=end, received=received,
                         deadline=received + sup.settings.fetch_deadline, owned=True)
    blob.pending.add(event)
    sup.pending.add(event)
    sup.plan(event, gaps)
    sup.keep_ahead(blob, start, end, missed=True)
