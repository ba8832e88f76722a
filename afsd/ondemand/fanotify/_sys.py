"""The kernel interface of the fanotify backend, written down once: syscalls, constants, wire layouts.

Everything that talks to the fanotify group (the supervisor, the keeper, tests) uses these bindings. The
events the kernel queues are parsed in one place, C (afsd_parse_events in c_ext/fanotify_shim.c, on the
uapi structs of <linux/fanotify.h>, Linux 6.14+ for pre-content events): `parse_events` here and the
supervisor's intake (intake.py) both call it. The answer's layout is `LAYOUTS` below, native byte order.

Traps measured on this kernel (see docs/fanotify-backend.md) that the constants below encode:
- the group must be FAN_CLASS_PRE_CONTENT and cannot be combined with FAN_REPORT_FID;
- FAN_UNLIMITED_QUEUE is not optional: when a bounded queue is full the kernel drops a permission
  event and lets the access through (the reader would see the hole's zeros);
- only a few errnos can ride in a FAN_DENY answer (`DENY_ERRNOS`); any other makes the answer's
  write() fail and leaves the reader blocked.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

from afsd.ondemand.fanotify.shim import ffi, lib

# fanotify_init flags
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_PRE_CONTENT = 0x00000008
FAN_UNLIMITED_QUEUE = 0x00000010
FAN_UNLIMITED_MARKS = 0x00000020

# fanotify_mark flags
FAN_MARK_ADD = 0x00000001
FAN_MARK_REMOVE = 0x00000002
FAN_MARK_FLUSH = 0x00000080
FAN_MARK_EVICTABLE = 0x00000200   # the mark does not pin the inode: it goes when the inode is evicted
AT_FDCWD = -100

# event masks
FAN_ACCESS_PERM = 0x00020000
FAN_PRE_ACCESS = 0x00100000

# answers
FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_NOFD = -1
# The errnos the kernel lets a FAN_DENY answer carry to the reader (measured; others give EINVAL).
DENY_ERRNOS = frozenset({errno.EIO, errno.EPERM, errno.ENOSPC, errno.EBUSY, errno.ETXTBSY,
                         errno.EAGAIN, errno.EDQUOT})

# What Python writes to the group (native order, no padding: '='); events are read in C (see above).
LAYOUTS: dict[str, struct.Struct] = {
    # struct fanotify_response { s32 fd; u32 response; }
    "response": struct.Struct("=iI"),
}
_RESPONSE = LAYOUTS["response"]
EVENT_MIN_SIZE = 24   # sizeof(struct fanotify_event_metadata): no event is smaller

# filesystems that accept pre-content marks (statfs f_type); tmpfs, overlayfs and procfs refuse them
MARKABLE_FILESYSTEMS = {0xEF53: "ext4", 0x58465342: "xfs", 0x9123683E: "btrfs"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long), ("f_blocks", ctypes.c_ulong),
                ("f_bfree", ctypes.c_ulong), ("f_bavail", ctypes.c_ulong), ("f_files", ctypes.c_ulong),
                ("f_ffree", ctypes.c_ulong), ("f_fsid", ctypes.c_int * 2), ("f_namelen", ctypes.c_long),
                ("f_frsize", ctypes.c_long), ("f_flags", ctypes.c_long), ("f_spare", ctypes.c_long * 4)]


_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_StatFs)]


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def fanotify_init(flags: int, event_f_flags: int) -> int:
    return _check(_libc.fanotify_init(flags, event_f_flags), "fanotify_init")


def fanotify_mark(group_fd: int, flags: int, mask: int, dirfd: int, path: bytes | None = None) -> None:
    """With `path` None the mark goes on the inode of `dirfd` itself."""
    _check(_libc.fanotify_mark(group_fd, flags, mask, dirfd, path), "fanotify_mark")


def new_pre_content_group() -> int:
    """A non-blocking, close-on-exec pre-content group with no queue or mark limit; event fds are
    opened read-only (fills go through the fill fds, never through event fds)."""
    return fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK | FAN_UNLIMITED_QUEUE
                         | FAN_UNLIMITED_MARKS, os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC)


def mark_pre_access(group_fd: int, file_fd: int, *, evictable: bool = False) -> None:
    fanotify_mark(group_fd, FAN_MARK_ADD | (FAN_MARK_EVICTABLE if evictable else 0), FAN_PRE_ACCESS, file_fd, None)


def unmark_pre_access(group_fd: int, file_fd: int) -> None:
    fanotify_mark(group_fd, FAN_MARK_REMOVE, FAN_PRE_ACCESS, file_fd, None)


def unmark_path(group_fd: int, path: str) -> bool:
    """Remove this group's mark from the file at `path`; False if it had none (or does not exist)."""
    try:
        fanotify_mark(group_fd, FAN_MARK_REMOVE, FAN_PRE_ACCESS, AT_FDCWD, os.fsencode(path))
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


class Event(NamedTuple):
    """One fanotify event: `fd` is an open fd on the accessed file (ours to close); `offset`/`count`
    come from the range record (None when the event has none). A tuple, not a frozen dataclass: one is
    made per event on the supervisor's hot path, and a frozen dataclass costs several times more to build."""

    mask: int
    fd: int
    pid: int
    offset: int | None
    count: int | None


def parse_events(buffer: bytes | memoryview) -> Iterator[Event]:
    """Split what one read() of a group fd returned into events (in C, afsd_parse_events); an event that
    does not parse raises OSError(EPROTO) after the events before it."""
    size = len(buffer)
    parsed = ffi.new("struct afsd_event[]", size // EVENT_MIN_SIZE + 1)
    error = ffi.new("int32_t *")
    count = lib.afsd_parse_events(ffi.from_buffer(buffer), size, parsed, len(parsed), error)
    for index in range(count):
        yield event_of(parsed[index])
    if error[0]:
        raise OSError(-error[0], f"a fanotify event that does not parse: {os.strerror(-error[0])}")


def event_of(parsed: Any) -> Event:
    """An Event from a parsed `struct afsd_event`."""
    has_range = parsed.has_range
    return Event(mask=parsed.mask, fd=parsed.fd, pid=parsed.pid, offset=parsed.offset if has_range else None,
                 count=parsed.count if has_range else None)


def encode_response(fd: int, allow: bool, error: int = errno.EIO) -> bytes:
    """An answer for the event whose fd is `fd`: FAN_ALLOW, or FAN_DENY carrying `error` to the reader."""
    if allow:
        return _RESPONSE.pack(fd, FAN_ALLOW)
    if error not in DENY_ERRNOS:
        raise ValueError(f"errno {error} cannot be carried by FAN_DENY (the reader would hang)")
    return _RESPONSE.pack(fd, FAN_DENY | (error << 24))


def respond(group_fd: int, fd: int, allow: bool, error: int = errno.EIO) -> bool:
    """Answer one event. False when the group has no pending event with that fd (ENOENT): it was
    answered already (e.g. by a predecessor process) or never existed."""
    try:
        os.write(group_fd, encode_response(fd, allow, error))
    except FileNotFoundError:
        return False
    return True


def filesystem_type(fd: int) -> tuple[int, str]:
    """(statfs f_type, a name for it) of the filesystem holding `fd`."""
    buf = _StatFs()
    _check(_libc.fstatfs(fd, ctypes.byref(buf)), "fstatfs")
    magic = buf.f_type & 0xFFFFFFFF
    return magic, MARKABLE_FILESYSTEMS.get(magic, {0x01021994: "tmpfs", 0x794C7630: "overlayfs",
                                                   0x9FA0: "procfs"}.get(magic, hex(magic)))


def sweep_unanswered(group_fd: int, limit: int, skip: frozenset[int] | set[int] = frozenset()) -> list[int]:
    """Answer FAN_DENY|EIO for every fd number below `limit` except `skip`: the kernel applies an answer
    only to an event that is still pending with that number, so this fails, loudly, exactly the events
    a dead predecessor had read but not answered. Call it before reading any event yourself (your own
    event fds would be answered too). Returns the numbers that were pending."""
    denied = []
    for fd in range(limit):
        if fd not in skip and respond(group_fd, fd, False, errno.EIO):
            denied.append(fd)
    return denied
