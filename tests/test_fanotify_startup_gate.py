"""A cold blob's whole-blob background fill waits until its startup is over, also when its first reads are not
recorded (afsd/ondemand/fanotify/startup.py): on the host kernel with real mounts and reads, and the gate's
arithmetic on its own."""

from __future__ import annotations

from afsd.ondemand.fanotify.settings import Settings
from afsd.ondemand.fanotify.startup import StartupGate
from tests.support.fanotify_lab import FanotifyLab, data_files


async def test_the_whole_blob_fill_waits_for_the_startup_of_an_unrecorded_blob_then_completes_it(
        fanotify_lab: FanotifyLab) -> None:
    """A task's start on a node that records nothing (--no-learned-prefetch): its reads are filled as they come,
    with nothing else filling the blob beside them; the blob still completes once the startup is over (here:
    the gate's window after the first read, since the quiet time is never reached)."""
    lab, blob = fanotify_lab, fanotify_lab.blob
    await lab.start(Settings(workers=2, fill_ahead=0, startup_quiet=3600.0))
    first, later = data_files(blob)[2], data_files(blob)[6]
    served = await lab.serve(prefetch=True)
    name = served.spec.name
    for file in (first, later):
        result = await lab.read(served.mount / file)
        assert result.ok and result.sha256 == blob.files[file]
    status = await lab.wait_status(lambda s: s.blob(name).complete or s.blob(name).details["inflight_tasks"] == 0)
    assert not status.blob(name).complete
    assert status.counters["bytes_prefetched"] == 0   # only the reads' own fills so far
    status = await lab.wait_status(lambda s: s.blob(name).complete, timeout=120)
    assert status.counters["bytes_prefetched"] > 0


async def test_with_the_gate_off_the_fill_starts_at_registration(fanotify_lab: FanotifyLab) -> None:
    lab = fanotify_lab
    await lab.start(Settings(workers=2, startup_quiet=0.0))
    served = await lab.serve(prefetch=True, mount=False)
    status = await lab.wait_status(lambda s: s.blob(served.spec.name).complete)
    assert status.counters["bytes_prefetched"] > 0 and status.counters["events_total"] == 0


def test_the_gate_opens_after_quiet_seconds_without_reads_and_stays_open() -> None:
    gate = StartupGate(quiet=1.0, window=10.0, created=100.0)
    assert not gate.over(100.5, waiting=False)
    assert gate.over(101.5, waiting=False)        # nobody read it: the fill need not wait longer
    assert gate.over(101.6, waiting=True)         # once over, over


def test_reads_and_waiting_readers_keep_the_gate_shut_until_the_window_ends() -> None:
    gate = StartupGate(quiet=1.0, window=10.0, created=100.0)
    gate.read(100.8)
    assert not gate.over(101.5, waiting=False)    # 0.7 s since the last read
    assert not gate.over(103.0, waiting=True)     # a reader waits for a fill: still starting
    assert not gate.over(103.9, waiting=False)    # ... and the quiet time counts from the end of that wait
    for now in range(104, 111):                   # a reader that never stops
        gate.read(float(now))
        assert not gate.over(now + 0.5, waiting=False)
    gate.read(111.0)
    assert gate.over(111.0, waiting=True)         # 10 s after the first read, whatever happens
