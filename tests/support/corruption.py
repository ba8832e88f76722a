"""Damaging a stored blob in place, as a bad disk or a buggy writer would: for tests of verification."""

from __future__ import annotations

import os
from pathlib import Path


def flip_byte(path: Path, offset: int) -> None:
    """Invert every bit of the byte at `offset` of `path`."""
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), offset)
    finally:
        os.close(fd)
