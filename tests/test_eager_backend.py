"""The eager backend's whole-blob fetch (afsd/ondemand/eager.py) against sources that answer the wrong
range: it must fail with one clear error and leave nothing behind, never spin or write misplaced bytes."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from afsd.errors import FetchError
from afsd.ondemand.base import BlobSource
from afsd.ondemand.eager import EAGER_REQUEST, EagerBackend
from afsd.ondemand.spec import BlobSpec, FetchedRange, Priority

CHUNK = 1 << 20
DATA = bytes(range(256)) * (3 * EAGER_REQUEST // 256)     # three requests' worth
SPEC = BlobSpec(layer_digest="sha256:" + "5" * 64, blob_digest="sha256:" + hashlib.sha256(DATA).hexdigest(),
                size=len(DATA), chunk_size=CHUNK,
                chunk_digests=tuple(hashlib.sha256(DATA[at:at + CHUNK]).digest() for at in range(0, len(DATA), CHUNK)),
                data_map=())


class Answers:
    """A source that answers each fetch with the range `answer(offset, length)` says."""

    def __init__(self, answer) -> None:   # noqa: ANN001 - (offset, length) -> (start, end)
        self.answer = answer
        self.fetches = 0

    async def fetch(self, offset: int, length: int, priority: Priority = Priority.DEMAND) -> FetchedRange:
        self.fetches += 1
        start, end = self.answer(offset, length)
        return FetchedRange(offset=start, data=DATA[start:end], source="test")

    async def close(self) -> None:
        pass


async def attach(tmp_path: Path, source: Answers) -> Path:
    path = tmp_path / "blob.erofs"
    await asyncio.wait_for(EagerBackend().attach(SPEC, path, BlobSource(source)), 30)
    return path


async def test_a_source_answering_the_exact_ranges_gives_the_blob(tmp_path: Path) -> None:
    path = await attach(tmp_path, Answers(lambda offset, length: (offset, offset + length)))
    assert path.read_bytes() == DATA


@pytest.mark.parametrize("answer, what", [
    (lambda offset, length: (0, min(len(DATA), EAGER_REQUEST)), "always the first range: ends before the position"),
    (lambda offset, length: (offset, offset), "nothing at all"),
    (lambda offset, length: (offset + CHUNK, offset + length), "a range starting after the position"),
    (lambda offset, length: (offset, offset + CHUNK) if offset else (0, length), "a range ending short"),
])
async def test_a_source_answering_another_range_fails_the_attach_and_leaves_nothing(
        tmp_path: Path, answer, what: str) -> None:  # noqa: ANN001
    source = Answers(answer)
    with pytest.raises(FetchError, match=f"layer {SPEC.layer_digest}.*bytes .* not covering"):
        await attach(tmp_path, source)
    assert source.fetches <= 3, what
    assert list(tmp_path.iterdir()) == [], f"{what}: left {list(tmp_path.iterdir())}"
