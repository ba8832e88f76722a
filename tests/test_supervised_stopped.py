"""A supervisor that was shut down stays down until a blob is registered again (afsd/ondemand/supervised/
client.py): a status query (the node daemon's poll, `afsd mounts`, a completeness check) or a detach finds
it stopped and starts nothing, while a Register still starts it. Real fanotify supervisor, keeper and
workers; the backend is the node daemon's own (FanotifyBackend), and then a real node daemon."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from afsd.lab.daemons import (
    Daemon,
    afsd_command,
    discovery_daemon,
    metrics_address,
    node_daemon,
    start_all,
    stop_daemon,
)
from afsd.node.daemon import BACKEND_STATUS_PERIOD
from afsd.ondemand.fanotify.backend import FanotifyBackend
from afsd.ondemand.fanotify.client import FanotifyBackendError, SupervisorClient
from afsd.ondemand.fanotify.settings import Settings
from tests.support.fanotify_lab import FanotifyLab


async def test_a_shut_down_supervisor_answers_stopped_and_nothing_starts_it_but_a_register(
        fanotify_lab: FanotifyLab) -> None:
    lab = fanotify_lab
    client = await lab.start(Settings(workers=1))
    served = await lab.serve(mount=False)
    backend = FanotifyBackend(lab.state, client.settings)   # what a node daemon on this state directory has
    assert (await backend.refresh()) is not None
    await client.shutdown(force=True)

    with pytest.raises(FanotifyBackendError, match=f"the fanotify supervisor for {lab.state} is stopped$"):
        await client.status()
    assert not await client._answers(), "a status query started a supervisor"
    assert await client.status_if_running() is None
    assert await backend.refresh() is None and backend.counters() == {}   # no stale counters either
    assert await client.blob_status(served.spec.name) is None
    await client.unregister(served.spec.name, missing_ok=True)            # a detach: nothing to undo
    with pytest.raises(FanotifyBackendError, match="is stopped$"):
        await client.unregister(served.spec.name)
    await asyncio.sleep(1.0)
    assert not await client._answers() and client._stopped(), "a query started a supervisor"

    await lab.serve(label="again", mount=False)                           # a Register starts one
    assert (await client.status()).blob(lab.blob.renamed("again").name) is not None



def test_a_node_daemon_says_a_shut_down_backend_is_stopped_and_its_polls_leave_it_stopped(tmp_path: Path) -> None:
    """A real node daemon (its /metrics on, so it polls its backends' status every BACKEND_STATUS_PERIOD)
    whose fanotify supervisor is shut down from outside: `afsd mounts` says so, and nothing restarts it."""
    discovery = discovery_daemon(tmp_path, "discovery")
    node = node_daemon(tmp_path, "node", [discovery.address], extra_args=["--backend", "fanotify"])
    try:
        start_all([discovery, node])
        assert "backend fanotify: available" in mounts(node)
        assert metrics_address(node) is not None   # the status poller runs
        client = SupervisorClient(Path(node.args[node.args.index("--state-dir") + 1]) / "fanotify")
        asyncio.run(client.shutdown(force=True))
        assert "backend fanotify: stopped (the next mount starts it)" in mounts(node)
        time.sleep(BACKEND_STATUS_PERIOD + 1.0)   # at least one poll
        assert "backend fanotify: stopped" in mounts(node)
        assert client._stopped() and not asyncio.run(client._answers()), "a status poll started a supervisor"
        assert "Traceback" not in node.log()
    finally:
        stop_daemon(node)
        stop_daemon(discovery)


def mounts(node: Daemon) -> str:
    listed = afsd_command("mounts", "--socket", str(node.socket_path))
    assert listed.returncode == 0, listed.stderr
    return listed.stdout
