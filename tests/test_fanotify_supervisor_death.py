"""What readers see when the fanotify supervisor itself dies (docs/fanotify-backend.md pins it here).

- The supervisor alone dies: the keeper still holds the group, so pending reads stay blocked (no
  FAN_ALLOW from the kernel); the keeper starts a new supervisor, which fills and answers them.
- The keeper alone dies: the supervisor starts a new keeper and hands it the fds again.
- No supervisor comes back: after the orphan deadline the keeper fails every read with EIO.
- Both die at once: the kernel releases the group; pending and later reads of unfilled ranges return
  zeros (the danger this design narrows but cannot remove), until a new supervisor marks the blobs
  again; pages read as zeros stay cached until the blob is remounted.

Settings keep a sequential reader's window at `fill_ahead` (stream_window): holes must remain for the
later reads to go through the restarted processes.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import threading

from afsd.erofs.mount import mount_erofs, unmount
from afsd.ondemand.fanotify.settings import Settings
from tests.support import fanotify_sources
from tests.support.fanotify_lab import FanotifyLab, data_files


def slow_source(lab: FanotifyLab, delay: float) -> dict:
    return fanotify_sources.config("slow", path=str(lab.blob.full), delay=delay, markers=str(lab.markers))


async def test_killed_supervisor_is_replaced_and_pending_reads_get_right_bytes(fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    await lab.start(Settings(workers=1, fetch_deadline=60, fill_ahead=3, stream_window=3))
    served = await lab.serve(slow_source(lab, 1.0))
    first = (await lab.status()).pid
    names = data_files(blob)[:2]
    readers = [lab.start_reader(served.mount / name) for name in names]
    await lab.wait_for_marker(set())
    os.kill(first, signal.SIGKILL)
    for name, reader in zip(names, readers):
        result = await lab.finish(reader)
        assert result.ok and result.sha256 == blob.files[name] and result.zero_pages == 0
    status = await lab.status()
    assert status.pid != first and status.details["group_recovered"]
    assert status.details["supervisor_restarts"] == 1
    assert status.counters["events_recovered"] >= 1
    assert not status.blobs[0].complete and not status.blobs[0].details["tainted"]
    for name in data_files(blob)[2:4]:     # and it goes on serving
        result = await lab.read(served.mount / name)
        assert result.ok and result.sha256 == blob.files[name]


async def test_killed_keeper_is_replaced_and_still_protects_pending_reads(fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    await lab.start(Settings(workers=1, fetch_deadline=60, fill_ahead=3, stream_window=3))
    served = await lab.serve(slow_source(lab, 1.0))
    before = await lab.status()
    os.kill(before.details["keeper_pid"], signal.SIGKILL)
    after = await lab.wait_status(lambda s: s.details["keeper_pid"] not in (0, before.details["keeper_pid"]))
    assert after.counters["keeper_restarts"] == 1 and after.pid == before.pid
    name = data_files(blob)[0]
    reader = lab.start_reader(served.mount / name)
    await lab.wait_for_marker(set())
    os.kill(after.pid, signal.SIGKILL)   # now the new keeper is the only other holder
    result = await lab.finish(reader)
    assert result.ok and result.sha256 == blob.files[name]
    assert (await lab.status()).details["group_recovered"]


async def test_keeper_fails_reads_with_eio_when_no_supervisor_comes_back(fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    client = await lab.start(Settings(workers=1, fetch_deadline=60, orphan_deadline=1.0, fill_ahead=3,
                                      stream_window=3))
    served = await lab.serve(slow_source(lab, 2.0))
    supervisor = (await lab.status()).pid
    names = data_files(blob)
    reader = lab.start_reader(served.mount / names[0])
    await lab.wait_for_marker(set())
    # Hold the supervisor lock the moment it is free, so the restarted supervisor cannot start.
    lock = os.open(client.paths.supervisor_lock, os.O_RDWR)
    locked = threading.Event()

    def grab() -> None:
        fcntl.flock(lock, fcntl.LOCK_EX)
        locked.set()
    grabber = threading.Thread(target=grab)
    grabber.start()
    os.kill(supervisor, signal.SIGKILL)
    grabber.join(10)
    assert locked.is_set()
    try:
        result = await lab.finish(reader)
        assert not result.ok and result.errno == errno.EIO          # failed loudly, not zeros
        result = await lab.read(served.mount / names[1])            # new reads too
        assert not result.ok and result.errno == errno.EIO
    finally:
        os.close(lock)
    await client.ensure_running()                                   # a supervisor comes back
    for name in names[2:4]:
        result = await lab.read(served.mount / name)
        assert result.ok and result.sha256 == blob.files[name]
    assert (await lab.status()).details["group_recovered"]


async def test_supervisor_and_keeper_dying_together_let_readers_see_zeros(fanotify_lab: FanotifyLab) -> None:
    """The window the design cannot close: with no process left holding the group, the kernel answers
    pending events with FAN_ALLOW and stops raising events: unfilled ranges read as zeros."""
    lab, blob = fanotify_lab, fanotify_lab.blob
    client = await lab.start(Settings(workers=1, fetch_deadline=60, fill_ahead=3, stream_window=3))
    served = await lab.serve(slow_source(lab, 2.0))
    status = await lab.status()
    names = data_files(blob)
    reader = lab.start_reader(served.mount / names[0])
    await lab.wait_for_marker(set())
    os.kill(status.pid, signal.SIGKILL)
    os.kill(status.details["keeper_pid"], signal.SIGKILL)
    pending = await lab.finish(reader)
    assert pending.ok and pending.sha256 != blob.files[names[0]] and pending.zero_pages == pending.pages
    later = await lab.read(served.mount / names[1])                  # no group: no events at all
    assert later.ok and later.zero_pages == later.pages

    await client.ensure_running()   # a new supervisor, a new group: it marks the blob again
    status = await lab.status()
    assert not status.details["group_recovered"] and status.blobs[0].details["tainted"]
    result = await lab.read(served.mount / names[2])                 # the same mount raises events again
    assert result.ok and result.sha256 == blob.files[names[2]]
    again = await lab.read(served.mount / names[0])                  # the zeros stay cached...
    # (the kernel may have evicted a page meanwhile, which then refills correctly: most stay zero)
    assert again.sha256 != blob.files[names[0]] and again.zero_pages >= again.pages - 2
    await asyncio.to_thread(unmount, served.mount)                  # ...until the blob is remounted
    await asyncio.to_thread(mount_erofs, served.path, served.mount)
    for name in names[:2]:
        result = await lab.read(served.mount / name)
        assert result.ok and result.sha256 == blob.files[name]
