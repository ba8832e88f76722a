"""What the on-demand backends are given: a blob to serve and a source of its verified bytes.

`BlobSpec` describes one layer's erofs blob as the layerstores published it (`StatLayer`): its size,
its chunk digest table, its data map, plus where it may be read from. It is plain data (JSON) so it can
cross process boundaries: the node daemon hands it to the kernel-facing supervisor, which hands it to
fetch workers.

`RangeSource` is the one thing a backend needs to fill misses: "give me verified bytes of this blob".
The cluster's implementation reads from peer layerstores (afsd.cluster.fetcher.RangeFetcher); tests
may use a local file. A source may also *fill* a `BlobSink` (the blob file the kernel reads): then each
verified piece goes from the buffer it was received into straight into the sink, as it arrives, with no
copy into a bytes object per range (`afsd.ondemand.sources.fill_from` uses `fill` where a source has it).
"""

from __future__ import annotations

import base64
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from afsd.ondemand.chunks import ChunkTable
from afsd.ondemand.metadata import metadata_ranges

if TYPE_CHECKING:   # the converter's package is heavy to import, and fetch workers import this module
    from afsd.erofs.convert import BlobInfo


class Priority(enum.IntEnum):
    """Demand reads (a process is waiting in the kernel) go first, then what is filled ahead of a reader
    (it will likely wait for it soon), then background prefetch."""

    DEMAND = 0
    AHEAD = 1
    PREFETCH = 2


@dataclass(frozen=True)
class BlobSpec:
    layer_digest: str                          # the registry layer the blob was made from
    blob_digest: str                           # sha256 of the whole blob
    size: int
    chunk_size: int
    chunk_digests: tuple[bytes, ...]
    data_map: tuple[tuple[int, int], ...]      # regular-file data; everything else is metadata
    implicit_dirs: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()            # layerstore endpoints that held it when resolved (a hint)
    media_type: str = ""
    compressed_size: int = 0
    diff_id: str = ""
    blob_id: str = ""
    converter: str = ""
    descriptor: bytes = b""                    # the converter's SignedBlobDescriptor (afsd/trust), serialized
    metadata_digest: str = ""                  # of the metadata (afsd/ondemand/metadata.py); "" before converter 3

    @classmethod
    def of_blob(cls, blob: BlobInfo, providers: tuple[str, ...] = ()) -> BlobSpec:
        """The spec of a blob as its converter describes it (a blob converted here, or in tests)."""
        return cls(layer_digest=blob.layer_digest, blob_digest=blob.digest, size=blob.size, chunk_size=blob.chunk_size,
                   chunk_digests=tuple(blob.chunk_digests), data_map=tuple(blob.data_map),
                   implicit_dirs=tuple(blob.implicit_dirs), providers=providers, diff_id=blob.diff_id,
                   blob_id=blob.blob_id, converter=blob.converter, metadata_digest=blob.metadata_digest)

    @property
    def name(self) -> str:
        """A short, filesystem- and kernel-key-safe name: the layer digest's hex."""
        return self.layer_digest.split(":", 1)[1]

    def chunk_table(self) -> ChunkTable:
        """The blob's chunk digest table, which every fetched byte is checked against."""
        return ChunkTable(self.size, self.chunk_size, tuple(self.chunk_digests))

    def metadata_ranges(self) -> list[tuple[int, int]]:
        """The complement of the data map within [0, size): what a reader must have before mounting."""
        return metadata_ranges(self.size, self.data_map)

    def to_json(self) -> dict[str, Any]:
        return {
            "layer_digest": self.layer_digest, "blob_digest": self.blob_digest, "size": self.size,
            "chunk_size": self.chunk_size, "chunk_digests": [d.hex() for d in self.chunk_digests],
            "data_map": [list(r) for r in self.data_map], "implicit_dirs": list(self.implicit_dirs),
            "providers": list(self.providers), "media_type": self.media_type,
            "compressed_size": self.compressed_size, "diff_id": self.diff_id, "blob_id": self.blob_id,
            "converter": self.converter, "descriptor": base64.b64encode(self.descriptor).decode(),
            "metadata_digest": self.metadata_digest,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BlobSpec":
        return cls(
            layer_digest=data["layer_digest"], blob_digest=data["blob_digest"], size=int(data["size"]),
            chunk_size=int(data["chunk_size"]), chunk_digests=tuple(bytes.fromhex(d) for d in data["chunk_digests"]),
            data_map=tuple((int(o), int(n)) for o, n in data["data_map"]),
            implicit_dirs=tuple(data.get("implicit_dirs", ())), providers=tuple(data.get("providers", ())),
            media_type=data.get("media_type", ""), compressed_size=int(data.get("compressed_size", 0)),
            diff_id=data.get("diff_id", ""), blob_id=data.get("blob_id", ""), converter=data.get("converter", ""),
            descriptor=base64.b64decode(data.get("descriptor", "")), metadata_digest=data.get("metadata_digest", ""))


@dataclass(frozen=True)
class FetchedRange:
    """Verified bytes of a blob: `data` starts at `offset`, which is on a chunk boundary, and covers
    whole chunks (the last one may end at the blob's end). `data` may be the fetcher's own receive buffer
    (a bytearray, not copied): read it, never change it (other reads that joined its pieces copy from it)."""

    offset: int
    data: bytes | bytearray
    source: str = ""           # who served it: "local", "peer:<endpoint>", ...
    stats: dict[str, float] = field(default_factory=dict)

    def require_covers(self, start: int, end: int) -> None:
        """ValueError unless these bytes include [start, end): a source that returned less is broken."""
        require_covers(self.offset, self.offset + len(self.data), start, end)


@dataclass(frozen=True)
class FetchedSpans:
    """Bytes of a blob in `spans` ((offset, length), ascending), back to back in `data`, that cover every
    metadata range and whose metadata bytes matched the blob's metadata digest (the bytes between
    metadata ranges are file data nobody checked: use only the metadata)."""

    spans: tuple[tuple[int, int], ...]
    data: bytes
    source: str = ""


@dataclass(frozen=True)
class Filled:
    """What a fill did: the range it covered (whole chunks, from `offset`), the bytes the sink wrote
    (holes it filled: bytes already present are not counted), and who served it."""

    offset: int
    length: int
    written: int
    source: str = ""
    stats: dict[str, float] = field(default_factory=dict)

    def require_covers(self, start: int, end: int) -> None:
        """ValueError unless the fill covered [start, end): a source that filled less is broken."""
        require_covers(self.offset, self.offset + self.length, start, end)


def require_covers(got_start: int, got_end: int, start: int, end: int) -> None:
    if got_start > start or got_end < end:
        raise ValueError(f"the source returned bytes {got_start}-{got_end}, not covering {start}-{end}")


class BlobSink(Protocol):
    """Where a fill puts verified bytes. `write` is called from threads (several at once), with bytes
    that start and end on chunk boundaries (the blob's end for the last chunk) and were checked against
    the chunk table; the view is only valid during the call. Returns the bytes it wrote."""

    def write(self, offset: int, data: memoryview) -> int:
        ...


class RangeSource(Protocol):
    async def fetch(self, offset: int, length: int, priority: Priority = Priority.DEMAND) -> FetchedRange:
        """Verified bytes covering [offset, offset + length) (widened to whole chunks, clipped to the
        blob's size). Raises an AfsdError when no source could provide them."""
        ...

    async def close(self) -> None:
        ...

    # Optional (afsd.ondemand.sources.fill_from falls back to `fetch` + one write without it):
    #   async def fill(self, offset, length, priority, sink: BlobSink) -> Filled
    # covers [offset, offset + length) like `fetch`, handing each verified piece to `sink` as it arrives.
    #
    # Optional (the fanotify metadata prefill fetches whole chunks without it, or when it raises):
    #   async def fetch_metadata(self, spans: Sequence[tuple[int, int]]) -> FetchedSpans
    # the bytes of `spans` (covering every metadata range) read as they are, from one place, in as few
    # round trips as it can, and checked against `spec.metadata_digest` (afsd/ondemand/metadata.py); raises an
    # AfsdError (DigestMismatchError for wrong bytes) when it cannot.
