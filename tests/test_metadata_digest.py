"""The metadata digest (afsd/ondemand/metadata.py) on a real converted blob: the converter hashes exactly the
metadata bytes, and the fanotify prefill reads and writes just those bytes when a source can check them by
the digest, and falls back to whole verified chunks when the source cannot or its bytes are wrong."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from afsd.errors import DigestMismatchError
from afsd.ondemand.fanotify.blobfile import METADATA_GAP, metadata_requests, prepare_blob
from afsd.ondemand.metadata import MetadataHasher, check_metadata, metadata_spans
from afsd.ondemand.sources import LocalFileSource
from afsd.ondemand.sparse import present_bytes
from afsd.ondemand.spec import BlobSpec, FetchedRange, FetchedSpans, Priority
from tests.support import fanotify_lab
from tests.support.fanotify_lab import markable_temp_root

pytest_plugins = ["tests.support.fanotify"]


@pytest.fixture
def workdir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="afsd-metadigest-", dir=markable_temp_root()))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


class CountingSource:
    """A file source that counts what the prefill asked of it; `fetch_metadata` reads `metadata_from` (a
    copy that may be forged), or is missing when `metadata_from` is None."""

    def __init__(self, spec: BlobSpec, full: Path, metadata_from: Path | None) -> None:
        self.chunks = LocalFileSource(spec, full)
        self.metadata = LocalFileSource(spec, metadata_from) if metadata_from is not None else None
        self.fetched: list[tuple[int, int]] = []
        self.metadata_reads = 0

    async def fetch(self, offset: int, length: int, priority: Priority = Priority.DEMAND) -> FetchedRange:
        fetched = await self.chunks.fetch(offset, length, priority)
        self.fetched.append((fetched.offset, len(fetched.data)))
        return fetched

    def __getattr__(self, name: str) -> object:
        if name == "fetch_metadata" and self.metadata is not None:
            async def fetch_metadata(spans: Sequence[tuple[int, int]]) -> FetchedSpans:
                self.metadata_reads += 1
                return await self.metadata.fetch_metadata(spans)
            return fetch_metadata
        raise AttributeError(name)

    async def close(self) -> None:
        pass


def metadata_of(spec: BlobSpec, path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[offset:offset + length] for offset, length in spec.metadata_ranges()]


def test_the_converter_digests_the_metadata_bytes_in_offset_order(fanotify_blob: fanotify_lab.TestBlob) -> None:
    spec, data = fanotify_blob.spec, fanotify_blob.full.read_bytes()
    metadata = metadata_of(spec, fanotify_blob.full)
    assert spec.metadata_digest == "sha256:" + hashlib.sha256(b"".join(metadata)).hexdigest()
    assert 0 < sum(map(len, metadata)) < spec.size // 20   # a few percent of the blob
    hasher = MetadataHasher(spec.metadata_ranges())
    for offset in range(0, len(data), 4096):   # any pieces, in order, give the same digest
        hasher.update(offset, data[offset:offset + 4096])
    assert hasher.hexdigest() == spec.metadata_digest
    skipping = MetadataHasher(spec.metadata_ranges())
    with pytest.raises(ValueError, match="was not handed over"):
        skipping.update(4096, data[4096:])


def test_spans_merge_metadata_ranges_with_small_gaps_and_are_checked_whole() -> None:
    ranges = [(0, 100), (150, 50), (100_000, 10), (100_020, 5)]
    assert metadata_spans(ranges, 64) == [(0, 200), (100_000, 25)]
    assert metadata_spans(ranges, 0) == ranges
    blob = bytes(range(256)) * 400
    hasher = MetadataHasher(ranges)
    hasher.update(0, blob)
    spans = metadata_spans(ranges, 64)
    data = b"".join(blob[o:o + n] for o, n in spans)
    check_metadata(ranges, hasher.hexdigest(), spans, data, source="test")
    with pytest.raises(DigestMismatchError, match="does not match the blob's metadata digest"):
        check_metadata(ranges, hasher.hexdigest(), spans, b"x" + data[1:], source="test")
    with pytest.raises(DigestMismatchError, match="incomplete"):
        check_metadata(ranges, hasher.hexdigest(), spans[:1], data[:200], source="test")
    # bytes between metadata ranges are not metadata: whatever they hold, the digest is the same
    check_metadata(ranges, hasher.hexdigest(), spans, data[:120] + b"?" * 10 + data[130:], source="test")


async def test_the_prefill_reads_and_writes_only_the_metadata_when_it_can_check_it_by_digest(
        fanotify_blob: fanotify_lab.TestBlob, workdir: Path) -> None:
    spec = fanotify_blob.spec
    source = CountingSource(spec, fanotify_blob.full, metadata_from=fanotify_blob.full)
    assert await prepare_blob(spec, workdir / "blob.erofs", source)
    assert source.metadata_reads == 1 and source.fetched == []
    assert metadata_of(spec, workdir / "blob.erofs") == metadata_of(spec, fanotify_blob.full)
    fd = os.open(workdir / "blob.erofs", os.O_RDONLY)
    try:
        written = present_bytes(fd, spec.size)
    finally:
        os.close(fd)
    by_chunks = sum(length for _, length in metadata_requests(spec))
    metadata = sum(length for _, length in spec.metadata_ranges())
    spans = sum(length for _, length in metadata_spans(spec.metadata_ranges(), METADATA_GAP))
    print(f"metadata {metadata} bytes in {len(spec.metadata_ranges())} ranges; read {spans} bytes by digest in "
          f"{len(metadata_spans(spec.metadata_ranges(), METADATA_GAP))} spans, {by_chunks} by whole chunks; "
          f"{written} bytes allocated")
    assert metadata <= spans < by_chunks // 4


async def test_forged_metadata_falls_back_to_whole_verified_chunks(fanotify_blob: fanotify_lab.TestBlob,
                                                                   workdir: Path) -> None:
    spec = fanotify_blob.spec
    forged = workdir / "forged.erofs"
    data = bytearray(fanotify_blob.full.read_bytes())
    offset, length = spec.metadata_ranges()[-1]
    data[offset + length - 1] ^= 0xFF                 # one metadata byte wrong
    forged.write_bytes(data)
    source = CountingSource(spec, fanotify_blob.full, metadata_from=forged)
    assert await prepare_blob(spec, workdir / "blob.erofs", source)
    assert source.metadata_reads == 1 and source.fetched != []
    assert metadata_of(spec, workdir / "blob.erofs") == metadata_of(spec, fanotify_blob.full)


async def test_without_a_metadata_digest_or_a_source_that_checks_it_the_prefill_fetches_whole_chunks(
        fanotify_blob: fanotify_lab.TestBlob, workdir: Path) -> None:
    undigested = dataclasses.replace(fanotify_blob.spec, metadata_digest="")   # a blob from converter 2
    for spec, metadata_from, name in ((undigested, fanotify_blob.full, "old.erofs"),
                                      (fanotify_blob.spec, None, "plain.erofs")):
        source = CountingSource(spec, fanotify_blob.full, metadata_from=metadata_from)
        assert await prepare_blob(spec, workdir / name, source)
        assert source.metadata_reads == 0
        assert sorted(source.fetched) == metadata_requests(spec)
        assert metadata_of(spec, workdir / name) == metadata_of(spec, fanotify_blob.full)
