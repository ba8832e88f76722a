"""The message format between the on-demand backends' processes: framed JSON over unix stream sockets,
with file descriptors passed alongside (SCM_RIGHTS). Written once for both supervised backends: the
fanotify supervisor, keeper and fetch workers, the fscache supervisor and worker, and the node daemon's
clients of either.

A frame is a 4-byte big-endian length followed by a UTF-8 JSON object. A frame that carries fds says
how many in its "nfds" field; they are sent in the same sendmsg() as the frame's first byte, so the
kernel delivers them with those bytes, and a receiver that queues fds in arrival order can hand each
frame exactly its own (the kernel never delivers a later message's fds before an earlier one's bytes).

`Connection` is the synchronous, non-blocking side used by the fanotify supervisor and keeper (selector
loops that must never block on a slow peer); `AsyncChannel` is the asyncio side used by fetch workers,
the fscache supervisor and the node daemon's clients. What the frames carry: supervised/protocol.py.
"""

from __future__ import annotations

import array
import asyncio
import collections
import json
import os
import selectors
import socket
import struct
from typing import Any

_LENGTH = struct.Struct(">I")
MAX_FRAME = 64 << 20          # a blob spec is ~70 bytes per MiB of blob: far below this
MAX_FDS_PER_FRAME = 32
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * array.array("i").itemsize)


class ProtocolError(Exception):
    """A peer sent something that is not a valid frame."""


def encode(message: dict[str, Any], nfds: int = 0) -> bytes:
    if nfds:
        message = {**message, "nfds": nfds}
    body = json.dumps(message, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


class FrameDecoder:
    """Turns received bytes and fds into (message, fds) pairs, in order."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fds: collections.deque[int] = collections.deque()

    def feed(self, data: bytes, fds: list[int]) -> list[tuple[dict[str, Any], list[int]]]:
        self._buffer += data
        self._fds.extend(fds)
        out = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise ProtocolError(f"frame of {length} bytes is over the {MAX_FRAME}-byte limit")
            if len(self._buffer) < _LENGTH.size + length:
                break
            body = bytes(self._buffer[_LENGTH.size:_LENGTH.size + length])
            del self._buffer[:_LENGTH.size + length]
            try:
                message = json.loads(body)
            except ValueError as e:
                raise ProtocolError(f"frame is not JSON: {e}") from None
            if not isinstance(message, dict):
                raise ProtocolError("frame is not a JSON object")
            wanted = int(message.get("nfds", 0))
            if wanted > len(self._fds):
                raise ProtocolError(f"frame announces {wanted} fds but {len(self._fds)} arrived")
            out.append((message, [self._fds.popleft() for _ in range(wanted)]))
        return out

    def close(self) -> None:
        """Close fds that arrived but were never claimed by a frame."""
        while self._fds:
            os.close(self._fds.popleft())


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One recvmsg(): bytes (empty at EOF) and the fds that came with them."""
    data, ancillary, flags, _ = sock.recvmsg(1 << 16, _ANCILLARY)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            numbers = array.array("i")
            numbers.frombytes(payload[:len(payload) - len(payload) % numbers.itemsize])
            fds.extend(numbers)
    for fd in fds:
        os.set_inheritable(fd, False)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("fds were truncated in transit (too many in one message)")
    return data, fds


def _fd_ancillary(fds: list[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def send_blocking(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send one frame on a blocking socket (the socket's timeout bounds it)."""
    fds = fds or []
    data = memoryview(encode(message, len(fds)))
    sent = sock.sendmsg([data], _fd_ancillary(fds))
    if sent < len(data):
        sock.sendall(data[sent:])


class Connection:
    """A non-blocking peer in a selector loop: queued output, incremental input."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.decoder = FrameDecoder()
        self._out: collections.deque[list[Any]] = collections.deque()  # [memoryview, fds]
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def wants_write(self) -> bool:
        return bool(self._out)

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        if self.closed:
            return
        fds = list(fds or [])
        self._out.append([memoryview(encode(message, len(fds))), fds])
        self.flush()

    def flush(self) -> None:
        """Write what the socket takes now; the rest waits for the next writable event."""
        while self._out and not self.closed:
            data, fds = self._out[0]
            try:
                sent = self.sock.sendmsg([data], _fd_ancillary(fds))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.closed = True
                return
            self._out[0][1] = []  # the fds went with the first byte
            if sent < len(data):
                self._out[0][0] = data[sent:]
                return
            self._out.popleft()

    def on_ready(self, mask: int) -> list[tuple[dict[str, Any], list[int]]] | None:
        """A selector found the socket ready (`mask`: selectors.EVENT_*): send what waits if writable,
        and return what arrived if readable ([] if not); None at EOF or on a broken peer."""
        if mask & selectors.EVENT_WRITE:
            self.flush()
        return self.read() if mask & selectors.EVENT_READ else []

    def read(self) -> list[tuple[dict[str, Any], list[int]]] | None:
        """Messages that arrived; None at EOF or on a broken peer."""
        try:
            data, fds = receive(self.sock)
        except (BlockingIOError, InterruptedError):
            return []
        except (OSError, ProtocolError):
            return None
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        try:
            return self.decoder.feed(data, fds)
        except ProtocolError:
            return None

    def close(self) -> None:
        self.closed = True
        self.decoder.close()
        self.sock.close()


class AsyncChannel:
    """The asyncio side of a connection: request/response and streamed messages, with fds."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._decoder = FrameDecoder()
        self._inbox: collections.deque[tuple[dict[str, Any], list[int]]] = collections.deque()
        self._arrived = asyncio.Event()
        self._eof = False
        self._send_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    async def connect(cls, path: str, timeout: float = 5.0) -> AsyncChannel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, path), timeout)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def _on_readable(self) -> None:
        try:
            data, fds = receive(self.sock)
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ProtocolError):
            data, fds = b"", []
        if not data:
            self._eof = True
            self._loop.remove_reader(self.sock.fileno())
        else:
            try:
                self._inbox.extend(self._decoder.feed(data, fds))
            except ProtocolError:
                self._eof = True
                self._loop.remove_reader(self.sock.fileno())
        self._arrived.set()

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self._loop.sock_sendall(self.sock, encode(message))

    async def receive(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next message and its fds; None once the peer has closed and the inbox is empty."""
        while not self._inbox:
            if self._eof:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        return self._inbox.popleft()

    def close(self) -> None:
        if not self._eof:
            self._eof = True
            self._loop.remove_reader(self.sock.fileno())
        self._decoder.close()
        for _, fds in self._inbox:
            for fd in fds:
                os.close(fd)
        self._inbox.clear()
        self.sock.close()


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a unix socket (SO_PEERCRED)."""
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[0]
