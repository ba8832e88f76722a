"""Reading blob ranges over a layerstore's byte stream, verified as the bytes arrive.

Where it sits: the range fetcher (fetcher.py) reads a piece of a blob from a provider; when the provider
offers a byte stream (`OpenByteStream` answers), the piece comes through `BlobByteStreams.read` instead of
a ReadLayer call. One `BlobByteStreams` serves one blob from one layerstore: it asks for tickets over gRPC
(the control channel), keeps the connections it opened for reuse, and runs each range read in a thread
of its own: whole chunks received at once (`recv_into` with MSG_WAITALL) into reused buffers or the
caller's, and checked against the blob's chunk table before they are delivered (hashlib releases the GIL),
so the event loop only sees verified bytes. A read of several units checks each one in a second thread
while the next is received. Pieces of one fetch run at once on several connections, i.e. several streams
per blob.

What a caller gets: the verified bytes, unit by unit and in order, handed to its `deliver` function from a
worker thread (a fetch copies them into its result, a fill writes them into the blob file);
`ByteStreamUnavailable` when this peer offers no usable byte
stream (no such RPC, the data port cannot be reached, tickets refused: read with ReadLayer instead, and
this object stops trying for `RETRY_AFTER` seconds); `ByteStreamError` or `DigestMismatchError` when the
peer failed this read (short, stalled, malformed or wrong bytes); `grpc.aio.AioRpcError` from
`OpenByteStream` for anything else the peer said (NOT_FOUND: it lacks the layer).

`read_spans` is the one unchecked read: any ranges of the blob, requested at once and received back to
back, for a caller that checks them another way (a blob's metadata against its metadata digest:
afsd/cluster/metadata_reads.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import grpc

from afsd import phases
from afsd.api import layerstore_pb2 as pb
from afsd.api import layerstore_pb2_grpc as pb_grpc
from afsd.cluster.bytestream_wire import (HELLO, MAGIC, MAX_ERROR_BYTES, REPLY, REQUEST, TICKET_BYTES, VERSION, Status,
                                          digest_bytes, set_socket_timeout)
from afsd.cluster.discovery_client import join_host_port, split_host_port
from afsd.ondemand.chunks import ChunkTable

log = logging.getLogger(__name__)
# Where a read's verified bytes go: called in a worker thread, in blob order, with (blob offset, bytes).
Deliver = Callable[[int, memoryview], None]

# Tickets asked for at once (one per connection opened).
TICKETS_PER_CALL = 4
# After the byte stream proved unusable, the peer is read with ReadLayer for this long.
RETRY_AFTER = 60.0
# A connection idle for longer is not reused (the server closes idle ones after 120 s).
IDLE_REUSE = 60.0
# Tickets are used this much before the server's deadline, at the latest.
TICKET_MARGIN = 5.0
# Bytes received (MSG_WAITALL), checked and delivered at once: whole chunks, at least one.
RECEIVE_UNIT = 1 << 20
# Requests of a span read sent at once (16 bytes each): well within what the socket buffers hold, so the
# peer never waits for this side to read while this side still sends.
SPANS_PER_BATCH = 1024

# Range reads block in recv_into and sha256: threads, shared by every blob of the process.
_THREADS = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="bytestream")
# A multi-unit read checks and delivers each unit here while it receives the next one (sha256 and the
# kernel's socket copy then use two cores), but only while fewer reads than cores are receiving: with as
# many reads as cores, every core already receives or hashes, and the hand-off would only add two thread
# switches per unit (measured on 2 cores with 8 reads: half the context switches, 5-10 % less receiving CPU
# per GiB without it). A pool of its own: its tasks never wait, so readers blocked on them cannot starve it.
_CHECKERS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="bytestream-check")
_CORES = os.cpu_count() or 1


class _ReadsReceiving:
    """How many range reads of this process are receiving right now (every blob, every connection)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            self.count += 1

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self.count -= 1

    def spare_core(self) -> bool:
        return self.count < _CORES


_RECEIVING = _ReadsReceiving()


class ByteStreamUnavailable(Exception):
    """This peer's byte stream cannot be used now: read from it with ReadLayer."""


class ByteStreamError(Exception):
    """The peer failed this read over its byte stream (short, stalled, malformed)."""


@dataclass
class _Grant:
    host: str
    port: int
    tls: bool
    tickets: list[bytes]
    usable_until: float


class _Connection:
    """One data connection bound to one blob; used by one read at a time (in a worker thread).

    A plain connection is a blocking socket whose receive timeout (SO_RCVTIMEO) is the read's remaining
    time, received into with MSG_WAITALL a whole unit (RECEIVE_UNIT, whole chunks) per call: one system
    call and one pass of this loop per unit instead of a poll and a recv per socket buffer's worth. A TLS
    connection (Python's ssl takes no recv flags) uses per-call timeouts instead."""

    def __init__(self, sock: socket.socket, label: str) -> None:
        self.sock = sock
        self.label = label
        self.plain = not isinstance(sock, ssl.SSLSocket)
        self.last_used = time.monotonic()
        # Two units, received into by turns when the caller gives no buffer: one is checked while the
        # other fills.
        self._buffers = (bytearray(), bytearray())

    @classmethod
    def open(cls, host: str, port: int, ticket: bytes, digest: str, size: int, tls: ssl.SSLContext | None,
             deadline: float) -> _Connection:
        label = join_host_port(host, port)
        try:
            sock = socket.create_connection((host, port), timeout=_remaining(deadline))
        except OSError as error:
            raise ByteStreamUnavailable(f"cannot connect to the byte stream at {label}: {error}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
            else:
                sock.settimeout(None)   # blocking; each call is bounded by SO_RCVTIMEO / SO_SNDTIMEO
            connection = cls(sock, label)
            connection._send(HELLO.pack(MAGIC, VERSION, ticket, digest_bytes(digest)), deadline)
            status, length = connection._reply(deadline)
            if status != Status.OK:
                raise ByteStreamUnavailable(f"the byte stream at {label} refused the ticket: "
                                            f"{connection._error_text(length, deadline)}")
            if length != size:
                raise ByteStreamError(f"the byte stream at {label} says the blob has {length} bytes, not {size}")
        except (OSError, ssl.SSLError) as error:
            sock.close()
            raise ByteStreamUnavailable(f"the byte stream at {label} failed its hello: {error}") from None
        except BaseException:
            sock.close()
            raise
        return connection

    def read(self, table: ChunkTable, start: int, end: int, deadline: float, deliver: Deliver,
             into: memoryview | None = None) -> None:
        """Bytes [start, end) of the blob (whole chunks) to `deliver`, a unit at a time, each checked before
        it is delivered; received into `into` (end - start bytes) when given, else into this connection's
        reused buffer."""
        length = end - start
        self._send(REQUEST.pack(start, length), deadline)
        self._answered(start, end, deadline)
        unit = max(1, RECEIVE_UNIT // table.chunk_size) * table.chunk_size
        if into is None and len(self._buffers[0]) < min(unit, length):
            self._buffers = (bytearray(min(unit, length)), bytearray(min(unit, length)))
        source = f"layerstore {self.label} (byte stream)"
        checking: concurrent.futures.Future[None] | None = None
        try:
            with _RECEIVING:
                for index, at in enumerate(range(0, length, unit)):
                    count = min(unit, length - at)
                    view = memoryview(self._buffers[index % 2])[:count] if into is None else into[at:at + count]
                    received = self._receive_into(view, deadline)
                    if received < count:
                        raise ByteStreamError(f"{self.label} closed the stream after {at + received} of {length} "
                                              f"bytes from {start}")
                    if checking is not None:   # the unit before; its buffer is received into next
                        checking, done = None, checking
                        done.result()
                    if at + count < length and _RECEIVING.spare_core():   # check it on another core meanwhile
                        checking = _CHECKERS.submit(_check_and_deliver, table, start + at, view, source, deliver)
                    else:
                        _check_and_deliver(table, start + at, view, source, deliver)
        finally:
            if checking is not None:       # a failed receive: deliver nothing after this read has ended
                concurrent.futures.wait([checking])
        self.last_used = time.monotonic()

    def read_spans(self, spans: Sequence[tuple[int, int]], deadline: float, into: memoryview) -> None:
        """The bytes of `spans` ((offset, length) anywhere in the blob), unchecked (the caller checks them),
        back to back into `into`: the requests of a batch go out at once and their replies come back in
        order, received as they arrive (a receive takes all that is there, not a header and then a span)
        and taken apart, so a batch costs one round trip and few system calls."""
        at = 0
        for first in range(0, len(spans), SPANS_PER_BATCH):
            batch = spans[first:first + SPANS_PER_BATCH]
            self._send(b"".join(REQUEST.pack(offset, length) for offset, length in batch), deadline)
            answer = memoryview(bytearray(sum(REPLY.size + length for _, length in batch)))
            received = taken = 0   # bytes of `answer` received, and taken apart
            for offset, length in batch:
                while received - taken < REPLY.size:
                    received += self._receive_some(answer[received:], deadline, "instead of answering")
                status, announced = REPLY.unpack_from(answer, taken)
                if status != Status.OK or announced != length:
                    self._refused(status, announced, answer[taken + REPLY.size:received], offset, offset + length,
                                  deadline)
                taken += REPLY.size
                while received - taken < length:
                    received += self._receive_some(answer[received:], deadline,
                                                   f"during bytes {offset}-{offset + length}")
                into[at:at + length] = answer[taken:taken + length]
                taken += length
                at += length
        self.last_used = time.monotonic()

    def _receive_some(self, view: memoryview, deadline: float, where: str) -> int:
        """What the socket holds (at least one byte, at most `view`'s length) into `view`; ByteStreamError
        saying `where` if the peer closed the stream, TimeoutError once `deadline` has passed."""
        while True:
            try:
                self._bound(socket.SO_RCVTIMEO, deadline)
                count = self.sock.recv_into(view)
            except BlockingIOError:   # SO_RCVTIMEO ran out with nothing received
                _remaining(deadline)
                continue
            if not count:
                raise ByteStreamError(f"{self.label} closed the stream {where}")
            return count

    def _refused(self, status: int, announced: int, received: memoryview, start: int, end: int,
                 deadline: float) -> NoReturn:
        """Raise ByteStreamError for a reply to [start, end) that is not OK and its length (`received`: what
        arrived after its header already), saying why."""
        if status not in Status._value2member_map_:
            raise ByteStreamError(f"{self.label} sent a malformed reply (status {status})")
        if status == Status.OK:
            raise ByteStreamError(f"{self.label} announced {announced} bytes for a request of {end - start}")
        text = self._error_text(announced, deadline, bytes(received[:announced]))
        if status == Status.GONE:   # worded as ReadLayer's NOT_FOUND is (fetcher.py)
            raise ByteStreamError(f"does not hold the layer ({text})")
        raise ByteStreamError(f"{self.label} refused bytes {start}-{end}: {text}")

    def _answered(self, start: int, end: int, deadline: float) -> None:
        """The reply to a request for [start, end): OK and its length, else ByteStreamError saying why."""
        status, announced = self._reply(deadline)
        if status != Status.OK or announced != end - start:
            self._refused(status, announced, memoryview(b""), start, end, deadline)

    def _receive_into(self, view: memoryview, deadline: float) -> int:
        """Fill `view` from the socket; fewer bytes only when the peer closed the stream. TimeoutError once
        `deadline` has passed."""
        received = 0
        while received < len(view):
            try:
                self._bound(socket.SO_RCVTIMEO, deadline)
                if self.plain:
                    count = self.sock.recv_into(view[received:], 0, socket.MSG_WAITALL)
                else:
                    count = self.sock.recv_into(view[received:])
            except BlockingIOError:   # SO_RCVTIMEO ran out with nothing received
                _remaining(deadline)
                continue
            if not count:
                break
            received += count
        return received

    def _send(self, data: bytes, deadline: float) -> None:
        self._bound(socket.SO_SNDTIMEO, deadline)
        try:
            self.sock.sendall(data)
        except BlockingIOError:
            raise TimeoutError("the peer did not take a request within the read's deadline") from None

    def _bound(self, option: int, deadline: float) -> None:
        """Bound the next call on the socket by the time left until `deadline` (TimeoutError if none): a plain
        socket is blocking, with SO_RCVTIMEO or SO_SNDTIMEO (`option`) set; a TLS socket gets a timeout."""
        if self.plain:
            set_socket_timeout(self.sock, option, _remaining(deadline))
        else:
            self.sock.settimeout(_remaining(deadline))

    def _reply(self, deadline: float) -> tuple[int, int]:
        header = bytearray(REPLY.size)
        if self._receive_into(memoryview(header), deadline) < REPLY.size:
            raise ByteStreamError(f"{self.label} closed the stream instead of answering")
        status, length = REPLY.unpack(header)
        if status not in Status._value2member_map_:
            raise ByteStreamError(f"{self.label} sent a malformed reply (status {status})")
        return status, length

    def _error_text(self, length: int, deadline: float, received: bytes = b"") -> str:
        """The message of an error reply announcing `length` bytes, of which `received` arrived already."""
        if length > MAX_ERROR_BYTES:   # not even read
            return f"(an error of {length} bytes)"
        text = bytearray(length - len(received))
        try:
            count = self._receive_into(memoryview(text), deadline) if text else 0
        except OSError:
            count = 0
        return (received + text[:count]).decode(errors="replace") or "(no reason given)"

    def abort(self) -> None:
        """Unblock a read in progress (from another thread): the connection is not reused."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def _check_and_deliver(table: ChunkTable, offset: int, view: memoryview, source: str, deliver: Deliver) -> None:
    table.check(offset, view, source=source)
    deliver(offset, view)


def _close_opened(opening: concurrent.futures.Future[_Connection]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the read's deadline passed")
    return left


class BlobByteStreams:
    """Byte-stream reads of one blob (`layer_digest`, checked with `table`) from the layerstore at
    `endpoint`, over connections it opens with tickets from `stub.OpenByteStream`."""

    def __init__(self, endpoint: str, stub: pb_grpc.LayerStoreStub, layer_digest: str, table: ChunkTable, *,
                 tls: ssl.SSLContext | None = None) -> None:
        self.endpoint = endpoint
        self.stub = stub
        self.layer_digest = layer_digest
        self.table = table
        self.tls = tls
        self._idle: list[_Connection] = []
        self._grant: _Grant | None = None
        self._grant_lock = asyncio.Lock()
        self._unusable_until = 0.0
        self.unusable_reason = ""
        self._closed = False

    @property
    def usable(self) -> bool:
        return not self._closed and time.monotonic() >= self._unusable_until

    async def read(self, start: int, end: int, timeout: float, deliver: Deliver, into: memoryview | None = None) -> None:
        """Verified bytes [start, end) of the blob to `deliver` (called in a thread, a unit of whole chunks at
        a time as they arrive; the view is valid during the call only); received straight into `into` (end -
        start bytes: what it holds is only verified up to what was delivered) when given. See the module
        docstring for what it raises."""
        await self._on_connection(f"bytes {start}-{end}", timeout, lambda connection, deadline: connection.read(
            self.table, start, end, deadline, deliver, into))

    async def read_spans(self, spans: Sequence[tuple[int, int]], timeout: float) -> bytearray:
        """The bytes of `spans` ((offset, length), anywhere in the blob) back to back, as the peer sent them:
        NOT checked (the caller checks them, e.g. against the metadata digest), in one round trip per
        `SPANS_PER_BATCH` spans. Raises as `read` does."""
        into = bytearray(sum(length for _, length in spans))
        await self._on_connection(f"{len(spans)} spans", timeout, lambda connection, deadline: connection.read_spans(
            spans, deadline, memoryview(into)))
        return into

    async def _on_connection(self, what: str, timeout: float, work: Callable[[_Connection, float], None]) -> None:
        """`work(connection, deadline)` in a thread, on an idle connection or a new one, within `timeout`; the
        connection is kept for reuse only if the work succeeded."""
        if not self.usable:
            raise ByteStreamUnavailable(self.unusable_reason or "closed")
        deadline = time.monotonic() + timeout
        try:
            connection = self._reusable() or await self._connect(deadline)
        except ByteStreamUnavailable as error:
            self._unusable_until = time.monotonic() + RETRY_AFTER
            self.unusable_reason = str(error)
            log.info("layer %s: no byte stream from %s, reading with ReadLayer: %s", self.layer_digest,
                     self.endpoint, error)
            raise
        loop = asyncio.get_running_loop()
        try:
            with phases.phase("stream.read"):
                await loop.run_in_executor(_THREADS, work, connection, deadline)
        except asyncio.CancelledError:
            connection.abort()
            connection.close()
            raise
        except TimeoutError:
            connection.close()
            raise ByteStreamError(f"{connection.label} sent {what} too slowly: not done within {timeout:g} s") from None
        except OSError as error:
            connection.close()
            raise ByteStreamError(f"reading {what} from {connection.label} failed: {error}") from None
        except BaseException:
            connection.close()
            raise
        if self._closed:
            connection.close()
        else:
            self._idle.append(connection)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _reusable(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if time.monotonic() - connection.last_used < IDLE_REUSE:
                return connection
            connection.close()
        return None

    async def _connect(self, deadline: float) -> _Connection:
        with phases.phase("stream.ticket"):
            grant, ticket = await self._ticket(deadline)
        if grant.tls and self.tls is None:
            raise ByteStreamUnavailable(f"{self.endpoint}'s byte stream speaks TLS and this node has no TLS "
                                        "settings for data connections")
        opening = _THREADS.submit(_Connection.open, grant.host, grant.port, ticket, self.layer_digest,
                                  self.table.size, self.tls if grant.tls else None, deadline)
        try:
            with phases.phase("stream.connect"):
                return await asyncio.shield(asyncio.wrap_future(opening))
        except asyncio.CancelledError:   # the thread still finishes: close what it opens
            opening.add_done_callback(_close_opened)
            raise

    async def _ticket(self, deadline: float) -> tuple[_Grant, bytes]:
        async with self._grant_lock:
            grant = self._grant
            if grant is None or not grant.tickets or time.monotonic() >= grant.usable_until:
                grant = self._grant = await self._open(deadline)
            return grant, grant.tickets.pop()

    async def _open(self, deadline: float) -> _Grant:
        request = pb.OpenByteStreamRequest(digest=self.layer_digest, streams=TICKETS_PER_CALL)
        try:
            response = await self.stub.OpenByteStream(request, timeout=_remaining(deadline))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise ByteStreamUnavailable(f"{self.endpoint} offers no byte stream") from None
            raise
        if (not response.tickets or not 0 < response.port < 65536 or response.afs_size != self.table.size
                or any(len(ticket) != TICKET_BYTES for ticket in response.tickets)):
            raise ByteStreamUnavailable(f"{self.endpoint} answered OpenByteStream with an unusable grant "
                                        f"(port {response.port}, {len(response.tickets)} tickets, "
                                        f"size {response.afs_size})")
        host = response.host or split_host_port(self.endpoint)[0]
        usable_for = max(0.0, response.ticket_ttl_ms / 1000 - TICKET_MARGIN)
        return _Grant(host, response.port, response.tls, list(response.tickets), time.monotonic() + usable_for)

