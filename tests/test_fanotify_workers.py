"""Crash safety of the fanotify backend's fetch workers (issue 7): a worker that dies, hangs or waits on
a hung provider never lets a reader see unfilled bytes and never leaves a reader blocked for good."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import signal
import socket
import time

import httpx

from afsd.lab.ports import reserve_port
from afsd.ondemand.fanotify.settings import Settings
from tests.support import fanotify_sources
from tests.support.fanotify_lab import FanotifyLab, data_files

KILLS = 20


async def test_reader_gets_right_bytes_when_the_worker_is_killed_mid_fetch(fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    await lab.start(Settings(workers=1, fetch_deadline=60, fill_ahead=0))   # each file needs fetches of its own
    delay = 0.3
    served = await lab.serve(fanotify_sources.config("slow", path=str(blob.full), delay=delay,
                                                     markers=str(lab.markers)))
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    seen: set[str] = set()
    for iteration, name in enumerate(data_files(blob)[:KILLS]):
        reader = lab.start_reader(served.mount / name)
        seen.add(await lab.wait_for_marker(seen))          # the reader is now blocked on this fetch
        workers = await lab.worker_pids()                  # (asked first: the kill must land inside the fetch)
        await asyncio.sleep(rng.uniform(0, delay * 0.8))   # a random point inside the fetch
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        result = await lab.finish(reader)
        assert result.ok, f"iteration {iteration} (seed {seed}): read of {name} failed with errno {result.errno}"
        assert result.sha256 == blob.files[name], f"iteration {iteration} (seed {seed}): wrong bytes in {name}"
        assert result.zero_pages == 0
        seen |= set(os.listdir(lab.markers))
    counters = (await lab.status()).counters
    assert counters["worker_restarts"] == KILLS and counters["worker_deaths"] == KILLS, counters
    assert counters["events_redispatched"] >= KILLS and counters["tasks_redispatched"] >= KILLS
    assert counters["events_denied_failed"] == counters["events_denied_timeout"] == 0


async def test_stopped_worker_is_detected_replaced_and_readers_complete(fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    held = reserve_port()  # the supervisor's metrics server binds it (SO_REUSEADDR); nothing else can
    port = held.port
    await lab.start(Settings(workers=1, worker_timeout=1.5, heartbeat=0.25, fetch_deadline=60),
                    metrics_listen=held.address)
    served = await lab.serve(fanotify_sources.config("slow", path=str(blob.full), delay=0.5,
                                                     markers=str(lab.markers)))
    names = data_files(blob)[:3]
    readers = [lab.start_reader(served.mount / name) for name in names]
    await lab.wait_for_marker(set())
    [stopped] = await lab.worker_pids()
    os.kill(stopped, signal.SIGSTOP)
    for name, reader in zip(names, readers):
        result = await lab.finish(reader)
        assert result.ok and result.sha256 == blob.files[name]
    status = await lab.status()
    assert status.counters["worker_hangs"] == 1 and status.counters["worker_restarts"] == 1
    assert status.counters["events_redispatched"] >= 1
    assert stopped not in [w.pid for w in status.workers]
    assert not os.path.exists(f"/proc/{stopped}")          # killed and reaped, not left stopped

    async with httpx.AsyncClient() as http:
        deadline = time.monotonic() + 10
        while True:  # the endpoint serves a snapshot refreshed every second
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            if ("afsd_fanotify_worker_hangs_total 1.0" in text and "afsd_fanotify_worker_restarts_total 1.0" in text
                    or time.monotonic() > deadline):   # (a snapshot may fall between the hang and the restart)
                break
            await asyncio.sleep(0.2)
    held.close()
    assert "afsd_fanotify_worker_hangs_total 1.0" in text
    assert "afsd_fanotify_worker_restarts_total 1.0" in text
    assert "afsd_fanotify_events_redispatched_total" in text
    assert 'afsd_fanotify_event_seconds_bucket{le="+Inf",outcome="filled"}' in text


async def test_hung_provider_fails_the_read_with_eio_and_others_are_served(fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    deadline = 3.0
    with socket.socket() as listener:       # accepts connections (kernel backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        host, port = listener.getsockname()
        await lab.start(Settings(workers=1, fetch_deadline=deadline))
        hung = await lab.serve(fanotify_sources.config("hanging", host=host, port=port), label="hung")
        healthy = await lab.serve(label="healthy")
        victim = data_files(blob)[0]
        started = time.monotonic()
        blocked = lab.start_reader(hung.mount / victim)
        await lab.wait_status(lambda s: s.details["pending_events"] >= 1)
        for name in data_files(blob)[:6]:       # meanwhile, another blob is served as usual
            result = await lab.read(healthy.mount / name)
            assert result.ok and result.sha256 == blob.files[name]
        assert blocked.poll() is None, "the hung read finished before the healthy reads"
        result = await lab.finish(blocked)
        waited = time.monotonic() - started
    assert not result.ok and result.errno == errno.EIO
    print(f"hung provider: the read failed with EIO after {waited:.2f} s (fetch deadline {deadline} s)")
    # bounded by the deadline (plus the healthy reads above and scheduling on a loaded machine)
    assert deadline <= waited < deadline + 5.0, waited
    # Nothing is left hanging in the worker: fills nobody waits for (fill-ahead) get the deadline too.
    status = await lab.wait_status(lambda s: all(b.details["inflight_tasks"] == 0 for b in s.blobs))
    assert status.counters["events_denied_timeout"] >= 1 and status.counters["tasks_cancelled"] >= 1
    assert status.counters["worker_restarts"] == 0      # a hung fetch is not a hung worker


async def test_failing_source_fails_the_read_with_eio_not_zeros(fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    await lab.start(Settings(workers=1))
    served = await lab.serve(fanotify_sources.config("failing"))
    result = await lab.read(served.mount / data_files(blob)[0])
    assert not result.ok and result.errno == errno.EIO
    assert (await lab.status()).counters["events_denied_failed"] >= 1
    result = await lab.read(served.mount / "etc/hostname")   # a one-block file: its data is not metadata
    assert not result.ok and result.errno == errno.EIO
