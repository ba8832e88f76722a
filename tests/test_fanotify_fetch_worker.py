"""A fanotify fetch worker (afsd/ondemand/fanotify/worker.py) on its own: a real worker process talking to
this test in the supervisor's place, over the real protocol (no kernel: the blob is a plain file)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from afsd.ondemand._wire import AsyncChannel, encode
from afsd.ondemand.spec import BlobSpec
from afsd.ondemand.supervised import protocol as p
from tests.support import fanotify_sources

SPEC = BlobSpec(layer_digest="sha256:" + "3" * 64, blob_digest="sha256:" + "4" * 64, size=4096, chunk_size=4096,
                chunk_digests=(b"\0" * 32,), data_map=((0, 4096),))


@dataclass
class Worker:
    process: asyncio.subprocess.Process
    channel: AsyncChannel

    async def expect(self, kind: type[p.Message], timeout: float = 30.0) -> p.Message:
        """The next message of type `kind` (heartbeats in between are skipped)."""
        while True:
            item = await asyncio.wait_for(self.channel.receive(), timeout)
            assert item is not None, "the worker closed its connection"
            message = p.parse(item[0])
            if isinstance(message, kind):
                return message
            assert isinstance(message, p.Heartbeat), message


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[Worker]:
    path = tmp_path / "supervisor.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(str(path))
    listener.listen(1)
    listener.setblocking(False)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "afsd.ondemand.fanotify.worker", "--socket", str(path), "--heartbeat", "0.2",
        "--sources", fanotify_sources.SETTINGS["sources"], "--sources-path", fanotify_sources.SETTINGS["sources_path"])
    try:
        sock, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(listener), 60)
        channel = AsyncChannel(sock)
        running = Worker(process, channel)
        hello = await running.expect(p.Hello)
        assert hello.role is p.Role.FETCH_WORKER
        yield running
    finally:
        listener.close()
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_a_worker_waits_for_what_it_started_before_it_exits(worker: Worker, tmp_path: Path) -> None:
    """Forgetting a blob closes its source in a task of its own: the worker must keep that task and wait for
    it when the supervisor goes away, not leave it to the event loop (weak references, cancelled at exit)."""
    blob_file = tmp_path / "blob"
    blob_file.write_bytes(b"\0" * SPEC.size)
    marker = tmp_path / "closed"
    fd = os.open(blob_file, os.O_RDWR)
    try:
        serve = p.ServeBlob(name=SPEC.name, path=str(blob_file), spec=SPEC,
                            source=fanotify_sources.config("slow-close", delay=0.5, marker=str(marker)))
        socket.send_fds(worker.channel.sock, [encode(serve.to_json(), 1)], [fd])   # with the blob's fill fd
    finally:
        os.close(fd)
    await worker.channel.send(p.Fill(task=1, name=SPEC.name, offset=0, length=SPEC.size).to_json())
    failed = await worker.expect(p.FillFailed)          # the source exists now (and fails, as injected)
    assert failed.task == 1
    await worker.channel.send(p.Forget(name=SPEC.name).to_json())
    await worker.channel.send(p.Fill(task=2, name="unknown", offset=0, length=1).to_json())
    worker.channel.close()                              # the supervisor is gone: the worker exits
    assert await asyncio.wait_for(worker.process.wait(), 30) == 0
    assert marker.exists(), "the worker exited without closing the source of the blob it was told to forget"
