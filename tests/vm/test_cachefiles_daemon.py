"""afsd's fscache supervisor and worker against the lab kernel, with blobs served from local files:
mounts in fscache mode read back exactly, the cache keeps what was fetched, prefetch completes blobs,
share domains share blobs, a second mount of one fsid is refused clearly, and a worker killed (or
upgraded) in the middle of a read is replaced without the reader noticing (`restore`).

One supervisor serves the whole module (tests register blobs under names of their own); it is stopped
at the end, so /dev/cachefiles is free for the next module. Runs inside the VM (tests/vm/conftest.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from afsd.lab.catalogue import seeded_bytes
from afsd.ondemand.cachefiles import FscacheMountError
from afsd.ondemand.supervised.status import WorkerState
from tests.vm.test_cachefiles_helpers import (
    MIB,
    FscacheLab,
    LocalBlob,
    Reader,
    build_blob,
    gated_source,
    read_file,
    renamed,
    spec_for_file,
    tree_digests,
    worker_of,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FscacheLab]:
    lab = await FscacheLab.start(tmp_path_factory.mktemp("fscache"))
    try:
        yield lab
    finally:
        await lab.close()


@pytest.fixture(scope="module")
def blob(tmp_path_factory: pytest.TempPathFactory) -> LocalBlob:
    """An erofs blob from afsd's converter: a 16 MiB file, a few small ones, one of 3 MiB + a ragged tail."""
    return build_blob(tmp_path_factory.mktemp("blob"), {
        "data/big.bin": seeded_bytes("fscache-big", 16 * MIB),
        "data/medium.bin": seeded_bytes("fscache-medium", 3 * MIB + 1234),
        "etc/hostname": b"fscache\n",
        "etc/empty": b"",
        "deep/a/b/c/small": b"x" * 5000,
    })


async def test_a_mounted_blob_reads_back_exactly_and_a_remount_is_served_from_the_cache(
        lab: FscacheLab, blob: LocalBlob) -> None:
    spec = renamed(blob.spec, "remount")
    await lab.serve(spec, blob.source())
    before = await lab.counters()

    target = await lab.mount(spec.name)
    assert await asyncio.to_thread(tree_digests, target) == blob.files
    await lab.unmount(target)
    first = await lab.counters()
    assert first["requests_open"] - before["requests_open"] == 1
    assert first["requests_read"] > before["requests_read"]
    assert first["bytes_demand"] - before["bytes_demand"] >= 19 * MIB   # every byte of file data came through
    assert first["reads_failed"] == before["reads_failed"]

    target = await lab.mount(spec.name)   # same cache directory: the cache file is whole
    assert await asyncio.to_thread(tree_digests, target) == blob.files
    await lab.unmount(target)
    second = await lab.counters()
    assert second["requests_open"] - first["requests_open"] == 1
    assert second["requests_read"] == first["requests_read"]
    assert (await lab.blob(spec.name)).complete


async def test_prefetch_fills_the_whole_blob_after_open(lab: FscacheLab, blob: LocalBlob) -> None:
    spec = renamed(blob.spec, "prefetch")
    await lab.serve(spec, blob.source(), prefetch=True)
    before = await lab.counters()

    target = await lab.mount(spec.name)
    assert (target / "etc" / "hostname").read_bytes() == b"fscache\n"
    await lab.wait_status(lambda s: any(b.name == spec.name and b.complete for b in s.blobs),
                          "prefetch to complete the blob")
    after_prefetch = await lab.counters()
    assert after_prefetch["bytes_prefetch"] - before["bytes_prefetch"] > 12 * MIB
    assert await asyncio.to_thread(tree_digests, target) == blob.files
    assert (await lab.counters())["requests_read"] == after_prefetch["requests_read"]   # all there already
    await lab.unmount(target)


async def test_two_mounts_in_one_share_domain_open_and_cache_their_common_blob_once(
        lab: FscacheLab, tmp_path: Path) -> None:
    # Two images whose file data lives in one extra device (mkfs.erofs --blobdev): a share domain is where
    # erofs opens such a device once for every image that names it.
    tree = tmp_path / "tree"
    (tree / "lib").mkdir(parents=True)
    (tree / "lib" / "shared.so").write_bytes(seeded_bytes("domain-shared", 3 * MIB + 77))
    (tree / "etc").mkdir()
    (tree / "etc" / "os-release").write_bytes(b"ID=afsd-test\n")
    await asyncio.to_thread(subprocess.run, [
        "mkfs.erofs", "--quiet", "-T0", "-U", "6f1e5a44-0000-4000-8000-000000000001", "--chunksize=4096",
        f"--blobdev={tmp_path / 'data.img'}", str(tmp_path / "meta.img"), str(tree)], check=True)
    meta_a, meta_b = spec_for_file(tmp_path / "meta.img", "image-a"), spec_for_file(tmp_path / "meta.img", "image-b")
    data = spec_for_file(tmp_path / "data.img", "shared-data")
    for spec, path in ((meta_a, "meta.img"), (meta_b, "meta.img"), (data, "data.img")):
        await lab.serve(spec, {"kind": "file", "path": str(tmp_path / path)})
    expected = await asyncio.to_thread(tree_digests, tree)
    before = await lab.counters()

    first = await lab.mount(meta_a.name, domain_id="afsd-test", devices=(data.name,))
    second = await lab.mount(meta_b.name, domain_id="afsd-test", devices=(data.name,))
    assert await asyncio.to_thread(tree_digests, first) == expected
    reads_after_first = (await lab.counters())["requests_read"]
    assert await asyncio.to_thread(tree_digests, second) == expected

    shared = await lab.counters()
    assert shared["requests_open"] - before["requests_open"] == 3     # image-a, image-b, and the data blob once
    assert (await lab.blob(data.name)).details["open_objects"] == 1
    # The second image read the shared blob's pages through the same cache object: only its own
    # metadata needed READs (a page or two of image-b), none of the file data.
    assert shared["requests_read"] - reads_after_first <= 4
    for target in (second, first):
        await lab.unmount(target)

    # Without a domain each image gets its own volume: the data blob is opened once per mount.
    first = await lab.mount(meta_a.name, devices=(data.name,))
    second = await lab.mount(meta_b.name, devices=(data.name,))
    assert (await lab.counters())["requests_open"] - shared["requests_open"] == 4
    for target in (second, first):
        await lab.unmount(target)


async def test_mounting_the_same_fsid_twice_is_refused_with_one_clear_line(lab: FscacheLab, blob: LocalBlob) -> None:
    for domain in ("", "afsd-twice"):
        spec = renamed(blob.spec, f"twice{domain}")
        await lab.serve(spec, blob.source())
        first = await lab.mount(spec.name, domain_id=domain)

        with pytest.raises(FscacheMountError) as refused:
            await lab.mount(spec.name, domain_id=domain)

        message = str(refused.value)
        print(message)
        assert "\n" not in message
        assert f"blob {spec.name}" in message and "already mounted in fscache mode" in message
        assert f"at {first}" in message and "unmount it first" in message
        assert (first / "etc" / "hostname").read_bytes() == b"fscache\n"   # the first mount is unharmed
        await lab.unmount(first)


async def test_an_unregistered_fsid_fails_to_mount_and_the_daemon_says_why(lab: FscacheLab) -> None:
    before = await lab.counters()

    with pytest.raises(FscacheMountError) as refused:
        await lab.mount("nobody-registered-this")

    assert "cannot mount blob nobody-registered-this" in str(refused.value)
    assert (await lab.counters())["opens_unknown"] == before["opens_unknown"] + 1
    assert "OPEN of nobody-registered-this" in lab.log() and "no such blob is registered" in lab.log()


@pytest.mark.parametrize("how", ["kill9", "upgrade"])
async def test_a_worker_lost_in_the_middle_of_a_large_read_is_replaced_and_the_read_completes(
        lab: FscacheLab, blob: LocalBlob, tmp_path: Path, how: str) -> None:
    spec = renamed(blob.spec, f"worker-{how}")
    gate = tmp_path / "gate"
    # Fetches after the first four wait for the gate: a READ is surely in flight when the worker goes. (The
    # mount's metadata takes one or two; the reader's first three READs are one unit each, the fills ahead
    # of it up to four: four fetches cannot bring the 16 MiB file in, eight can once read-ahead keeps up.)
    await lab.serve(spec, gated_source(spec.name, str(blob.path), str(gate), open_fetches=4))
    target = await lab.mount(spec.name)
    before = await lab.status()
    reader = Reader(target / "data" / "big.bin")
    try:
        status = await lab.wait_status(lambda s: s.details["reads_in_flight"] >= 1
                                       and s.counters["requests_read"] > before.counters["requests_read"] + 1,
                                       "a READ of big.bin to wait in the worker")
        victim = status.workers[0].pid
        if how == "kill9":
            os.kill(victim, signal.SIGKILL)
        else:
            await lab.client.restart_worker()
        replaced = await lab.wait_status(lambda s: (w := worker_of(s)) is not None and w.pid != victim
                                         and w.state is WorkerState.READY, "a new worker")
        gate.touch()

        outcome = await reader.outcome()
    finally:
        reader.kill()
        gate.touch()
    assert outcome.ok, outcome
    assert outcome.sha256 == blob.files["data/big.bin"]
    after = await lab.counters()
    kind = "worker_deaths" if how == "kill9" else "worker_upgrades"
    assert after[kind] == before.counters[kind] + 1
    assert after["restores"] == before.counters["restores"] + 1
    assert after["requests_open"] >= before.counters["requests_open"] + 1   # the object was opened again
    assert after["reads_failed"] == before.counters["reads_failed"]
    assert replaced.workers[0].pid != victim
    await lab.unmount(target)


async def test_reading_a_file_whose_source_vanished_gives_eio_and_the_worker_goes_on(
        lab: FscacheLab, blob: LocalBlob, tmp_path: Path) -> None:
    copy = tmp_path / "copy.erofs"
    copy.write_bytes(blob.path.read_bytes())
    spec = renamed(blob.spec, "vanished")
    await lab.serve(spec, {"kind": "file", "path": str(copy)})
    target = await lab.mount(spec.name)
    assert (target / "etc" / "hostname").read_bytes() == b"fscache\n"
    copy.unlink()
    before = await lab.counters()

    outcome = await read_file(target / "data" / "big.bin")

    assert not outcome.ok and outcome.errno == 5, outcome   # EIO, promptly: no hang
    after = await lab.counters()
    assert after["reads_failed"] > before["reads_failed"]
    other = renamed(blob.spec, "still-served")
    await lab.serve(other, blob.source())
    still = await lab.mount(other.name)
    assert hashlib.sha256((still / "data" / "medium.bin").read_bytes()).hexdigest() == blob.files["data/medium.bin"]
    for mounted in (still, target):
        await lab.unmount(mounted)
