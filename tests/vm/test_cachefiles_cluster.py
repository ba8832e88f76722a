"""The fscache backend serving layer blobs from real layerstores over gRPC, inside the lab VM: a layer
mounted with `mount -t erofs none -o fsid=...` reads back exactly (READs counted and reported), a peer
returning corrupted bytes is caught by the chunk check and the range fetched elsewhere, and losing the
provider being read from fails over to the other, while losing every provider gives the reader EIO
promptly and leaves the daemon serving other blobs.

One cluster (docker-registry, discovery, two layerstores, each its own process) and one fscache
supervisor serve the module; each test pushes its own image so what it breaks is its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from afsd.api import layerstore_pb2 as lpb
from afsd.cluster.discovery_client import DiscoveryClient
from afsd.cluster.peers import blob_spec_from_stat
from afsd.lab.catalogue import seeded_bytes
from afsd.lab.daemons import Daemon, start_all
from afsd.lab.layers import Entry, LayerSpec
from afsd.lab.registry import start_registry
from afsd.node.backends import source_factory
from afsd.ondemand.cachefiles.backend import FscacheBackend
from afsd.ondemand.cachefiles.settings import Settings
from afsd.ondemand.spec import BlobSpec
from afsd.rpc import ChannelPool
from tests.support.cluster import LocalCluster
from tests.support.corruption import flip_byte
from tests.vm.test_cachefiles_helpers import MIB, FscacheLab, Reader, build_blob, read_file, tree_digests

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Shared:
    cluster: LocalCluster
    nodes: list[Daemon]
    lab: FscacheLab
    channels: ChannelPool
    discovery: DiscoveryClient

    def source_config(self, *, local: Daemon | None = None) -> dict[str, object]:
        """What the node daemon registers: read through discovery, `local` first."""
        return {"kind": "cluster", "discovery": [d.address for d in self.cluster.discoveries],
                "local_endpoint": local.address if local else "", "node_id": "vm-test"}


@dataclass(frozen=True)
class HeldLayer:
    spec: BlobSpec
    files: dict[str, str]          # path -> sha256, from the image's own entries
    blob_paths: dict[str, Path]    # layerstore name -> its copy of the blob


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Shared]:
    workdir = tmp_path_factory.mktemp("cluster")
    registry = await asyncio.to_thread(start_registry, workdir / "registry")
    cluster = LocalCluster(workdir, registry)
    channels = ChannelPool()
    lab = None
    try:
        (discovery,) = await cluster.start_discovery(1)
        nodes = await cluster.start_layerstores(2)
        await cluster.wait_registered(2)
        # These tests stop providers at chosen points of a read and then read what was never fetched: each READ
        # fetches only its own unit (read-ahead would have fetched past those points; readahead.py).
        lab = await FscacheLab.start(workdir / "fscache", Settings(stream_window=0))
        yield Shared(cluster, nodes, lab, channels, DiscoveryClient([discovery.address], channels))
    finally:
        if lab is not None:
            await lab.close()
        await channels.close()
        await cluster.close()
        await asyncio.to_thread(cluster.stop)


def layer_files(seed: str) -> dict[str, bytes]:
    return {"usr/lib/big.so": seeded_bytes(f"{seed}-big", 10 * MIB),
            "usr/share/medium.dat": seeded_bytes(f"{seed}-medium", 4 * MIB + 4321),
            "etc/motd": f"served by afsd ({seed})\n".encode(),
            "etc/empty": b""}


async def hold(shared: Shared, name: str, nodes: list[Daemon]) -> HeldLayer:
    """Push a one-layer image and place its layer on exactly `nodes` (as test_fetcher does)."""
    cluster = shared.cluster
    files = layer_files(name)
    entries = tuple(Entry(path, data=data) for path, data in files.items()) + (Entry("lib", kind="symlink",
                                                                                     linkname="usr/lib"),)
    image = await cluster.push(name, (LayerSpec(entries),))
    (manifest,) = image.manifests
    request = lpb.EnsureLayersRequest(image=image.reference, delegated=True, layers=[
        lpb.Layer(digest=layer.digest, media_type=layer.media_type, compressed_size=layer.size, diff_id=layer.diff_id)
        for layer in manifest.layers])
    blob_paths = {}
    for node in nodes:
        (placed,) = (await cluster.layerstore(node).EnsureLayers(request)).layers
        blob_paths[node.name] = Path(placed.cache_path)
    stat = await cluster.layerstore(nodes[0]).StatLayer(lpb.StatLayerRequest(digest=placed.digest))

    async def listed() -> bool:
        return await cluster.nodes_for_layer(cluster.discoveries[0], placed.digest) == {n.name for n in nodes}
    await cluster.wait_until(listed, 30, f"discovery to list {[n.name for n in nodes]} for {placed.digest}")
    return HeldLayer(blob_spec_from_stat(stat), {p: hashlib.sha256(d).hexdigest() for p, d in files.items()},
                     blob_paths)


def node_at(shared: Shared, endpoint: str) -> Daemon:
    return next(node for node in shared.nodes if node.address == endpoint)


async def test_a_layer_from_the_layerstores_mounts_with_fsid_and_every_file_matches(shared: Shared) -> None:
    layer = await hold(shared, "plain", shared.nodes[:1])
    # The node daemon's way in: the Backend interface, with the source the node daemon would give it.
    backend = FscacheBackend(shared.lab.client.paths.root, prefetch=False)
    await backend.start()
    make_source = source_factory(shared.discovery, shared.channels, discovery_endpoints=[
        d.address for d in shared.cluster.discoveries], local_endpoint=None, node_id="vm-test")
    await backend.refresh()
    before = backend.counters()
    source = make_source(layer.spec)
    try:
        await backend.attach(layer.spec, Path("/nonexistent/unused"), source)
    finally:
        await source.source.close()
    target = shared.lab.root / "plain"
    target.mkdir()
    await backend.mount(layer.spec, Path("/nonexistent/unused"), target)
    try:
        assert not await backend.is_complete(layer.spec, Path("/nonexistent/unused"))   # only the superblock yet
        # `afsd mounts` counts the blob's bytes in the cache file, not at blob_path (never written here).
        cached = await backend.present_bytes(layer.spec, Path("/nonexistent/unused"))
        assert 0 < cached < layer.spec.size
        assert await asyncio.to_thread(tree_digests, target) == layer.files
        assert (target / "lib").readlink() == Path("usr/lib")
        await backend.refresh()
        counted = backend.counters()
        assert counted["requests_open"] == before.get("requests_open", 0) + 1
        assert counted["requests_read"] > before.get("requests_read", 0)
        assert counted["bytes_demand"] - before.get("bytes_demand", 0) >= 14 * MIB   # all file data came by READ
        assert counted["reads_failed"] == before.get("reads_failed", 0)
        blob = await shared.lab.blob(layer.spec.name)
        assert blob.details["fetcher"]["provider"] == shared.nodes[0].address
        assert blob.details["fetcher"]["bytes"]["peer"] >= 14 * MIB
        # Every file read, in 1 MiB units: that touched every unit of the blob, so the cache file is whole.
        assert await backend.is_complete(layer.spec, Path("/nonexistent/unused"))
        assert await backend.present_bytes(layer.spec, Path("/nonexistent/unused")) == layer.spec.size
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", str(target)], check=True, timeout=120)
    await backend.detach(layer.spec, Path("/nonexistent/unused"))
    assert await shared.lab.client.blob_status(layer.spec.name) is None


async def test_a_peer_returning_corrupted_bytes_is_caught_and_the_range_read_elsewhere(shared: Shared) -> None:
    node0, node1 = shared.nodes
    layer = await hold(shared, "corrupted", [node0, node1])
    before = await shared.lab.counters()
    big_start, big_length = max(layer.spec.data_map, key=lambda extent: extent[1])
    await asyncio.to_thread(flip_byte, layer.blob_paths[node0.name], big_start + big_length // 2)
    await shared.lab.serve(layer.spec, shared.source_config(local=node0))   # node0 is asked first
    target = await shared.lab.mount(layer.spec.name)

    assert await asyncio.to_thread(tree_digests, target) == layer.files

    fetcher = (await shared.lab.blob(layer.spec.name)).details["fetcher"]
    assert fetcher["verification_failures"] == 1
    assert fetcher["provider"] == node1.address
    (bad,) = [p for p in fetcher["providers"] if p["endpoint"] == node0.address]
    assert "does not match the blob's chunk digest" in bad["last_error"]
    assert (await shared.lab.counters())["reads_failed"] == before["reads_failed"]
    await shared.lab.unmount(target)


async def test_losing_the_serving_provider_fails_over_and_losing_all_gives_eio_promptly(
        shared: Shared, tmp_path: Path) -> None:
    layer = await hold(shared, "provider-loss", shared.nodes)
    await shared.lab.serve(layer.spec, shared.source_config())
    target = await shared.lab.mount(layer.spec.name)
    killed: list[Daemon] = []
    reader = Reader(target / "usr" / "lib" / "big.so", pause_at=4 * MIB)
    try:
        await reader.paused()
        serving = node_at(shared, (await shared.lab.blob(layer.spec.name)).details["fetcher"]["provider"])
        await asyncio.to_thread(serving.kill)
        killed.append(serving)
        reader.resume()
        outcome = await reader.outcome()
        assert outcome.ok and outcome.sha256 == layer.files["usr/lib/big.so"], outcome
        fetcher = (await shared.lab.blob(layer.spec.name)).details["fetcher"]
        (survivor,) = [node for node in shared.nodes if node is not serving]
        assert fetcher["provider"] == survivor.address and fetcher["failovers"] >= 1

        # No provider left: a read of what was never fetched fails with EIO, and does not hang.
        await asyncio.to_thread(survivor.kill)
        killed.append(survivor)
        before = await shared.lab.counters()
        started = time.monotonic()
        outcome = await read_file(target / "usr" / "share" / "medium.dat", timeout=120)
        waited = time.monotonic() - started
        assert not outcome.ok and outcome.errno == 5, outcome
        print(f"no provider left: EIO after {waited:.2f} s")
        assert waited < 30, waited      # refused connections fail fast: seconds, even under TCG
        assert (await shared.lab.counters())["reads_failed"] > before["reads_failed"]

        # ... and the daemon goes on serving other blobs.
        local = await asyncio.to_thread(build_blob, tmp_path / "local", {"etc/os-release": b"ID=afsd\n",
                                                                         "bin/tool": seeded_bytes("tool", 2 * MIB)})
        await shared.lab.serve(local.spec, local.source())
        other = await shared.lab.mount(local.spec.name)
        assert await asyncio.to_thread(tree_digests, other) == local.files
        await shared.lab.unmount(other)
    finally:
        reader.kill()
        await shared.lab.unmount(target)
        await asyncio.to_thread(start_all, killed)   # for whatever runs next
