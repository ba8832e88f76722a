"""A supervisor that was shut down stays down until a blob is registered again (afsd/ondemand/supervised/
client.py): a status query (the node daemon's poll, `afsd mounts`, a completeness check) or a detach finds
it stopped and starts nothing, while a Register still starts it. Real fanotify supervisor, keeper and
workers; the backend is the node daemon's own (FanotifyBackend)."""

from __future__ import annotations

import asyncio

import pytest

from afsd.ondemand.fanotify.backend import FanotifyBackend
from afsd.ondemand.fanotify.client import FanotifyBackendError
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

