"""Registering blobs with the fanotify supervisor: the backend interface, and every refusal that
protects readers from silently reading holes (each one a clear error naming the blob)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from afsd.erofs.mount import mount_erofs, unmount
from afsd.ondemand.base import BlobSource
from afsd.ondemand.fanotify.backend import FanotifyBackend
from afsd.ondemand.fanotify.blobfile import BlobFileError, prepare_blob
from afsd.ondemand.fanotify.client import FanotifyBackendError
from afsd.ondemand.fanotify.settings import Settings
from afsd.ondemand.sources import LocalFileSource
from tests.support.fanotify_lab import FanotifyLab, data_files


def file_source(lab: FanotifyLab) -> dict:
    return {"kind": "file", "path": str(lab.blob.full)}


async def test_backend_attach_mount_detach(fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    assert FanotifyBackend.unavailable_reason() is None
    backend = FanotifyBackend(lab.state, Settings(workers=1))
    lab.client = backend.client               # the lab cleans up what the backend started
    await backend.start()
    path, target = lab.root / "blob.erofs", lab.root / "mnt"
    target.mkdir()
    await backend.attach(blob.spec, path, BlobSource(LocalFileSource(blob.spec, blob.full), file_source(lab)))
    await backend.mount(blob.spec, path, target)
    try:
        name = data_files(blob)[3]
        result = await lab.read(target / name)
        assert result.ok and result.sha256 == blob.files[name]
        assert not await backend.is_complete(blob.spec, path)
        await backend.refresh()
        assert backend.counters()["events_allowed_filled"] > 0
    finally:
        await asyncio.to_thread(unmount, target)
    await backend.detach(blob.spec, path)
    assert (await backend.client.status()).blobs == []


async def test_refuses_blobs_on_tmpfs(fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    await lab.start(Settings(workers=1))
    tmpfs = lab.root / "tmpfs"
    tmpfs.mkdir()
    await asyncio.to_thread(subprocess.run, ["mount", "-t", "tmpfs", "tmpfs", str(tmpfs)], check=True)
    try:
        with pytest.raises(BlobFileError, match=r"tmpfs is on tmpfs.*ext4, xfs or btrfs"):
            await prepare_blob(blob.spec, tmpfs / "blob.erofs", LocalFileSource(blob.spec, blob.full))
        assert list(tmpfs.iterdir()) == []
        shutil.copyfile(blob.full, tmpfs / "copy.erofs")
        with pytest.raises(FanotifyBackendError, match=r"copy.erofs is on tmpfs"):
            await lab.client.register(blob.spec, tmpfs / "copy.erofs", file_source(lab))
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", str(tmpfs)], check=True)


async def test_refuses_a_blob_whose_metadata_is_missing(fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    await lab.start(Settings(workers=1))
    path = lab.root / "holes.erofs"
    path.touch()
    os.truncate(path, blob.spec.size)   # all holes, metadata included
    with pytest.raises(FanotifyBackendError, match=r"holes.erofs has a hole at byte 0 in its metadata"):
        await lab.client.register(blob.spec, path, file_source(lab))
    with pytest.raises(FanotifyBackendError, match=r"is \d+ bytes, its spec says"):
        os.truncate(path, blob.spec.size - 4096)
        await lab.client.register(blob.spec, path, file_source(lab))


async def test_refuses_a_blob_mounted_before_it_was_marked(fanotify_lab: FanotifyLab) -> None:
    lab = fanotify_lab
    await lab.start(Settings(workers=1))
    served = await lab.serve(mount=False)
    await lab.client.unregister(served.spec.name)
    await asyncio.to_thread(mount_erofs, served.path, served.mount)   # mounted without a mark
    with pytest.raises(FanotifyBackendError, match=r"already mounted at .*mnt-main without a fanotify mark"):
        await lab.client.register(served.spec, served.path, file_source(lab))


async def test_unregister_while_mounted_is_refused_and_forced_unregister_fails_reads(fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    await lab.start(Settings(workers=1))
    served = await lab.serve()
    names = data_files(blob)
    with pytest.raises(FanotifyBackendError, match=r"still mounted at .*mnt-main and not complete"):
        await lab.client.unregister(served.spec.name)
    await lab.client.unregister(served.spec.name, force=True)
    result = await lab.read(served.mount / names[0])      # unfilled and no longer served: EIO, not zeros
    assert not result.ok and result.errno == errno.EIO

    await asyncio.to_thread(unmount, served.mount)         # register again, mount again: served again
    await lab.client.register(served.spec, served.path, file_source(lab))
    await asyncio.to_thread(mount_erofs, served.path, served.mount)
    result = await lab.read(served.mount / names[0])
    assert result.ok and result.sha256 == blob.files[names[0]]


async def test_a_complete_blob_registers_as_complete_and_is_not_marked(fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    await lab.start(Settings(workers=1))
    path = lab.root / "complete.erofs"
    shutil.copyfile(blob.full, path)
    state = await lab.client.register(blob.spec, path, file_source(lab))
    assert state.complete and state.present_bytes == blob.spec.size
    await lab.client.unregister(blob.spec.name)


_NODE_DAEMON = r"""
import asyncio, json, sys
from pathlib import Path
from afsd.ondemand.fanotify import Settings, SupervisorClient, prepare_blob
from afsd.ondemand.sources import LocalFileSource
from afsd.ondemand.spec import BlobSpec

async def main():
    spec = BlobSpec.from_json(json.loads(sys.argv[1]))
    state, blob, full = map(Path, sys.argv[2:5])
    client = SupervisorClient(state, Settings(workers=1))
    await prepare_blob(spec, blob, LocalFileSource(spec, full))
    await client.register(spec, blob, {"kind": "file", "path": str(full)})
    print((await client.status()).pid, flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_supervisor_outlives_the_node_daemon_and_a_new_one_reattaches(fanotify_lab: FanotifyLab) -> None:
    lab, blob = fanotify_lab, fanotify_lab.blob
    path = lab.root / "blob.erofs"
    node_daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _NODE_DAEMON, json.dumps(blob.spec.to_json()), str(lab.state), str(path),
        str(blob.full), stdout=asyncio.subprocess.PIPE)
    assert node_daemon.stdout is not None
    supervisor_pid = int(await asyncio.wait_for(node_daemon.stdout.readline(), 60))
    node_daemon.kill()
    await node_daemon.wait()

    client = await lab.start(Settings(workers=1))          # "the restarted node daemon"
    status = await client.status()
    assert status.pid == supervisor_pid and [b.name for b in status.blobs] == [blob.spec.name]
    target = lab.root / "mnt"
    target.mkdir()
    await asyncio.to_thread(mount_erofs, path, target)
    try:
        name = data_files(blob)[0]
        result = await lab.read(target / name)
        assert result.ok and result.sha256 == blob.files[name]
    finally:
        await asyncio.to_thread(unmount, target)
    await client.unregister(blob.spec.name)
