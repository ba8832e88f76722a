"""The byte-stream data socket's wire format, defined once for the server (bytestream_server.py) and the
client (bytestream_client.py). docs/data-path.md describes the exchange; every integer is big-endian.

    client -> HELLO     magic "AFBS", version, the 32-byte ticket, the layer digest's 32 raw bytes
    server -> REPLY     OK + the blob's size, or an error (then it closes)
    then, any number of times:
    client -> REQUEST   offset, length (inside the blob)
    server -> REPLY     OK + length, then exactly `length` bytes of the blob; or an error (then it closes)

An error REPLY carries the length of a UTF-8 message (at most MAX_ERROR_BYTES) that follows it.
"""

from __future__ import annotations

import enum
import socket
import struct

MAGIC = b"AFBS"
VERSION = 1
TICKET_BYTES = 32
DIGEST_BYTES = 32
HELLO = struct.Struct(">4sB32s32s")     # magic, version, ticket, layer digest (raw sha256)
REQUEST = struct.Struct(">QQ")          # offset, length
REPLY = struct.Struct(">BQ")            # status, length of what follows
MAX_ERROR_BYTES = 1024
_TIMEVAL = struct.Struct("@ll")         # struct timeval, as SO_RCVTIMEO / SO_SNDTIMEO take it (native order)


class Status(enum.IntEnum):
    OK = 0
    DENIED = 1          # the ticket is unknown, used, expired, for another blob or another caller
    BAD_REQUEST = 2     # a malformed hello, or a range outside the blob
    GONE = 3            # the blob is no longer in the layerstore
    BUSY = 4            # too many connections
    INTERNAL = 5


def digest_bytes(digest: str) -> bytes:
    """`sha256:<64 hex>` as its 32 raw bytes (ValueError for anything else)."""
    algorithm, _, hexdigest = digest.partition(":")
    raw = bytes.fromhex(hexdigest) if algorithm == "sha256" else b""
    if len(raw) != DIGEST_BYTES:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return raw


def error_reply(status: Status, message: str) -> bytes:
    text = message.encode()[:MAX_ERROR_BYTES]
    return REPLY.pack(status, len(text)) + text


def set_socket_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    """SO_RCVTIMEO or SO_SNDTIMEO (`option`) of a blocking socket := `seconds` (at least a microsecond: zero
    would mean no limit at all)."""
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(whole, max(1, int((seconds - whole) * 1e6))))
