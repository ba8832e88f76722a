"""The C fill of the fanotify supervisor's local misses (c_ext/fanotify_shim.c), on plain sparse files: it
writes only holes, writes nothing of a chunk that fails its digest, and takes only whole chunks."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from afsd.ondemand.fanotify._fanotify_c import ffi, lib
from afsd.ondemand.sparse import holes

CHUNK = 4096
SIZE = 3 * CHUNK + 100   # a short last chunk


def local_blob(tmp_path: Path, source: bytes, digests: bytes) -> tuple[object, int, int, bytes]:
    """The C struct for a blob file in `tmp_path` (all hole) and its complete copy `source`; returns it, the
    blob's fd, the copy's fd and `digests` (the struct points into them: keep them alive)."""
    (tmp_path / "copy").write_bytes(source)
    fill_fd = os.open(tmp_path / "blob", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fill_fd, SIZE)
    source_fd = os.open(tmp_path / "copy", os.O_RDONLY)
    blob = ffi.new("struct afsd_local_blob *")
    blob.group_fd, blob.fill_fd, blob.source_fd = -1, fill_fd, source_fd
    blob.chunk_size, blob.size, blob.limit = CHUNK, SIZE, 1 << 20
    blob.digests, blob.digests_size = ffi.from_buffer(digests), len(digests)
    return blob, fill_fd, source_fd, digests


def digests_of(data: bytes) -> bytes:
    return b"".join(hashlib.sha256(data[at:at + CHUNK]).digest() for at in range(0, len(data), CHUNK))


def test_fills_only_the_holes_of_whole_checked_chunks(tmp_path: Path) -> None:
    source = os.urandom(SIZE)
    blob, fill_fd, source_fd, _keep = local_blob(tmp_path, source, digests_of(source))
    present = b"\x07" * CHUNK                     # chunk 1 is already there (a reader may see it): kept as is
    os.pwrite(fill_fd, present, CHUNK)
    assert lib.afsd_fill_local(blob, 0, SIZE) == SIZE - CHUNK
    assert holes(fill_fd, 0, SIZE) == []
    data = os.pread(fill_fd, SIZE, 0)
    assert data[:CHUNK] == source[:CHUNK] and data[CHUNK:2 * CHUNK] == present and data[2 * CHUNK:] == source[2 * CHUNK:]
    assert lib.afsd_fill_local(blob, CHUNK, 2 * CHUNK + 1) == -errno.EINVAL   # not whole chunks
    os.close(fill_fd)
    os.close(source_fd)


def test_a_chunk_that_fails_its_digest_is_not_written(tmp_path: Path) -> None:
    source = os.urandom(SIZE)
    bad = bytearray(source)
    bad[2 * CHUNK + 5] ^= 0xFF                    # chunk 2 of the copy is wrong
    blob, fill_fd, source_fd, _keep = local_blob(tmp_path, bytes(bad), digests_of(source))
    assert lib.afsd_fill_local(blob, 2 * CHUNK, 3 * CHUNK) == -errno.EBADMSG
    assert holes(fill_fd, 0, SIZE) == [(0, SIZE)]
    # A range the copy does not reach: its end is reported, nothing is written.
    os.truncate(tmp_path / "copy", CHUNK)
    assert lib.afsd_fill_local(blob, CHUNK, 2 * CHUNK) == -errno.ENODATA
    assert holes(fill_fd, 0, SIZE) == [(0, SIZE)]
    os.close(fill_fd)
    os.close(source_fd)
