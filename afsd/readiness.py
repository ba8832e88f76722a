"""A daemon says it is serving, and where: `--ready-file PATH`.

Every afsd daemon accepts `HOST:0` for its listeners (the kernel picks a free port) and, once it serves,
writes PATH atomically: JSON with its pid and the addresses it bound, e.g.
`{"pid": 4242, "listen": "127.0.0.1:39117", "metrics": "127.0.0.1:40231"}`. A launcher (a service
manager, the lab launchers in afsd/lab/daemons.py) waits for that file instead of polling a port it
guessed, so it never passes a port it does not hold and never gives up on a daemon that is merely slow to
start.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from afsd.fsutil import write_json_atomically


async def announce_ready(path: Path | None, **addresses: str | None) -> None:
    """Write the ready file (if the daemon was given one): this process's pid and its bound addresses."""
    if path is None:
        return
    document: dict[str, Any] = {"pid": os.getpid()}
    document.update({name: value for name, value in addresses.items() if value})

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, document)
    await asyncio.to_thread(write)


def read_ready(path: Path) -> dict[str, Any] | None:
    """The ready file's contents, or None while there is none (it is replaced whole, never torn)."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def with_port(listen: str, port: int) -> str:
    """`HOST:0` (or `[v6]:0`) with the port the kernel gave: the address a client dials."""
    host, _, _ = listen.rpartition(":")
    return f"{host}:{port}"
