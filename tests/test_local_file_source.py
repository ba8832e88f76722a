"""LocalFileSource.fill_now (afsd/ondemand/sources.py) with and without O_DIRECT: the same verified bytes,
blobs that do not end on a page boundary included, and a corrupt chunk refused either way."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from afsd.errors import DigestMismatchError
from afsd.ondemand.sources import LocalFileSource
from afsd.ondemand.spec import BlobSpec

CHUNK = 1 << 20


class Collect:
    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def write(self, offset: int, view: memoryview) -> int:
        self.data[offset:offset + len(view)] = view
        return len(view)


def blob(path: Path, size: int) -> tuple[BlobSpec, bytes]:
    data = os.urandom(size)
    path.write_bytes(data)
    digests = tuple(hashlib.sha256(data[at:at + CHUNK]).digest() for at in range(0, size, CHUNK))
    return BlobSpec(layer_digest="test:" + "cd" * 32, blob_digest="sha256:" + hashlib.sha256(data).hexdigest(),
                    size=size, chunk_size=CHUNK, chunk_digests=digests, data_map=()), data


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("size", [CHUNK, 9 * CHUNK, 5 * CHUNK + 123])
def test_fills_give_the_blob_s_bytes(tmp_path: Path, direct: bool, size: int) -> None:
    spec, data = blob(tmp_path / "blob", size)
    source = LocalFileSource(spec, tmp_path / "blob", direct=direct)
    whole, tail = Collect(size), Collect(size)
    assert source.fill_now(0, size, whole) == size and bytes(whole.data) == data
    last = (size - 1) // CHUNK * CHUNK
    assert source.fill_now(last, size - last, tail) == size - last and tail.data[last:] == data[last:]


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_a_corrupt_chunk_is_refused(tmp_path: Path, direct: bool) -> None:
    spec, data = blob(tmp_path / "blob", 3 * CHUNK + 5)
    with open(tmp_path / "blob", "r+b") as f:
        f.seek(2 * CHUNK + 7)
        f.write(bytes([data[2 * CHUNK + 7] ^ 1]))
    with pytest.raises(DigestMismatchError, match="chunk 2 "):
        LocalFileSource(spec, tmp_path / "blob", direct=direct).fill_now(0, spec.size, Collect(spec.size))
