"""Binding /dev/cachefiles the way a user gets it wrong: a cache directory on tmpfs, or the device held
by another process (cachefilesd, a second daemon). Each gives one clear line saying what to do, and
leaves nothing running. (A kernel without on-demand mode is the host's case: tests/test_cachefiles_host.py.)
Runs inside the VM (tests/vm/conftest.py)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from afsd.ondemand.base import BackendUnavailableError, BlobSource
from afsd.ondemand.cachefiles import FscacheBackendError, FscacheClient
from afsd.ondemand.cachefiles.backend import FscacheBackend
from afsd.ondemand.sources import LocalFileSource
from afsd.ondemand.supervised.status import WorkerState
from tests.vm.test_cachefiles_helpers import spec_for_file

HOLD_DEVICE = "import os, time; fd = os.open('/dev/cachefiles', os.O_RDWR); print('holding', flush=True); time.sleep(600)"


def one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    print(message)
    assert "\n" not in message
    return message


def assert_nothing_left(client: FscacheClient) -> None:
    with open(client.paths.supervisor_lock, "rb") as lock:   # no supervisor lives on
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not client.paths.supervisor_socket.exists()


@pytest.fixture
def tmpfs_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "on-tmpfs"
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


async def test_a_cache_directory_on_tmpfs_is_refused_with_one_clear_line(tmp_path: Path, tmpfs_dir: Path) -> None:
    client = FscacheClient(tmp_path / "state", cache_dir=tmpfs_dir / "cache")

    with pytest.raises(FscacheBackendError) as refused:
        await client.ensure_running()

    message = one_line(refused)
    assert message.startswith(f"cachefiles cannot keep its cache in {tmpfs_dir / 'cache'}: it is on tmpfs")
    assert "use a directory on ext4, xfs, btrfs" in message
    assert_nothing_left(client)
    os.close(os.open("/dev/cachefiles", os.O_RDWR))   # and the device is free again


async def test_attaching_through_the_backend_reports_the_same_line(tmp_path: Path, tmpfs_dir: Path) -> None:
    image = tmp_path / "tiny.erofs"
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "file").write_text("x")
    await asyncio.to_thread(subprocess.run, ["mkfs.erofs", "--quiet", str(image), str(tmp_path / "tree")], check=True)
    spec = spec_for_file(image, "tiny")
    backend = FscacheBackend(tmp_path / "state", cache_dir=tmpfs_dir / "cache")
    await backend.start()   # logs the problem, the node daemon keeps running

    with pytest.raises(BackendUnavailableError) as refused:
        await backend.attach(spec, tmp_path / "unused", BlobSource(LocalFileSource(spec, image), {}))

    assert one_line(refused).startswith(f"backend fscache cannot serve layer {spec.layer_digest}: cachefiles "
                                        f"cannot keep its cache in {tmpfs_dir / 'cache'}: it is on tmpfs")
    assert_nothing_left(backend.client)


async def test_a_device_held_by_another_process_is_refused_naming_it(tmp_path: Path) -> None:
    holder = await asyncio.create_subprocess_exec(sys.executable, "-c", HOLD_DEVICE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and (await holder.stdout.readline()).strip() == b"holding"
        client = FscacheClient(tmp_path / "state")

        with pytest.raises(FscacheBackendError) as refused:
            await client.ensure_running()

        message = one_line(refused)
        assert message.startswith(f"/dev/cachefiles is busy: pid {holder.pid} (python")
        assert "one cachefiles daemon per machine: stop that process" in message
        assert "systemctl stop cachefilesd" in message
        assert_nothing_left(client)
    finally:
        holder.kill()
        await holder.wait()


async def test_a_second_supervisor_is_refused_while_the_first_serves(tmp_path: Path) -> None:
    first = FscacheClient(tmp_path / "first")
    await first.ensure_running()
    try:
        supervisor_pid = (await first.status()).pid
        second = FscacheClient(tmp_path / "second")

        with pytest.raises(FscacheBackendError) as refused:
            await second.ensure_running()

        message = one_line(refused)
        assert message.startswith("/dev/cachefiles is busy: ") and f"pid {supervisor_pid} (python" in message
        assert [w.state for w in (await first.status()).workers] in (   # the first one is unharmed
            [WorkerState.STARTING], [WorkerState.READY])
    finally:
        await first.shutdown()
