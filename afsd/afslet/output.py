"""The container's stdout and stderr, cut into lines as they arrive.

Each complete line becomes one log frame (without its newline) as soon as it is read; a line longer
than `MAX_LINE` is sent in pieces of that size, and a last line without a newline is sent at EOF.
Bytes are decoded as UTF-8 with replacement (protobuf strings must be valid UTF-8).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

MAX_LINE = 64 * 1024
READ_SIZE = 64 * 1024

LineSink = Callable[[str], Awaitable[None]]


async def open_pipe_reader(fd: int) -> asyncio.StreamReader:
    """An asyncio reader over the read end `fd` of a pipe (the reader owns the fd afterwards)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_SIZE * 4)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    return reader


async def pump_lines(reader: asyncio.StreamReader, sink: LineSink) -> int:
    """Send every line from `reader` to `sink` until EOF; return the number of bytes read."""
    pending = b""
    total = 0
    while True:
        data = await reader.read(READ_SIZE)
        if not data:
            break
        total += len(data)
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            for start in range(0, max(len(line), 1), MAX_LINE):
                await sink(line[start:start + MAX_LINE].decode(errors="replace"))
        while len(pending) >= MAX_LINE:
            piece, pending = pending[:MAX_LINE], pending[MAX_LINE:]
            await sink(piece.decode(errors="replace"))
    if pending:
        await sink(pending.decode(errors="replace"))
    return total
