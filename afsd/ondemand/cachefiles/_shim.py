"""The Python face of the C shim (c_ext/, compiled into `_cachefiles_c` when afsd is installed).

Where it sits: the worker's request loop calls `RequestReader.next()` to take one request off
/dev/cachefiles, `pwrite_aligned` (in a writer thread; the C call runs without the GIL) to put verified
blob bytes into an object's anonymous fd, and `read_complete` to answer a READ. The wire layouts are the
kernel's own (<linux/cachefiles.h>), declared once in the cffi cdef (c_ext/build_cachefiles.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

try:
    from afsd.ondemand.cachefiles._cachefiles_c import ffi, lib
except ImportError as error:  # pragma: no cover - only on a broken install
    raise ImportError(f"afsd's cachefiles shim is not compiled ({error}): reinstall afsd "
                      "(`.venv/bin/pip install -e .` or scripts/setup.sh) with gcc, python3-dev and libffi-dev") from None

OP_OPEN: int = lib.CACHEFILES_OP_OPEN
OP_CLOSE: int = lib.CACHEFILES_OP_CLOSE
OP_READ: int = lib.CACHEFILES_OP_READ
OPCODE_NAMES = {OP_OPEN: "open", OP_CLOSE: "close", OP_READ: "read"}
READ_COMPLETE_IOCTL: int = lib.CACHEFILES_IOC_READ_COMPLETE
MESSAGE_MAX = lib.CACHEFILES_MSG_MAX_SIZE
WRITE_PIECE: int = lib.afsd_write_piece_size()


@dataclass(frozen=True, slots=True)
class Request:
    msg_id: int
    opcode: int
    object_id: int
    anon_fd: int = -1            # OPEN: an fd now in our table (close-on-exec); we must close it
    volume_key: bytes = b""      # OPEN: b"erofs,<domain_id or fsid>"
    cookie_key: bytes = b""      # OPEN: the fsid (or device tag): the blob's name
    offset: int = 0              # READ
    length: int = 0              # READ


class RequestReader:
    """Reads requests off the device fd, one `read()` each (the kernel hands out one message per call)."""

    def __init__(self, device_fd: int) -> None:
        self.device_fd = device_fd
        self._size = max(4096, MESSAGE_MAX)
        self._buffer = ffi.new("uint8_t[]", self._size)
        self._parsed = ffi.new("struct afsd_request *")

    def next(self) -> Request | None:
        """The next pending request, or None when none is pending (the device never blocks)."""
        got = lib.afsd_read_request(self.device_fd, self._buffer, self._size, self._parsed)
        if got == 0:
            return None
        if got < 0:
            raise OSError(-got, f"reading a request from /dev/cachefiles: {os.strerror(-got)}")
        return parse(self._parsed, self._buffer)


def parse(parsed: object, buffer: object) -> Request:
    p = parsed
    if p.opcode == OP_OPEN:
        return Request(p.msg_id, p.opcode, p.object_id, anon_fd=p.anon_fd,
                       volume_key=bytes(ffi.buffer(buffer + p.volume_key_offset, p.volume_key_size)),
                       cookie_key=bytes(ffi.buffer(buffer + p.cookie_key_offset, p.cookie_key_size)))
    if p.opcode == OP_READ:
        return Request(p.msg_id, p.opcode, p.object_id, offset=p.offset, length=p.count)
    return Request(p.msg_id, p.opcode, p.object_id)


def parse_message(message: bytes) -> Request:
    """Parse one raw message (as read from the device); ValueError if it is malformed."""
    buffer = ffi.new("uint8_t[]", message)
    parsed = ffi.new("struct afsd_request *")
    if lib.afsd_parse_request(buffer, len(message), parsed) < 0:
        raise ValueError(f"malformed cachefiles message of {len(message)} bytes")
    return parse(parsed, buffer)


def read_complete(anon_fd: int, msg_id: int) -> None:
    """Answer READ `msg_id` on its object's anon fd (data written or not: the kernel re-checks the cache)."""
    result = lib.afsd_read_complete(anon_fd, msg_id)
    if result < 0:
        raise OSError(-result, f"CACHEFILES_IOC_READ_COMPLETE for message {msg_id}: {os.strerror(-result)}")


def pwrite_aligned(fd: int, data: bytes | memoryview, offset: int) -> int:
    """Write `data` at page-aligned `offset`, the last page zero-padded; blocks (call it off the loop)."""
    result = lib.afsd_pwrite_aligned(fd, ffi.from_buffer("uint8_t[]", data), len(data), offset)
    if result < 0:
        raise OSError(-result, f"writing {len(data)} bytes at {offset} into the cache: {os.strerror(-result)}")
    return result
