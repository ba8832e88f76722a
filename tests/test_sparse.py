"""Writing verified bytes into a partly filled blob file: only holes are written (afsd/ondemand/sparse.py)."""

from __future__ import annotations

import os
from pathlib import Path

from afsd.ondemand.sparse import holes, open_sized, present_bytes, write_holes

BLOCK = 64 << 10   # a multiple of every filesystem block size the tests run on


def test_a_range_that_is_one_hole_is_written_whole(tmp_path: Path) -> None:
    fd = open_sized(tmp_path / "blob", 8 * BLOCK)
    try:
        assert write_holes(fd, BLOCK, b"a" * (2 * BLOCK), 8 * BLOCK) == 2 * BLOCK
        assert os.pread(fd, 2 * BLOCK, BLOCK) == b"a" * (2 * BLOCK)
        assert holes(fd, 0, 8 * BLOCK) == [(0, BLOCK), (3 * BLOCK, 5 * BLOCK)]
    finally:
        os.close(fd)


def test_bytes_already_present_are_not_rewritten(tmp_path: Path) -> None:
    fd = open_sized(tmp_path / "blob", 8 * BLOCK)
    try:
        os.pwrite(fd, b"old" * (BLOCK // 3) + b"o" * (BLOCK % 3), 2 * BLOCK)   # data in the middle
        assert write_holes(fd, 0, b"n" * (4 * BLOCK), 8 * BLOCK) == 3 * BLOCK
        assert os.pread(fd, 2 * BLOCK, 0) == b"n" * (2 * BLOCK)
        assert os.pread(fd, 3, 2 * BLOCK) == b"old"
        assert os.pread(fd, BLOCK, 3 * BLOCK) == b"n" * BLOCK
        assert present_bytes(fd, 8 * BLOCK) == 4 * BLOCK
    finally:
        os.close(fd)


def test_never_past_the_blob_size(tmp_path: Path) -> None:
    fd = open_sized(tmp_path / "blob", 3 * BLOCK)
    try:
        assert write_holes(fd, 2 * BLOCK, b"x" * (2 * BLOCK), 3 * BLOCK) == BLOCK
        assert os.fstat(fd).st_size == 3 * BLOCK
        assert write_holes(fd, 2 * BLOCK, b"y" * BLOCK, 3 * BLOCK) == 0   # all present now
        assert os.pread(fd, BLOCK, 2 * BLOCK) == b"x" * BLOCK
    finally:
        os.close(fd)
