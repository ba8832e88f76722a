"""The blob file of the fanotify backend: making it (sparse, metadata present) and checking it before
it is marked.

Data flow: node daemon -> `prepare_blob` (file of the blob's size; every byte outside the data map
fetched through a RangeSource, verified, written) -> supervisor `check_blob_file` (right filesystem,
right size, metadata present) -> mark -> mount. erofs reads metadata through the page cache without
raising fanotify events, so a metadata hole would read as zeros: that is why both ends check.

The metadata is fetched by its digest where the blob has one (afsd/ondemand/metadata.py) and the source
can (`fetch_metadata`): just the metadata bytes, in few spans, in one round trip; else, or when that
fails (a hostile provider, say), in whole chunks checked against the chunk table, with failover.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
from pathlib import Path

from afsd import phases
from afsd.errors import AfsdError
from afsd.ondemand.fanotify import _sys
from afsd.ondemand.metadata import metadata_spans
from afsd.ondemand.sparse import first_hole, write_at
from afsd.ondemand.spec import BlobSpec, FetchedSpans, Priority, RangeSource

log = logging.getLogger(__name__)

# Metadata ranges with at most this much file data between them are read as one span (the data is read and
# dropped): fewer, larger requests for a few percent more bytes.
METADATA_GAP = 64 << 10
PREFILL_REQUEST = 8 << 20
# Metadata requests in flight at once: erofs scatters metadata over the blob (a Debian + python3 layer: 0.8 MiB
# of it in 37 whole-chunk requests, 90 MiB), and one request at a time leaves the link idle between them.
PREFILL_CONCURRENCY = 4


class BlobFileError(AfsdError):
    """A blob file the fanotify backend cannot serve as it is."""


async def prepare_blob(spec: BlobSpec, blob_path: Path, source: RangeSource) -> bool:
    """Create `blob_path` as a sparse file of the blob's size with every metadata byte present (fetched
    through `source` and verified: by the metadata digest, else by whole chunks, `PREFILL_CONCURRENCY`
    requests at a time), so erofs can mount it and only file data is left to fill on demand. Only metadata
    is written: keeping the whole chunks cost the mount more than the fills it saved (measured; see
    docs/learned-prefetch.md).

    A file already there with the right size and its metadata present is kept (it may be partly filled
    from an earlier run, and may be registered: it is not written to). Returns True when it created
    the file.
    """
    if await asyncio.to_thread(_prepared, spec, blob_path):
        return False
    partial = blob_path.with_name(f".{blob_path.name}.{os.getpid()}.partial")
    fd = await asyncio.to_thread(_create_sparse, partial, spec.size)
    try:
        metadata = spec.metadata_ranges()
        with phases.phase("attach.prepare.fetch"):
            if not await _prefill_by_digest(spec, fd, source, metadata):
                await _prefill_by_chunks(spec, fd, source, metadata)
        # Not fsynced (a journal commit on the mount's path, 3-5 ms a layer): on the filesystems blobs may
        # live on (ext4 in its default data=ordered, xfs, btrfs) a crash leaves pages never written back as
        # holes, which `_prepared` finds (a new prefill follows), as it does in the file data the
        # supervisor fills, which is not fsynced either.
        with phases.phase("attach.prepare.rename"):
            await asyncio.to_thread(os.replace, partial, blob_path)
    except BaseException:
        await asyncio.to_thread(partial.unlink, missing_ok=True)
        raise
    finally:
        await asyncio.to_thread(os.close, fd)
    return True


async def _prefill_by_digest(spec: BlobSpec, fd: int, source: RangeSource, metadata: list[tuple[int, int]]) -> bool:
    """Write the metadata into `fd` as `source.fetch_metadata` reads and checks it; False (nothing written)
    when the blob has no metadata digest, the source cannot, or it failed."""
    fetch_metadata = getattr(source, "fetch_metadata", None)
    if not spec.metadata_digest or fetch_metadata is None or not metadata:
        return False
    spans = metadata_spans(metadata, METADATA_GAP)
    try:
        fetched: FetchedSpans = await fetch_metadata(spans)
    except (AfsdError, OSError) as error:
        log.warning("layer %s: reading its metadata by its digest failed (%s); fetching whole chunks instead",
                    spec.layer_digest, error)
        return False
    if fetched.spans != tuple(spans) or len(fetched.data) != sum(length for _, length in spans):
        raise ValueError(f"the source answered spans {fetched.spans[:3]}... for {spans[:3]}...")
    with phases.phase("attach.prepare.write"):
        await asyncio.to_thread(_write_spans, fd, fetched, metadata)
    log.info("layer %s: metadata read by its digest from %s: %d bytes in %d spans", spec.layer_digest,
             fetched.source, len(fetched.data), len(spans))
    return True


async def _prefill_by_chunks(spec: BlobSpec, fd: int, source: RangeSource, metadata: list[tuple[int, int]]) -> None:
    """Write the metadata into `fd` from whole chunks that `source` fetches (and checks against the chunk
    table), `PREFILL_CONCURRENCY` requests at a time."""
    slots = asyncio.Semaphore(PREFILL_CONCURRENCY)

    async def fill(start: int, length: int) -> None:
        async with slots:
            fetched = await source.fetch(start, length, Priority.DEMAND)
            end = fetched.offset + len(fetched.data)
            ranges = _clip(metadata, fetched.offset, end)
            await asyncio.to_thread(_write_ranges, fd, fetched.offset, fetched.data, ranges)

    try:   # on the first failure the other fills are cancelled, and that failure is the one raised
        async with asyncio.TaskGroup() as group:
            for start, length in metadata_requests(spec):
                group.create_task(fill(start, length))
    except BaseExceptionGroup as failure:
        raise failure.exceptions[0] from None


def check_blob_file(spec: BlobSpec, path: str, fd: int) -> tuple[tuple[int, int], bool]:
    """Check the open blob file `fd` before marking it; returns its (st_dev, st_ino) and whether it is
    complete already. Raises BlobFileError naming the file and the fix."""
    _, fs_name = _sys.filesystem_type(fd)
    if fs_name not in _sys.MARKABLE_FILESYSTEMS.values():
        raise BlobFileError(f"blob {path} is on {fs_name}, where fanotify pre-content marks are refused: keep "
                            "blobs on ext4, xfs or btrfs")
    st = os.fstat(fd)
    if st.st_size != spec.size:
        raise BlobFileError(f"blob {path} is {st.st_size} bytes, its spec says {spec.size}: create it with "
                            "prepare_blob")
    for offset, length in spec.metadata_ranges():
        hole = first_hole(fd, offset, offset + length)
        if hole is not None:
            raise BlobFileError(f"blob {path} has a hole at byte {hole} in its metadata (erofs reads metadata "
                                "without raising events, so it must be present before mounting): prefill it "
                                "with prepare_blob")
    return (st.st_dev, st.st_ino), first_hole(fd, 0, spec.size) is None


def mounts_of(path: str) -> list[str]:
    """Mount points whose source is the file `path` (a file-backed erofs names its image file)."""
    wanted = os.fsencode(path)
    found = []
    try:
        with open("/proc/self/mountinfo", "rb") as handle:
            for line in handle:
                fields = line.split()
                source = fields[fields.index(b"-") + 2]
                if _unescape(source) == wanted:
                    found.append(os.fsdecode(_unescape(fields[4])))
    except (OSError, ValueError, IndexError):
        pass
    return found


def metadata_requests(spec: BlobSpec) -> list[tuple[int, int]]:
    """Whole-chunk requests covering every metadata range, merged, each at most PREFILL_REQUEST bytes."""
    size = spec.chunk_size
    chunks = sorted({c for offset, length in spec.metadata_ranges() if length > 0
                     for c in range(offset // size, (offset + length - 1) // size + 1)})
    requests: list[tuple[int, int]] = []
    for chunk in chunks:
        start = chunk * size
        end = min(spec.size, start + size)
        if requests and requests[-1][0] + requests[-1][1] == start and requests[-1][1] < PREFILL_REQUEST:
            requests[-1] = (requests[-1][0], end - requests[-1][0])
        else:
            requests.append((start, end - start))
    return requests


def _unescape(field: bytes) -> bytes:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def _prepared(spec: BlobSpec, path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if os.fstat(fd).st_size != spec.size:
            return False
        return all(first_hole(fd, offset, offset + length) is None for offset, length in spec.metadata_ranges())
    finally:
        os.close(fd)


def _create_sparse(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _, fs_name = _sys.filesystem_type(fd)
        if fs_name not in _sys.MARKABLE_FILESYSTEMS.values():
            raise BlobFileError(f"{path.parent} is on {fs_name}, where fanotify pre-content marks are refused: "
                                "keep the layer cache on ext4, xfs or btrfs")
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd


def _clip(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    out = []
    for offset, length in ranges:
        low, high = max(offset, start), min(offset + length, end)
        if low < high:
            out.append((low, high - low))
    return out


def _write_ranges(fd: int, base: int, data: bytes, ranges: list[tuple[int, int]]) -> None:
    view = memoryview(data)
    for offset, length in ranges:
        write_at(fd, view[offset - base:offset - base + length], offset)


def _write_spans(fd: int, fetched: FetchedSpans, metadata: list[tuple[int, int]]) -> None:
    """The `metadata` bytes of `fetched` (whose spans each hold whole metadata ranges: `metadata_spans`), not
    the file data between them, which nothing checked, into `fd`."""
    view, spans = memoryview(fetched.data), fetched.spans
    at = list(itertools.accumulate((length for _, length in spans), initial=0))   # each span's place in the data
    index = 0
    for offset, length in metadata:
        while offset >= spans[index][0] + spans[index][1]:
            index += 1
        start = at[index] + offset - spans[index][0]
        write_at(fd, view[start:start + length], offset)
