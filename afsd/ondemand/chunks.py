"""Checking blob bytes against a blob's chunk digest table.

Every erofs blob is hashed in fixed-size chunks when it is made (see afsd.erofs.convert); the table is
part of what describes a blob (`BlobSpec.chunk_table`, spec.py). A reader that fetches bytes from a peer
widens its request to whole chunks and checks each one before using it, so a corrupt or lying peer is
caught on the first bad chunk rather than after a whole-blob download.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from afsd.errors import DigestMismatchError


@dataclass(frozen=True)
class ChunkTable:
    size: int
    chunk_size: int
    digests: tuple[bytes, ...]

    def __post_init__(self) -> None:
        expected = -(-self.size // self.chunk_size) if self.chunk_size > 0 else -1
        if self.chunk_size <= 0 or len(self.digests) != expected:
            raise ValueError(f"chunk table of {len(self.digests)} digests does not fit a blob of "
                             f"{self.size} bytes in chunks of {self.chunk_size}")

    def widen(self, offset: int, length: int) -> tuple[int, int]:
        """The smallest whole-chunk range covering [offset, offset+length), clipped to the blob."""
        start = (offset // self.chunk_size) * self.chunk_size
        end = min(self.size, -(-(offset + length) // self.chunk_size) * self.chunk_size)
        return start, max(0, end - start)

    def check(self, offset: int, data: bytes | memoryview, *, source: str) -> None:
        """Verify `data` read at `offset`: it must start on a chunk boundary and consist of whole
        chunks (the last may end at the blob's end). Raises DigestMismatchError naming `source`."""
        if offset % self.chunk_size:
            raise ValueError(f"offset {offset} is not on a chunk boundary")
        view = memoryview(data)
        for position in range(0, len(view), self.chunk_size):
            index = (offset + position) // self.chunk_size
            piece = view[position:position + self.chunk_size]
            chunk_end = min(self.size, (index + 1) * self.chunk_size)
            if offset + position + len(piece) != chunk_end:
                raise ValueError(f"range at {offset} of {len(view)} bytes does not end on a chunk boundary")
            if hashlib.sha256(piece).digest() != self.digests[index]:
                raise DigestMismatchError(
                    f"chunk {index} (bytes {index * self.chunk_size}-{chunk_end}) from {source} does not "
                    "match the blob's chunk digest")
