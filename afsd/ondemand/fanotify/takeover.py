"""What a fanotify supervisor does before it serves, when it follows another: serve again the blobs its
predecessor registered (DIR/blobs/*.json), and answer the events it left unanswered (journal.py) — the
journaled ones are planned and filled like new ones, the others are found by the sweep and failed.

Why its own module: it runs once, at startup (supervisor.py's `start`), on the supervisor's state, and
the crash-safety argument it carries (docs/fanotify-backend.md, "supervisor death") reads best in one place.
"""

from __future__ import annotations

import errno
import os
import time
from typing import TYPE_CHECKING

from afsd.ondemand.fanotify import _sys
from afsd.ondemand.fanotify.blobs import RegistrationError
from afsd.ondemand.fanotify.model import PendingEvent

if TYPE_CHECKING:
    from afsd.ondemand.fanotify.supervisor import Supervisor


def load_blobs(sup: Supervisor, held_fills: dict[str, int]) -> None:
    """Serve again what a predecessor registered and did not finish (DIR/blobs/*.json)."""
    for record, spec in sup.blobs.records():
        fill_fd = held_fills.pop(spec.name, None)
        try:
            if fill_fd is not None and sup.group_recovered:
                sup.check_complete(sup.blobs.adopt(record, spec, fill_fd))
                continue
            if fill_fd is not None:
                os.close(fill_fd)
            blob = sup.control.register(spec, str(record["path"]), record.get("source") or {},
                                        bool(record.get("prefetch")), from_record=True)
            if not blob.complete:   # registered before, but the group that served it is gone
                sup.blobs.taint(blob, record)
                sup.log.error("blob %s was served by a group that no longer exists: reads of its "
                              "unfilled ranges since then returned zeros; remount it", spec.name)
        except (RegistrationError, OSError) as e:
            sup.log.error("cannot resume blob %s (%s): %s", spec.name, record.get("path"), e)
    for fd in held_fills.values():   # fill fds of blobs whose record is gone (unregister interrupted)
        os.close(fd)


def take_over_predecessor_events(sup: Supervisor) -> None:
    """Answer what the previous supervisor left: journaled events get filled and allowed; any other
    event it had read (not journaled yet) is found by the sweep and failed with EIO."""
    journaled = {entry.fd for entry in sup.leftovers}
    swept = _sys.sweep_unanswered(sup.group_fd, sup.journal.slots, journaled)
    sup.counters["events_swept"] += len(swept)
    if swept:
        sup.log.error("failed %d events the previous supervisor had read but not journaled", len(swept))
    now = time.monotonic()
    for entry in sup.leftovers:
        blob = sup.blobs.at_inode(entry.dev, entry.ino)
        sup.counters["events_recovered"] += 1
        if blob is None or blob.fill_fd is None and not blob.complete:
            sup.counters["events_denied_unknown"] += 1
            _sys.respond(sup.group_fd, entry.fd, False, errno.EIO)
            sup.journal.clear(entry.fd)
            if entry.fd in sup.placeholders:
                os.close(entry.fd)
                sup.placeholders.discard(entry.fd)
            continue
        event = PendingEvent(fd=entry.fd, blob=blob, start=entry.offset, end=entry.offset + entry.count,
                             received=now, deadline=now + sup.settings.fetch_deadline, owned=False,
                             placeholder=entry.fd in sup.placeholders)
        blob.pending.add(event)
        sup.pending.add(event)
        sup.plan(event)
    sup.leftovers = []
    sup.log.info("took over %d pending events from the previous supervisor", len(journaled))


def release_placeholders(sup: Supervisor) -> None:
    """No group survived the predecessor: the fd numbers its events had are free again."""
    for fd in sup.placeholders:
        os.close(fd)
    sup.placeholders = set()
