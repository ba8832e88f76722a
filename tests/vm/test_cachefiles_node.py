"""`afsd node` + `afsd mount` with the fscache backend, inside the lab VM, as a user runs them: a
multi-layer image mounted through erofs in fscache mode is the tree umoci unpacks from the same
registry, and where fanotify is unavailable (this 6.12 kernel) `--backend auto` picks fscache. A node
that read a whole image through fscache hands its layers to its own layerstore (through the copy the
worker keeps at the node daemon's blob path) and so becomes their provider; a layer whose cache was
already whole before the copy was asked for still gets a whole copy (fetched from its source)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

from afsd.api import layerstore_pb2 as lpb
from afsd.cluster.peers import blob_spec_from_stat
from afsd.lab.catalogue import seeded_bytes
from afsd.lab.daemons import Daemon
from afsd.lab.deadlines import scaled
from afsd.ondemand.base import BlobSource
from afsd.ondemand.cachefiles import FscacheClient, fscache_mounts
from afsd.ondemand.cachefiles.backend import FscacheBackend
from afsd.ondemand.cachefiles.device import device_holders
from afsd.ondemand.sources import LocalFileSource
from afsd.ondemand.spec import BlobSpec
from tests.support.cluster import LocalCluster, small_image, unmount_everything_under
from tests.support.metrics import daemon_metrics, metric
from tests.support.treecompare import compare_trees, format_differences, snapshot
from tests.support.umoci import umoci_rootfs
from tests.vm.test_cachefiles_helpers import MIB, FscacheLab, build_blob, renamed, tree_digests


async def test_afsd_mount_with_the_fscache_backend_is_the_tree_umoci_unpacks(cluster: LocalCluster) -> None:
    await cluster.start_discovery(1)
    (layerstore,) = await cluster.start_layerstores(1)
    node = await cluster.start_node(layerstore)
    supervisor = FscacheClient(Path(node.args[node.args.index("--state-dir") + 1]) / "fscache")
    image = await cluster.push_features(3 << 20)
    other = await cluster.push("small", small_image("small", 2 << 20))
    target, auto_target = cluster.workdir / "rootfs", cluster.workdir / "auto"
    target.mkdir()
    auto_target.mkdir()
    try:
        mounted = await cluster.afsd(node, "mount", image.reference, str(target), "--backend", "fscache")
        assert mounted.returncode == 0, mounted.stderr
        assert "with backend fscache" in mounted.stdout
        layers = len(image.manifests[0].layers)
        assert layers >= 3 and len(fscache_mounts()) == layers   # each layer is an erofs mount in fscache mode

        reference = await asyncio.to_thread(umoci_rootfs, image, image.platforms[0], cluster.workdir / "umoci")
        differences = compare_trees(await asyncio.to_thread(snapshot, target),
                                    await asyncio.to_thread(snapshot, reference), labels=("afsd mount", "umoci"))
        assert differences == [], format_differences(differences, ("afsd mount", "umoci"))

        chosen = await cluster.afsd(node, "mount", other.reference, str(auto_target))   # --backend auto
        assert chosen.returncode == 0, chosen.stderr
        assert "with backend fscache" in chosen.stdout

        listed = json.loads((await cluster.afsd(node, "mounts", "--json")).stdout)
        assert sorted(m["backend"] for m in listed["mounts"]) == ["fscache", "fscache"]
        assert "fanotify" in listed["backends"] and listed["backends"]["fscache"] == "available"
        assert float(listed["counters"]["fscache.requests_open"]) >= layers + 2
        assert float(listed["counters"]["fscache.requests_read"]) > 0
        # The layers' bytes live in the cachefiles cache: `afsd mounts` counts them there.
        for mount in listed["mounts"]:
            assert 0 < int(mount["bytes_cached"]) <= int(mount["bytes_total"]), mount

        for mountpoint in (auto_target, target):
            unmounted = await cluster.afsd(node, "umount", str(mountpoint))
            assert unmounted.returncode == 0, unmounted.stderr
        assert fscache_mounts() == {}
        await stays_stopped(supervisor)
    finally:
        # The supervisor outlives the node daemon by design; the next test needs /dev/cachefiles free.
        await asyncio.to_thread(unmount_everything_under, cluster.workdir)
        await supervisor.shutdown(force=True)


async def stays_stopped(supervisor: FscacheClient) -> None:
    """Shut the supervisor down while its node daemon runs on: it stays down and /dev/cachefiles stays free
    (the daemon's completion watcher, which retries within a second, must not start it again)."""
    await supervisor.shutdown()
    deadline = time.monotonic() + scaled(5.0)
    while time.monotonic() < deadline:
        assert await asyncio.to_thread(device_holders) == [], "the node daemon started the fscache supervisor again"
        await asyncio.sleep(0.2)
    assert not supervisor.paths.supervisor_socket.exists()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(MIB):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


async def until_complete(backend: FscacheBackend, spec: BlobSpec, blob_path: Path, what: str,
                         timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not await backend.is_complete(spec, blob_path):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.2)


async def assert_serves_blobs(cluster: LocalCluster, layerstore: Daemon, blob_digests: dict[str, str]) -> None:
    """`layerstore` serves each layer (ReadLayer) as its blob, byte for byte."""
    for layer_digest, blob_digest in blob_digests.items():
        served = await cluster.read_all(layerstore, layer_digest)
        assert "sha256:" + hashlib.sha256(served).hexdigest() == blob_digest, f"{layerstore.name} {layer_digest}"


async def test_a_node_that_read_an_image_through_fscache_becomes_a_provider_of_its_layers(
        cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1)
    store_a, store_b, store_c = await cluster.start_layerstores(3)
    image = await cluster.push("spread", small_image("spread", 3 << 20))
    layers = (await cluster.pull(store_a, image)).layers
    blob_digests = {layer.digest: blob_spec_from_stat(await cluster.layerstore(store_a).StatLayer(
        lpb.StatLayerRequest(digest=layer.digest))).blob_digest for layer in layers}
    node_b = await cluster.start_node(store_b)
    state_b = Path(node_b.args[node_b.args.index("--state-dir") + 1])
    supervisor = FscacheClient(state_b / "fscache")
    target_b, target_c = cluster.workdir / "on-b", cluster.workdir / "on-c"
    target_b.mkdir()
    target_c.mkdir()
    try:
        mounted = await cluster.afsd(node_b, "mount", image.reference, str(target_b), "--backend", "fscache")
        assert mounted.returncode == 0, mounted.stderr
        assert len(fscache_mounts()) == len(layers)
        read_on_b = await asyncio.to_thread(tree_digests, target_b)   # reads every file
        expected = {f"data/spread-{i}.bin": hashlib.sha256(seeded_bytes(f"spread{i}", (3 << 20) // 2)).hexdigest()
                    for i in range(2)}
        assert {path: read_on_b[path] for path in expected} == expected

        async def b_provides_everything() -> bool:
            return all(["node1" in await cluster.nodes_for_layer(discovery, layer.digest) for layer in layers])
        await cluster.wait_until(b_provides_everything, 120, "node b to advertise the layers it read through fscache")
        # The copies were written as the bytes came in: b fetched each layer once, not again for its copy.
        blobs = (await supervisor.status()).blobs
        fetched = sum(sum(blob.details["fetcher"].get("bytes", {}).values()) for blob in blobs)
        assert len(blobs) == len(layers) and fetched < 1.5 * sum(blob.size for blob in blobs), blobs

        await assert_serves_blobs(cluster, store_b, blob_digests)
        # The node's own /metrics carries the fscache supervisor's counters (refreshed every few seconds).
        async def node_metrics_count_reads() -> bool:
            text = await asyncio.to_thread(daemon_metrics, node_b)
            return metric(text, "afsd_fscache_requests_total", opcode="read") > 0
        await cluster.wait_until(node_metrics_count_reads, 30, "node b's /metrics to count fscache READs")

        store_a.stop()
        registry_gets = len(cluster.registry.access_log())
        node_c = await cluster.start_node(store_c, extra_args=["--backend", "eager"])
        mounted = await cluster.afsd(node_c, "mount", image.reference, str(target_c), "--backend", "eager")
        assert mounted.returncode == 0, mounted.stderr
        assert await asyncio.to_thread(tree_digests, target_c) == read_on_b
        blob_gets = [e for e in cluster.registry.access_log()[registry_gets:] if "/blobs/" in e.uri]
        assert blob_gets == [], "node c's bytes came from node b, not from the registry"

        # Unmounting on b removes the copies (the blob is no longer stored twice); b's layerstore keeps its own.
        assert (await cluster.afsd(node_b, "umount", str(target_b))).returncode == 0
        assert sorted((state_b / "blobs").glob("*.erofs")) == []
        await assert_serves_blobs(cluster, store_b, blob_digests)
    finally:
        # The supervisor outlives the node daemon by design; the next test needs /dev/cachefiles free.
        await asyncio.to_thread(unmount_everything_under, cluster.workdir)
        await supervisor.shutdown(force=True)


async def test_a_layer_cached_before_its_copy_was_wanted_still_gets_a_whole_copy(disk_tmp_path: Path) -> None:
    built = await asyncio.to_thread(build_blob, disk_tmp_path / "blob", {
        "data/big.bin": seeded_bytes("copy-big", 5 * MIB + 333), "etc/hostname": b"copy\n"})
    spec = renamed(built.spec, "late-copy")
    source = BlobSource(LocalFileSource(spec, built.path), built.source())
    copy_path = disk_tmp_path / "blobs" / f"{spec.name}.erofs"
    copy_path.parent.mkdir()
    lab = await FscacheLab.start(disk_tmp_path)
    try:
        # First the layer is cached whole (prefetch) by a backend that keeps no copy: nothing is teed.
        without_copy = FscacheBackend(lab.client.paths.root, copy_blobs=False)
        await without_copy.attach(spec, copy_path, source)
        target = await lab.mount(spec.name)
        await until_complete(without_copy, spec, copy_path, "prefetch to complete the cache file")
        assert not copy_path.exists()
        await lab.unmount(target)
        await without_copy.detach(spec, copy_path)

        # Then a backend that wants a copy mounts it: the cache is whole (no READ at all), so the worker
        # fetches the copy's bytes from the source.
        with_copy = FscacheBackend(lab.client.paths.root, copy_blobs=True)
        reads_before = (await lab.counters())["requests_read"]
        await with_copy.attach(spec, copy_path, source)
        target = await lab.mount(spec.name)
        await until_complete(with_copy, spec, copy_path, "the copy of a whole cache file to become whole")
        assert await asyncio.to_thread(file_sha256, copy_path) == spec.blob_digest
        assert copy_path.stat().st_size == spec.size
        assert await asyncio.to_thread(tree_digests, target) == built.files
        assert (await lab.counters())["requests_read"] == reads_before
        await lab.unmount(target)
        await with_copy.detach(spec, copy_path)
        assert not copy_path.exists()
    finally:
        await lab.close()
