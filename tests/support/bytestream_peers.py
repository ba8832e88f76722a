"""Stand-in layerstores for byte-stream tests: the real protos and wire format, with a data listener that
either is afsd's own `ByteStreamServer` (e.g. with TLS, which the CLI does not configure) or misbehaves
on cue (a hostile peer a real layerstore cannot be made into).

`ByteStreamPeer` is an in-process `layerstore.v1.LayerStore` gRPC server answering only OpenByteStream
(every other RPC: UNIMPLEMENTED, like an old layerstore without leases); its tickets open connections to
`data`, a `ByteStreamServer` or a `HostileDataListener`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from pathlib import Path
from typing import Self

import grpc

from afsd.api import layerstore_pb2 as pb
from afsd.api import layerstore_pb2_grpc as pb_grpc
from afsd.cluster.bytestream_server import ByteStreamServer
from afsd.cluster.bytestream_wire import HELLO, REPLY, REQUEST, Status

HOSTILE_BEHAVIOURS = ("wrong_bytes", "short", "huge_length", "huge_error", "stall", "trickle", "garbage_reply")


class HostileDataListener:
    """A data listener that accepts any hello, then answers range requests as `behaviour` says:
    wrong_bytes: the blob's bytes with one flipped in the middle of the range; short: half the range,
    then close; huge_length: announces 2^62 bytes; huge_error: an error whose text claims to be 1 TiB;
    stall: never answers a request; trickle: half the range, then one byte every 0.1 s (a reader that waits
    for whole units must still keep its deadline); garbage_reply: an unknown status and random bytes instead
    of a reply header."""

    def __init__(self, blob: Path, behaviour: str) -> None:
        assert behaviour in HOSTILE_BEHAVIOURS, behaviour
        self.blob = blob
        self.behaviour = behaviour
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.tls = None
        self.ticket_ttl = 30.0
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def grant(self, digest: str, caller: object, count: int) -> list[bytes]:
        return [os.urandom(32) for _ in range(count)]

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with open(self.blob, "rb") as blob:
            self._answer(connection, blob.fileno())

    def _answer(self, connection: socket.socket, blob: int) -> None:
        try:
            _receive(connection, HELLO.size)
            size = self.blob.stat().st_size
            connection.sendall(REPLY.pack(Status.OK, size))
            while True:
                offset, length = REQUEST.unpack(_receive(connection, REQUEST.size))
                data = bytearray(os.pread(blob, length, offset))
                if self.behaviour == "wrong_bytes":
                    data[length // 2] ^= 0xFF
                    connection.sendall(REPLY.pack(Status.OK, length) + data)
                elif self.behaviour == "short":
                    connection.sendall(REPLY.pack(Status.OK, length) + data[:length // 2])
                    connection.shutdown(socket.SHUT_RDWR)
                    return
                elif self.behaviour == "huge_length":
                    connection.sendall(REPLY.pack(Status.OK, 1 << 62) + data)
                elif self.behaviour == "huge_error":
                    connection.sendall(REPLY.pack(Status.INTERNAL, 1 << 40) + b"x" * 4096)
                elif self.behaviour == "trickle":
                    connection.sendall(REPLY.pack(Status.OK, length) + data[:length // 2])
                    for byte in range(length // 2, length):
                        time.sleep(0.1)
                        connection.sendall(data[byte:byte + 1])
                elif self.behaviour == "garbage_reply":   # a status byte no Status has, then noise
                    connection.sendall(b"\xff" + os.urandom(REPLY.size - 1))
                else:   # stall
                    threading.Event().wait()
        except OSError:
            return


def _receive(connection: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        more = connection.recv(count - len(data))
        if not more:
            raise OSError("closed")
        data += more
    return data


class ByteStreamPeer(pb_grpc.LayerStoreServicer):
    """A gRPC layerstore that grants byte streams to `data` for a blob of `size` bytes."""

    def __init__(self, data: ByteStreamServer | HostileDataListener, size: int) -> None:
        self.data = data
        self.size = size
        self.address = ""
        self.opened = 0
        self._server: grpc.aio.Server | None = None

    async def OpenByteStream(self, request: pb.OpenByteStreamRequest,
                             context: grpc.aio.ServicerContext) -> pb.OpenByteStreamResponse:
        self.opened += 1
        tickets = self.data.grant(request.digest, ipaddress.ip_address("127.0.0.1"), max(1, request.streams))
        return pb.OpenByteStreamResponse(port=self.data.port, tickets=tickets, ticket_ttl_ms=int(self.data.ticket_ttl * 1000),
                                         tls=self.data.tls is not None, afs_size=self.size)

    async def start(self) -> Self:
        self._server = grpc.aio.server()
        pb_grpc.add_LayerStoreServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
