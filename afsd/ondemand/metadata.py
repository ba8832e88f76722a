"""A blob's metadata: the bytes outside its data map, and the one digest that covers them all.

erofs reads metadata (superblock, inodes, xattrs, directories, inline tails) straight from its backing file,
so a reader must hold every metadata byte before it mounts a blob, and those bytes must be right. The
chunk table can only check them by whole chunks, and erofs scatters metadata over the blob (a Debian +
python3 layer: 0.8 MiB of it in 90 MiB of chunks). So the converter also computes the *metadata digest*:
sha256 over the blob's metadata bytes, concatenated in `metadata_ranges` order. It travels with the blob
(`BlobInfo`, `StatLayerResponse.metadata_digest`, `BlobSpec`) and is attested by the converter's signed
descriptor (afsd/trust/descriptors.py), and a reader checks just those bytes against it
(afsd/ondemand/fanotify/blobfile.py). Defined here once, for both sides (here rather than in afsd/erofs,
whose package imports the whole converter: fetch workers import this).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from afsd.errors import DigestMismatchError

Ranges = Sequence[tuple[int, int]]


def metadata_ranges(size: int, data_map: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The complement of `data_map` within [0, size), ascending: what a reader must have before mounting."""
    ranges, position = [], 0
    for offset, length in sorted(data_map):
        if offset > position:
            ranges.append((position, offset - position))
        position = max(position, offset + length)
    if position < size:
        ranges.append((position, size - position))
    return ranges


def metadata_spans(ranges: Ranges, max_gap: int) -> list[tuple[int, int]]:
    """`ranges` (ascending) merged wherever less than `max_gap` + 1 bytes of file data lie between them:
    fewer, larger reads, at the cost of the data bytes in between."""
    spans: list[tuple[int, int]] = []
    for offset, length in ranges:
        if spans and offset - (spans[-1][0] + spans[-1][1]) <= max_gap:
            spans[-1] = (spans[-1][0], offset + length - spans[-1][0])
        else:
            spans.append((offset, length))
    return spans


class MetadataHasher:
    """The metadata digest of pieces of a blob handed to `update` in ascending order (any pieces: only
    their metadata bytes count). `hexdigest` raises ValueError unless every metadata byte was seen."""

    def __init__(self, ranges: Ranges) -> None:
        self._ranges = ranges
        self._index = 0        # the range the next metadata byte is in
        self._at = 0           # bytes before this offset are hashed (or not metadata)
        self._sha = hashlib.sha256()

    def update(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view, end = memoryview(data), offset + len(data)
        while self._index < len(self._ranges):
            start, length = self._ranges[self._index]
            wanted, stop = max(start, self._at), start + length
            if wanted >= end:
                return
            if wanted < offset:
                raise ValueError(f"metadata byte {wanted} was not handed over before byte {offset}")
            upto = min(stop, end)
            self._sha.update(view[wanted - offset:upto - offset])
            self._at = upto
            if upto < stop:
                return
            self._index += 1

    def hexdigest(self) -> str:
        """`sha256:<hex>` of the metadata bytes."""
        if self._index < len(self._ranges):
            raise ValueError(f"metadata from byte {max(self._at, self._ranges[self._index][0])} on was not handed over")
        return "sha256:" + self._sha.hexdigest()


def check_metadata(ranges: Ranges, expected: str, spans: Ranges, data: bytes | bytearray | memoryview, *,
                   source: str) -> None:
    """`data` holds the blob's bytes in `spans` (ascending, back to back): DigestMismatchError naming
    `source` unless they cover every metadata range and the metadata bytes hash to `expected`."""
    hasher, at = MetadataHasher(ranges), 0
    view = memoryview(data)
    if sum(length for _, length in spans) != len(view):
        raise DigestMismatchError(f"{source} sent {len(view)} bytes for spans of "
                                  f"{sum(length for _, length in spans)}")
    try:
        for offset, length in spans:
            hasher.update(offset, view[at:at + length])
            at += length
        digest = hasher.hexdigest()
    except ValueError as error:
        raise DigestMismatchError(f"the metadata read from {source} is incomplete: {error}") from None
    if digest != expected:
        raise DigestMismatchError(f"the metadata from {source} does not match the blob's metadata digest")
