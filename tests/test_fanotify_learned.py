"""Learned prefetch in the fanotify backend, on the host kernel: the supervisor records a blob's first reads,
and fetches a learned trace's ranges before readers ask, so their reads need no demand fetch."""

from __future__ import annotations

import asyncio

from afsd.ondemand.fanotify.settings import Settings
from tests.support.fanotify_lab import FanotifyLab, data_files


async def test_recorded_reads_prefetched_elsewhere_are_answered_without_a_demand_fetch(fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    client = await lab.start(Settings(workers=2, fill_ahead=0))
    late, early = data_files(blob)[7], data_files(blob)[3]

    # Run 1: record what a reader of two files reads first, in its order.
    first = await lab.serve(label="first", record=30.0)
    for name in (late, early):
        result = await lab.read(first.mount / name)
        assert result.ok and result.sha256 == blob.files[name]
    trace = await client.trace(first.spec.name, close=True)
    assert trace is not None and trace.closed and trace.complete and not trace.truncated
    offsets = [offset for offset, _, _ in trace.ranges]
    assert all(offset % 4096 == 0 and length % 4096 == 0 for offset, length, _ in trace.ranges)
    assert [ms for _, _, ms in trace.ranges] == sorted(ms for _, _, ms in trace.ranges)   # first-read order
    assert len(set(offsets)) == len(offsets)
    assert trace.bytes >= blob.sizes[late] + blob.sizes[early]
    counters = (await lab.status()).counters
    assert counters["events_filled_demand"] > 0            # run 1 had nothing learned: its misses were fetched

    # Run 2, another blob with the same bytes: the recording is learned, fetched before the reads.
    second = await lab.serve(label="second", learned=[(o, n) for o, n, _ in trace.ranges])
    status = await lab.wait_status(lambda s: s.blob(second.spec.name).details.get("learned_runs_left") == 0
                                   and s.blob(second.spec.name).details["inflight_tasks"] == 0)   # (queued ones too)
    before = status.counters
    assert before["learned_blobs"] == 1 and before["learned_bytes_prefetched"] > 0
    for name in (late, early):
        result = await lab.read(second.mount / name)
        assert result.ok and result.sha256 == blob.files[name]
    after = await lab.status()
    delta = {key: after.counters[key] - before[key] for key in after.counters}
    assert delta["events_total"] > 0
    assert delta["events_filled_demand"] == 0 and delta["events_allowed_filled"] == 0   # every read found its bytes
    details = after.blob(second.spec.name).details
    assert details["learned_used_bytes"] == details["learned_prefetched_bytes"] == after.counters["learned_bytes_used"]
    assert after.counters["learned_bytes_prefetched"] == details["learned_prefetched_bytes"]
    # The timeline says the stream was done before the first read, which then waited for nothing.
    assert 0 <= details["learned_started_ms"] <= details["learned_finished_ms"] <= details["learned_first_read_ms"]
    assert details["learned_bytes_at_first_read"] == details["learned_prefetched_bytes"]
    assert details["learned_waits"] == after.counters["learned_waits"] == 0
    # Nothing beyond the learned chunks was fetched: the rest of the blob is still holes.
    assert after.blob(second.spec.name).present_bytes < blob.spec.size / 2


async def test_a_read_racing_the_learned_prefetch_gets_true_bytes(fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    await lab.start(Settings(workers=2))
    names = data_files(blob)
    whole = [(0, blob.spec.size)]   # learned: everything, in order
    served = await lab.serve(learned=whole)
    results = await asyncio.gather(*(lab.read(served.mount / name) for name in reversed(names)))
    assert all(r.ok and r.sha256 == blob.files[n] for r, n in zip(results, reversed(names)))


async def test_a_recording_sees_every_read_of_its_window_and_the_whole_blob_fill_waits_for_it(
        fanotify_lab: FanotifyLab) -> None:
    """The first node to run a task records its reads with background prefetch on. A whole-blob fill during the
    window would complete the blob, whose mark then goes: the task's later reads would raise no event and the
    cluster would learn only the start of them. So the rest of the blob waits until the window is over."""
    lab, blob = fanotify_lab, fanotify_lab.blob
    client = await lab.start(Settings(workers=2, fill_ahead=0))
    first, later = data_files(blob)[2], data_files(blob)[6]
    served = await lab.serve(prefetch=True, record=60.0)
    name = served.spec.name
    result = await lab.read(served.mount / first)
    assert result.ok and result.sha256 == blob.files[first]
    # Once the read's own fills are done, nothing else fills the blob while the window is open.
    status = await lab.wait_status(lambda s: s.blob(name).complete or s.blob(name).details["inflight_tasks"] == 0)
    result = await lab.read(served.mount / later)
    assert result.ok and result.sha256 == blob.files[later]
    trace = await client.trace(name, close=True)
    assert trace is not None and trace.publishable
    assert trace.bytes >= blob.sizes[first] + blob.sizes[later]     # both reads are in the recording
    assert not status.blob(name).complete
    # The window is over: the background fill takes the rest of the blob.
    await lab.wait_status(lambda s: s.blob(name).complete)


async def test_a_recording_closed_because_its_blob_is_detached_starts_no_whole_blob_fill(
        fanotify_lab: FanotifyLab) -> None:
    """The node daemon takes a layer's recording as its last mount goes. A lingering layer then gets the rest of
    its blob in the background (above); one detached right away does not: a fill started there would only take
    the CPU and the link from its unmount."""
    lab, blob = fanotify_lab, fanotify_lab.blob
    client = await lab.start(Settings(workers=2, fill_ahead=0))
    served = await lab.serve(prefetch=True, record=60.0)
    name, first = served.spec.name, data_files(blob)[2]
    result = await lab.read(served.mount / first)
    assert result.ok and result.sha256 == blob.files[first]
    before = await lab.wait_status(lambda s: s.blob(name).details["inflight_tasks"] == 0)
    trace = await client.trace(name, close=True, detaching=True)
    assert trace is not None and trace.closed and trace.publishable
    await asyncio.sleep(1.0)   # ten of the supervisor's rounds, each of which would start the fill
    after = await lab.status()
    assert after.blob(name).details["inflight_tasks"] == 0 and not after.blob(name).complete
    assert after.blob(name).present_bytes == before.blob(name).present_bytes
    assert after.counters["bytes_prefetched"] == before.counters["bytes_prefetched"]
