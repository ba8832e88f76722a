"""The fanotify backend serving a lazily filled erofs blob on the host kernel: real mounts, real reads."""

from __future__ import annotations

import asyncio
import errno
import hashlib
from pathlib import Path

import pytest

from afsd.ondemand.fanotify.settings import Settings
from afsd.ondemand.sparse import present_bytes_at as present_bytes
from tests.support.fanotify_lab import FanotifyLab, data_files


@pytest.mark.parametrize("fill_ahead", [0, 2])
async def test_metadata_only_blob_mounts_and_fills_only_what_is_read(fanotify_lab: FanotifyLab, fill_ahead: int) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    # (stream_window = fill_ahead: a sequential reader's window stays at fill_ahead instead of growing)
    await lab.start(Settings(workers=2, fill_ahead=fill_ahead, stream_window=fill_ahead))
    served = await lab.serve()
    metadata = sum(length for _, length in blob.spec.metadata_ranges())
    assert present_bytes(served.path, blob.spec.size) == metadata   # nothing but metadata before reading

    one = data_files(blob)[5]
    result = await lab.read(served.mount / one)
    assert result.ok and result.sha256 == blob.files[one]
    filled = present_bytes(served.path, blob.spec.size) - metadata
    # What was filled is the file's own chunks (whole chunks, so up to a chunk more at each end), plus
    # the chunks filled ahead of a miss.
    assert blob.sizes[one] <= filled <= blob.sizes[one] + (2 + fill_ahead) * blob.spec.chunk_size
    assert not (await lab.status()).blobs[0].complete

    for name, digest in blob.files.items():
        result = await lab.read(served.mount / name)
        assert result.ok and result.sha256 == digest, name
    assert (served.mount / "latest").resolve().name == "f00"

    status = await lab.wait_status(lambda s: s.blobs[0].complete)
    counters = status.counters
    assert counters["events_allowed_filled"] > 0 and counters["events_allowed_present"] > 0
    assert counters["events_total"] == counters["events_allowed_filled"] + counters["events_allowed_present"]
    assert counters["events_denied_failed"] == counters["events_denied_timeout"] == 0
    assert counters["blobs_completed"] == 1
    # Complete: every byte is the blob's, and the mark is gone, so reads raise no events any more.
    assert hashlib.sha256(served.path.read_bytes()).hexdigest() == blob.spec.blob_digest.split(":")[1]
    await asyncio.to_thread(Path("/proc/sys/vm/drop_caches").write_text, "3")
    result = await lab.read(served.mount / one)
    assert result.ok and result.sha256 == blob.files[one]
    assert (await lab.status()).counters["events_total"] == counters["events_total"]


async def test_prefetch_completes_the_blob_and_announces_it(fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    client = await lab.start(Settings(workers=2, prefetch_inflight=2))
    events = client.watch()
    first = asyncio.ensure_future(events.__anext__())
    await asyncio.sleep(0.2)  # the watch is registered before the blob
    served = await lab.serve(prefetch=True, mount=False)
    event = await asyncio.wait_for(first, 60)
    await events.aclose()
    assert event.name == served.spec.name and event.path == str(served.path)
    assert hashlib.sha256(served.path.read_bytes()).hexdigest() == blob.spec.blob_digest.split(":")[1]
    status = await lab.status()
    assert status.blobs[0].complete
    assert 0 < status.counters["bytes_prefetched"] <= blob.spec.size - sum(n for _, n in blob.spec.metadata_ranges())
    assert status.counters["events_total"] == 0   # nothing was mounted: every byte came from prefetch


async def test_a_local_copy_that_does_not_match_its_digests_is_never_served(fanotify_lab: FanotifyLab) -> None:
    """Misses of a blob with a local copy are filled by the supervisor itself (inline.py, in C): a copy
    whose data does not match the chunk digests fails the read with EIO and writes nothing."""
    lab, blob = fanotify_lab, fanotify_lab.blob
    corrupt = lab.root / "corrupt.erofs"
    data = bytearray(blob.full.read_bytes())
    inverted = bytes(range(255, -1, -1))
    for offset, length in blob.spec.data_map:   # every byte of file data flipped
        data[offset:offset + length] = data[offset:offset + length].translate(inverted)
    corrupt.write_bytes(bytes(data))
    await lab.start(Settings(workers=1, fill_ahead=0, inline_fill=8 << 20))   # (a read may span 2 chunks of 1 MiB)
    served = await lab.serve({"kind": "file", "path": str(corrupt)})
    metadata = sum(length for _, length in blob.spec.metadata_ranges())

    result = await lab.read(served.mount / data_files(blob)[0])
    assert not result.ok and result.errno == errno.EIO
    assert present_bytes(served.path, blob.spec.size) == metadata   # nothing of the bad copy was written
    counters = (await lab.status()).counters
    assert counters["fills_inline_failed"] >= 1 and counters["events_denied_failed"] >= 1
    assert counters["events_allowed_filled"] == 0
