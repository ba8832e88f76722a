"""`/healthz` and `/readyz` on every daemon's metrics listener (afsd/health.py): what Kubernetes probes."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

from afsd.health import Health
from afsd.lab.daemons import discovery_daemon, metrics_address


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_a_daemon_is_live_and_ready_while_it_serves_and_not_ready_while_it_drains(tmp_path) -> None:
    discovery = discovery_daemon(tmp_path, "disc").start()
    try:
        base = f"http://{metrics_address(discovery)}"
        assert get(f"{base}/healthz") == (200, "ok: serving\n")
        assert get(f"{base}/readyz") == (200, "ok: serving\n")
        assert get(f"{base}/metrics")[0] == 200
    finally:
        assert discovery.stop() == 0


def test_liveness_fails_while_the_event_loop_is_wedged_and_readiness_follows_the_state() -> None:
    health = Health()
    assert health.live() == (True, "starting") and health.ready() == (False, "starting")
    loop = asyncio.new_event_loop()
    started, release = threading.Event(), threading.Event()

    async def serve() -> None:
        health.serving()
        started.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        time.sleep(3)  # a blocking call on the loop: nothing else runs meanwhile

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    try:
        started.wait(10)
        assert health.live() == (True, "serving") and health.ready() == (True, "serving")
        release.set()
        time.sleep(0.2)
        alive, why = health.live()
        assert not alive and "did not answer" in why
    finally:
        release.set()
        thread.join()
        loop.close()
    health.draining()
    assert health.ready() == (False, "draining")
    health.stopped()
    assert health.live() == (False, "stopped")
