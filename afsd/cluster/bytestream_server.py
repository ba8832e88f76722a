"""The layerstore's data listener: ranges of cached blobs sent as raw bytes with `sendfile`.

Where it sits: a reader calls `OpenByteStream` on the layerstore's gRPC service (the control channel,
with whatever authentication that channel has); the service asks `grant` for one-time tickets bound to
the layer digest and the caller's address, and answers with this listener's port. The reader connects,
presents a ticket (bytestream_wire.HELLO) and then asks for any number of ranges of that one blob, each
sent straight from the page cache by the kernel (`socket.sendfile`). Integrity does not rest on this
socket: readers check every chunk against the blob's chunk digests (bytestream_client.py).

Each connection is served by a thread of its own (blocking I/O with timeouts), so a slow reader never
holds up the event loop of the gRPC server; at most `max_connections` are served at once. A connection
opens the blob once, at the hello: the open descriptor keeps the bytes readable even if the layer is
evicted meanwhile (as ReadLayer does). With `tls`, connections are wrapped in TLS and the bytes are sent
with pread + sendall instead (Python's ssl module has no sendfile): docs/data-path.md gives the cost.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from afsd.cluster.bytestream_wire import (HELLO, MAGIC, REPLY, REQUEST, TICKET_BYTES, VERSION, Status, digest_bytes,
                                          error_reply, set_socket_timeout)

log = logging.getLogger(__name__)

STREAM_BYTES_SERVED = Counter("afsd_layerstore_stream_bytes_served_total",
                              "Blob bytes sent to readers over the byte-stream data listener, by where the reader "
                              "is (this_host: loopback or this listener's own address; other_host)", ["reader"])
STREAM_RANGES_SERVED = Counter("afsd_layerstore_stream_ranges_served_total",
                               "Ranges sent to readers over the byte-stream data listener")
STREAM_CONNECTIONS = Gauge("afsd_layerstore_stream_connections", "Open byte-stream connections")
STREAM_REFUSED = Counter("afsd_layerstore_stream_refused_total",
                         "Byte-stream connections refused, by reason", ["reason"])

TLS_SEND_UNIT = 1 << 20
# A range this small (a span of metadata, say) is read and sent with its reply header in one send: a sendfile call
# and a separate header (a packet of its own) cost more than the copy.
SMALL_RANGE = 64 << 10
# Small ranges answered with one send hold at most this many bytes (the replies of a metadata read, ~1 MiB,
# go in one or two sends).
SMALL_BATCH_BYTES = 4 << 20
# Request headers taken from the socket at once (16 bytes each).
REQUESTS_PER_BATCH = 1024
# (path, size) of a cached layer's blob, or None when the layerstore does not hold it.
BlobLookup = Callable[[str], "tuple[str, int] | None"]


@dataclass
class _Ticket:
    digest: str
    caller: ipaddress.IPv4Address | ipaddress.IPv6Address
    expires: float


class _Refused(Exception):
    def __init__(self, status: Status, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason     # the metric label: a few fixed words


def caller_address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address in a gRPC `context.peer()` string (`ipv4:10.0.0.5:4711`, `ipv6:[::1]:4711`); None
    for other transports (unix sockets), whose callers get no tickets."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        return _unmapped(ipaddress.ip_address(host))
    except ValueError:
        return None


def reader_place(caller: ipaddress.IPv4Address | ipaddress.IPv6Address | None, own_host: str) -> str:
    """`this_host` for a reader on this host (loopback, a unix socket, the server's own address), else
    `other_host`: what tells bytes served to peers from a node's reads of its own layerstore."""
    if caller is None or caller.is_loopback:
        return "this_host"
    return "this_host" if str(caller) == own_host.strip("[]") else "other_host"


def _unmapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ByteStreamServer:
    """A TCP listener serving blob ranges to holders of tickets. `start()` binds and starts accepting in a
    thread; `close()` stops accepting, ends every connection and waits for their threads."""

    def __init__(self, host: str, port: int, lookup: BlobLookup, *, on_served: Callable[[str, int], None] | None = None,
                 tls: ssl.SSLContext | None = None, ticket_ttl: float = 30.0, max_connections: int = 64,
                 handshake_timeout: float = 10.0, idle_timeout: float = 120.0, send_timeout: float = 30.0) -> None:
        self.host = host
        self.requested_port = port
        self.lookup = lookup
        self.on_served = on_served
        self.tls = tls
        self.ticket_ttl = ticket_ttl
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self._tickets: dict[bytes, _Ticket] = {}
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._closing = False

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the byte-stream listener is not started")
        return self._listener.getsockname()[1]

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listener = socket.create_server((self.host, self.requested_port), family=family, backlog=128)
        self._acceptor = threading.Thread(target=self._accept_loop, args=(self._listener,), name="bytestream-accept",
                                          daemon=True)
        self._acceptor.start()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            connections = list(self._connections)
        if self._listener is not None:
            _shutdown(self._listener)
            self._listener.close()
        for connection in connections:
            _shutdown(connection)
        if self._acceptor is not None:
            self._acceptor.join(timeout=10)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=10)

    # -- tickets (called from the gRPC service) ---------------------------------------------------

    def grant(self, digest: str, caller: ipaddress.IPv4Address | ipaddress.IPv6Address, count: int) -> list[bytes]:
        """`count` one-time tickets for connections from `caller` reading `digest`'s blob."""
        now = time.monotonic()
        fresh = [secrets.token_bytes(TICKET_BYTES) for _ in range(count)]
        with self._lock:
            for ticket in [t for t, held in self._tickets.items() if held.expires <= now]:
                del self._tickets[ticket]
            for ticket in fresh:
                self._tickets[ticket] = _Ticket(digest, _unmapped(caller), now + self.ticket_ttl)
        return fresh

    def _redeem(self, ticket: bytes, digest: bytes, caller: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
        """The layer digest a valid ticket opens; the ticket is used up whatever the outcome (one that was
        presented wrongly may have leaked)."""
        with self._lock:
            held = self._tickets.pop(ticket, None)
        if held is None:
            raise _Refused(Status.DENIED, "unknown_ticket", "the ticket is unknown or was used already")
        if held.expires <= time.monotonic():
            raise _Refused(Status.DENIED, "expired_ticket", "the ticket expired")
        if digest_bytes(held.digest) != digest:
            raise _Refused(Status.DENIED, "wrong_blob", f"the ticket is for layer {held.digest}, not this one")
        if _unmapped(caller) != held.caller:
            raise _Refused(Status.DENIED, "wrong_caller", f"the ticket was granted to {held.caller}, not {caller}")
        return held.digest

    # -- connections ------------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                connection, address = listener.accept()
            except OSError:
                return   # closed
            with self._lock:
                if self._closing:
                    connection.close()
                    return
                busy = len(self._connections) >= self.max_connections
                if not busy:
                    self._connections.add(connection)
            if busy:   # said in plain text only: a TLS handshake would cost the thread this refusal avoids
                STREAM_REFUSED.labels("busy").inc()
                if self.tls is None:
                    _send_quietly(connection, error_reply(Status.BUSY, "too many byte-stream connections; retry"))
                connection.close()
                continue
            thread = threading.Thread(target=self._serve, args=(connection, address), name="bytestream", daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _serve(self, connection: socket.socket, address: tuple) -> None:
        STREAM_CONNECTIONS.inc()
        stream: socket.socket = connection
        blob_fd = -1
        try:
            connection.settimeout(self.handshake_timeout)
            if self.tls is not None:
                stream = self.tls.wrap_socket(connection, server_side=True)   # takes over the descriptor
                with self._lock:
                    self._connections.discard(connection)
                    self._connections.add(stream)   # what close() shuts down
            caller = _unmapped(ipaddress.ip_address(address[0]))
            served = STREAM_BYTES_SERVED.labels(reader=reader_place(caller, self.host))
            digest, blob_fd, size = self._hello(stream, caller)
            stream.sendall(REPLY.pack(Status.OK, size))
            requests = _RequestReader(stream)
            with open(blob_fd, "rb", buffering=0, closefd=False) as blob:
                while self._serve_batch(stream, blob, digest, size, served, requests):
                    pass
        except _Refused as refused:
            STREAM_REFUSED.labels(refused.reason).inc()
            log.info("byte stream from %s refused: %s", address[0], refused)
            _send_quietly(stream, error_reply(refused.status, str(refused)))
        except (OSError, ssl.SSLError, ValueError) as error:
            log.info("byte stream from %s ended: %s", address[0], error)
        except Exception:   # noqa: BLE001 - a bug must not kill the listener silently
            log.exception("byte stream from %s failed", address[0])
            _send_quietly(stream, error_reply(Status.INTERNAL, "internal error"))
        finally:
            if blob_fd >= 0:
                os.close(blob_fd)
            _shutdown(stream)
            stream.close()
            with self._lock:
                self._connections.discard(connection)
                self._connections.discard(stream)
                self._threads.discard(threading.current_thread())
            STREAM_CONNECTIONS.dec()

    def _hello(self, stream: socket.socket, caller: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[str, int, int]:
        magic, version, ticket, digest_raw = HELLO.unpack(_receive_exactly(stream, HELLO.size))
        if magic != MAGIC or version != VERSION:
            raise _Refused(Status.BAD_REQUEST, "bad_hello", f"not an afsd byte-stream hello (version {version})")
        digest = self._redeem(ticket, digest_raw, caller)
        found = self.lookup(digest)
        if found is None:
            raise _Refused(Status.GONE, "gone", f"layer {digest} is not in this layerstore's cache")
        path, size = found
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _Refused(Status.GONE, "gone", f"layer {digest} was evicted") from None
        if os.fstat(fd).st_size != size:
            os.close(fd)
            raise _Refused(Status.INTERNAL, "internal", f"the blob of layer {digest} is not {size} bytes")
        return digest, fd, size

    def _still_held(self, digest: str, fd: int) -> None:
        """The connection's open blob is still the layerstore's (not evicted, not replaced): a reader that
        keeps a connection must not keep reading what the layerstore let go of, as ReadLayer cannot."""
        found = self.lookup(digest)
        try:
            held = found is not None and os.path.samestat(os.stat(found[0]), os.fstat(fd))
        except FileNotFoundError:
            held = False
        if not held:
            raise _Refused(Status.GONE, "gone", f"layer {digest} was evicted")

    def _serve_batch(self, stream: socket.socket, blob: io.FileIO, digest: str, size: int, served: Counter,
                     requests: _RequestReader) -> bool:
        """Answer the REQUESTs that arrived together (a reader of many small spans sends them at once), in
        order: runs of small ranges read with pread and sent in one send, larger ones with sendfile. False
        when the reader closed the connection."""
        stream.settimeout(self.idle_timeout)
        batch = requests.next_batch()
        if not batch:
            return False
        stream.settimeout(self.send_timeout)
        small: list[tuple[int, int]] = []
        small_bytes = 0
        for offset, length in batch:
            if length <= 0 or offset >= size or length > size - offset:
                self._send_small(stream, blob, digest, small, served)   # what was asked before it is answered
                raise _Refused(Status.BAD_REQUEST, "bad_range",
                               f"range {offset}+{length} is outside the blob of {size} bytes")
            if length > SMALL_RANGE:
                self._send_small(stream, blob, digest, small, served)
                small, small_bytes = [], 0
                self._send_large(stream, blob, digest, offset, length, served)
                continue
            if small_bytes + length > SMALL_BATCH_BYTES:
                self._send_small(stream, blob, digest, small, served)
                small, small_bytes = [], 0
            small.append((offset, length))
            small_bytes += length
        self._send_small(stream, blob, digest, small, served)
        return True

    def _send_small(self, stream: socket.socket, blob: io.FileIO, digest: str, ranges: list[tuple[int, int]],
                    served: Counter) -> None:
        """Small ranges, each read with pread, sent with their reply headers in one send: no sendfile set-up
        and no packet per header."""
        if not ranges:
            return
        self._still_held(digest, blob.fileno())
        parts: list[bytes] = []
        sent = 0
        short = None
        for offset, length in ranges:
            data = os.pread(blob.fileno(), length, offset)
            parts += (REPLY.pack(Status.OK, length), data)
            sent += len(data)
            if len(data) != length:
                short = f"the blob of layer {digest} ended after {len(data)} of {length} bytes from {offset}"
                break
        stream.sendall(b"".join(parts))
        self._count(digest, sent, len(parts) // 2, served)
        if short is not None:
            raise OSError(short)

    def _send_large(self, stream: socket.socket, blob: io.FileIO, digest: str, offset: int, length: int,
                    served: Counter) -> None:
        self._still_held(digest, blob.fileno())
        stream.sendall(REPLY.pack(Status.OK, length))
        if self.tls is None:
            sent = _sendfile(stream, blob.fileno(), offset, length, self.send_timeout)
        else:
            sent = 0
            while sent < length:
                data = os.pread(blob.fileno(), min(TLS_SEND_UNIT, length - sent), offset + sent)
                if not data:
                    break
                stream.sendall(data)
                sent += len(data)
        self._count(digest, sent, 1, served)
        if sent != length:
            raise OSError(f"the blob of layer {digest} ended after {sent} of {length} bytes")

    def _count(self, digest: str, sent: int, ranges: int, served: Counter) -> None:
        served.inc(sent)
        STREAM_RANGES_SERVED.inc(ranges)
        if self.on_served is not None:
            self.on_served(digest, sent)


class _RequestReader:
    """REQUEST headers from a connection, as many as arrived together (at most `REQUESTS_PER_BATCH`): one
    receive for the hundreds a span reader sends at once, instead of one per header."""

    def __init__(self, stream: socket.socket) -> None:
        self.stream = stream
        self.pending = bytearray()

    def next_batch(self) -> list[tuple[int, int]]:
        """The next requests, waiting for at least one; [] when the reader closed the connection between
        requests (OSError when it closed inside one)."""
        while len(self.pending) < REQUEST.size:
            more = self.stream.recv(REQUEST.size * REQUESTS_PER_BATCH - len(self.pending))
            if not more:
                if self.pending:
                    raise OSError(f"the reader closed the connection after {len(self.pending)} of {REQUEST.size} "
                                  "header bytes")
                return []
            self.pending += more
        whole = len(self.pending) - len(self.pending) % REQUEST.size
        batch = [REQUEST.unpack_from(self.pending, at) for at in range(0, whole, REQUEST.size)]
        del self.pending[:whole]
        return batch


def _sendfile(stream: socket.socket, fd: int, offset: int, length: int, timeout: float) -> int:
    """Bytes [offset, offset + length) of the file `fd` to the plain socket `stream`: in blocking mode, with
    SO_SNDTIMEO bounding each wait for the reader to take bytes, so a range is one sendfile call (socket.sendfile
    sets up a selector and polls before each call of a socket buffer's worth). Returns the bytes sent (fewer
    only if the file ended); TimeoutError when the reader took nothing for `timeout` seconds. The socket is
    left with `timeout` as its timeout again."""
    stream.settimeout(None)
    set_socket_timeout(stream, socket.SO_SNDTIMEO, timeout)
    sent = 0
    try:
        while sent < length:
            try:
                count = os.sendfile(stream.fileno(), fd, offset + sent, length - sent)
            except BlockingIOError:
                raise TimeoutError(f"the reader took no bytes for {timeout:g} s") from None
            if not count:
                break
            sent += count
    finally:
        stream.settimeout(timeout)
    return sent


def _receive_exactly(stream: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        more = stream.recv(count - len(data))
        if not more:
            raise OSError(f"the reader closed the connection after {len(data)} of {count} header bytes")
        data += more
    return bytes(data)


def _send_quietly(stream: socket.socket, data: bytes) -> None:
    try:
        stream.settimeout(1.0)
        stream.sendall(data)
    except (OSError, ValueError):
        pass


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
