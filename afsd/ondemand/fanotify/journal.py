"""The pending-event journal: which fanotify events the supervisor has read but not yet answered.

Why it exists: the kernel matches an answer to an event by the fd number the event was delivered with,
and the group outlives a crashed supervisor (the keeper holds it). A restarted supervisor reads this
journal to learn which events its predecessor left unanswered (blob inode, byte range, fd number) and
answers them itself once their bytes are filled. Events read but not journaled yet (a window of a few
instructions) are found by a sweep: every other fd number below the slot count (which is also the
supervisor's RLIMIT_NOFILE, so no event fd can lie beyond it) gets a FAN_DENY|EIO answer, which the
kernel ignores (ENOENT) unless that event is really still pending.

The journal is a MAP_SHARED file, so recording an event costs a memory write, not a syscall, and the
bytes survive the writer's death (not a machine crash, which takes the mounts with it). Slots are
indexed by fd number.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

_HEADER = struct.Struct("=8sIIQ")            # magic, version, slots, reserved
_SLOT = struct.Struct("=IIQQQQ")             # state, reserved, st_dev, st_ino, offset, count
_MAGIC = b"AFSDJRNL"
_VERSION = 1
_PENDING = 1


@dataclass(frozen=True)
class JournaledEvent:
    fd: int
    dev: int
    ino: int
    offset: int
    count: int


class Journal:
    def __init__(self, path: Path, slots: int) -> None:
        self.path = path
        self.slots = slots
        size = _HEADER.size + slots * _SLOT.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            existing = os.fstat(fd).st_size
            header = os.pread(fd, _HEADER.size, 0) if existing >= _HEADER.size else b""
            valid = len(header) == _HEADER.size and _HEADER.unpack(header)[:2] == (_MAGIC, _VERSION)
            if not valid or _HEADER.unpack(header)[2] != slots:
                previous = self._read_entries(fd, existing) if valid else []
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
                os.pwrite(fd, _HEADER.pack(_MAGIC, _VERSION, slots, 0), 0)
                for entry in previous:  # a changed slot count keeps what the predecessor left
                    if entry.fd < slots:
                        os.pwrite(fd, _SLOT.pack(_PENDING, 0, entry.dev, entry.ino, entry.offset, entry.count),
                                  _HEADER.size + entry.fd * _SLOT.size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    @staticmethod
    def _read_entries(fd: int, size: int) -> list[JournaledEvent]:
        _, _, slots, _ = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
        data = os.pread(fd, min(size, _HEADER.size + slots * _SLOT.size), 0)
        return list(_entries(data, slots))

    def record(self, fd: int, dev: int, ino: int, offset: int, count: int) -> None:
        if fd < self.slots:
            _SLOT.pack_into(self._map, _HEADER.size + fd * _SLOT.size, _PENDING, 0, dev, ino, offset, count)

    def clear(self, fd: int) -> None:
        if fd < self.slots:
            struct.pack_into("=I", self._map, _HEADER.size + fd * _SLOT.size, 0)

    def pending(self) -> list[JournaledEvent]:
        return list(_entries(self._map, self.slots))

    def reset(self) -> None:
        """Forget everything (after the predecessor's events have all been dealt with)."""
        self._map[_HEADER.size:] = bytes(len(self._map) - _HEADER.size)

    def close(self) -> None:
        self._map.close()


def _entries(data: bytes | mmap.mmap, slots: int) -> list[JournaledEvent]:
    found = []
    view = memoryview(data)
    end = min(len(view), _HEADER.size + slots * _SLOT.size)
    # Scan in big steps: almost all of the table is zeros.
    step = 4096 - 4096 % _SLOT.size
    position = _HEADER.size
    while position < end:
        block_end = min(end, position + step)
        if view[position:block_end].tobytes().count(0) != block_end - position:
            for slot_at in range(position, block_end, _SLOT.size):
                state, _, dev, ino, offset, count = _SLOT.unpack_from(view, slot_at)
                if state == _PENDING:
                    found.append(JournaledEvent((slot_at - _HEADER.size) // _SLOT.size, dev, ino, offset, count))
        position = block_end
    view.release()
    return found


def slot_count(path: Path, default: int) -> int:
    """The slot count a journal was written with (the sweep's upper bound), or `default`."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(_HEADER.size)
    except FileNotFoundError:
        return default
    if len(header) < _HEADER.size or _HEADER.unpack(header)[:2] != (_MAGIC, _VERSION):
        return default
    return _HEADER.unpack(header)[2]


def reserve_fd_numbers(numbers: set[int]) -> set[int]:
    """Keep the fd numbers of a predecessor's unanswered events out of use (open /dev/null on each
    free one): a new event delivered with the same number would be mistaken for the old one when
    answered. Returns the numbers we opened placeholders on."""
    placeholders = set()
    for number in sorted(numbers):
        try:
            os.fstat(number)
            continue        # already open (one of our lifetime fds): it stays taken
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        if null != number:
            os.dup2(null, number, inheritable=False)
            os.close(null)
        placeholders.add(number)
    return placeholders
