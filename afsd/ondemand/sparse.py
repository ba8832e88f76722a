"""Which bytes of a partly filled blob file are there, and writing bytes into one: written once for every
backend (the fanotify blob file, the fscache cache file behind an anon fd and the copy the fscache worker
tees into, the eager backend's copy, and the default `Backend.present_bytes`).

Presence is asked with lseek(SEEK_HOLE / SEEK_DATA): it reads no data, so it raises no fanotify event on
a marked blob and needs no aligned buffer on a cachefiles anon fd.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def first_hole(fd: int, start: int, end: int) -> int | None:
    """Offset of the first hole in [start, end) of the file `fd`, or None when it is all data."""
    if start >= end:
        return None
    try:
        hole = os.lseek(fd, start, os.SEEK_HOLE)
    except OSError as e:
        if e.errno == errno.ENXIO:  # start is at or past EOF: nothing there is data
            return start
        raise
    return hole if hole < end else None


def holes(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The holes within [start, end) as (offset, length) pairs, in order."""
    found = []
    position = start
    while position < end:
        hole = first_hole(fd, position, end)
        if hole is None:
            break
        try:
            data = os.lseek(fd, hole, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = end
        data = min(data, end)
        found.append((hole, data - hole))
        position = data
    return found


def present_bytes(fd: int, size: int) -> int:
    """Bytes of [0, size) of the file `fd` that are data, not holes."""
    total, position = 0, 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:   # no data after position
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        total += min(end, size) - min(start, size)
        position = end
    return total


def present_bytes_at(path: Path, size: int) -> int:
    """`present_bytes` of the file at `path`; 0 when there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        return present_bytes(fd, size)
    finally:
        os.close(fd)


def open_sized(path: Path | str, size: int) -> int:
    """Open the file at `path` read-write (created if missing, mode 0600), sized exactly `size` bytes: the
    bytes already there stay, a new file (or the part it grows by) is one hole. Returns the fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_holes(fd: int, offset: int, data: bytes | memoryview, size: int) -> int:
    """pwrite the parts of `data` (the file's bytes at `offset`) that are holes in the file, never past
    `size`; returns the bytes written. Bytes already present (a reader may see them) are not rewritten."""
    end = min(size, offset + len(data))
    view = memoryview(data)
    if _no_data(fd, offset, end):   # a fill's usual case: one lseek instead of a walk of two
        return write_at(fd, view[:end - offset], offset)
    return sum(write_at(fd, view[hole - offset:hole - offset + length], hole)
               for hole, length in holes(fd, offset, end))


def _no_data(fd: int, start: int, end: int) -> bool:
    """[start, end) of the file `fd` is one hole (lseek SEEK_DATA finds no data before `end`)."""
    try:
        return start < end and os.lseek(fd, start, os.SEEK_DATA) >= end
    except OSError as e:
        if e.errno == errno.ENXIO:   # no data at or after start
            return start < end
        raise


def write_at(fd: int, data: bytes | memoryview, offset: int) -> int:
    """pwrite all of `data` at `offset` (short writes continued); returns its length."""
    view = memoryview(data)
    position = offset
    while view:
        count = os.pwrite(fd, view, position)
        view, position = view[count:], position + count
    return len(data)
