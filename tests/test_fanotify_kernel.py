"""Kernel facts the fanotify backend's crash safety rests on, pinned on the host kernel (raw syscalls,
no supervisor): if one of these changes, docs/fanotify-backend.md and the design must change too."""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from afsd.ondemand.fanotify import _sys
from tests.support.fanotify_lab import markable_temp_root

_READ_ONE_EVENT = r"""
import os, select, sys
from afsd.ondemand.fanotify import _sys
group = int(sys.argv[1])
select.select([group], [], [])
event = next(_sys.parse_events(os.read(group, 4096)))
print(event.fd, flush=True)
select.select([], [], [])          # never answers; killed by the test
"""
_READ_BYTES = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    print(os.pread(fd, 4096, 1 << 20).count(0))
except OSError as e:
    print("errno", e.errno)
"""


@pytest.fixture
def marked_file() -> Iterator[tuple[Path, int, int]]:
    """A 4 MiB file of holes on a markable filesystem, its pre-mark fd, and a group marking it."""
    directory = Path(tempfile.mkdtemp(prefix="afsd-fankernel-", dir=markable_temp_root()))
    path = directory / "blob"
    before = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(before, 4 << 20)
    group = _sys.new_pre_content_group()
    _sys.mark_pre_access(group, before)
    try:
        yield path, before, group
    finally:
        os.close(group)
        os.close(before)
        path.unlink()
        directory.rmdir()


def test_fill_fd_opened_before_the_mark_writes_without_events(marked_file: tuple[Path, int, int]) -> None:
    """Whether an fd raises pre-content events is fixed when it is opened: one opened before the mark
    (a fill fd) writes freely; one opened after raises an event for its own write."""
    path, before, group = marked_file
    after = os.open(path, os.O_RDWR)
    try:
        os.pwrite(before, b"x" * 4096, 0)          # would block forever if it raised an event
        try:
            os.read(group, 4096)
            raise AssertionError("a write through the pre-mark fd raised an event")
        except BlockingIOError:
            pass
        writer = threading.Thread(target=os.pwrite, args=(after, b"y" * 4096, 8192))
        writer.start()
        assert select.select([group], [], [], 10)[0], "a write through a post-mark fd raised no event"
        events = list(_sys.parse_events(os.read(group, 4096)))
        assert [(e.mask, e.offset, e.count) for e in events] == [(_sys.FAN_PRE_ACCESS, 8192, 4096)]
        _sys.respond(group, events[0].fd, True)
        os.close(events[0].fd)
        writer.join(10)
        assert not writer.is_alive()
        assert os.pread(before, 4, 8192) == b"yyyy"
    finally:
        os.close(after)


def test_a_second_holder_keeps_a_dead_listeners_event_pending(marked_file: tuple[Path, int, int]) -> None:
    """The keeper's reason to exist: when the process that read an event dies, the event stays pending
    as long as another process holds the group; it can be answered by its fd number afterwards, and an
    answer for a number with no pending event is refused (ENOENT) without harm, so a sweep over all
    numbers fails exactly the leftovers."""
    path, before, group = marked_file
    os.pwrite(before, b"\x01" * (1 << 20), 1 << 20)       # filled, but still marked
    listener = subprocess.Popen([sys.executable, "-c", _READ_ONE_EVENT, str(group)], pass_fds=[group],
                                stdout=subprocess.PIPE, text=True)
    readers = []
    try:
        readers.append(subprocess.Popen([sys.executable, "-c", _READ_BYTES, str(path)], stdout=subprocess.PIPE,
                                        text=True))
        number = int(listener.stdout.readline())            # type: ignore[union-attr]
        listener.kill()
        listener.wait()
        time.sleep(0.5)
        assert readers[0].poll() is None, "the event was answered when its listener died"
        assert not _sys.respond(group, number + 1000, True)   # no such pending event: refused
        assert _sys.sweep_unanswered(group, 1024, skip={number}) == []
        assert _sys.respond(group, number, True)             # answered by number, from another process
        assert readers[0].communicate(timeout=10)[0].strip() == "0"   # the filled bytes, no zeros
        # The same situation, answered by a sweep instead: the reader fails loudly.
        listener = subprocess.Popen([sys.executable, "-c", _READ_ONE_EVENT, str(group)], pass_fds=[group],
                                    stdout=subprocess.PIPE, text=True)
        os.posix_fadvise(before, 0, 0, os.POSIX_FADV_DONTNEED)
        readers.append(subprocess.Popen([sys.executable, "-c", _READ_BYTES, str(path)], stdout=subprocess.PIPE,
                                        text=True))
        number = int(listener.stdout.readline())            # type: ignore[union-attr]
        listener.send_signal(signal.SIGKILL)
        listener.wait()
        assert _sys.sweep_unanswered(group, 1024) == [number]
        assert readers[1].communicate(timeout=10)[0].strip() == f"errno {errno.EIO}"
    finally:
        for process in [listener, *readers]:
            if process.poll() is None:
                process.kill()
            process.communicate()
