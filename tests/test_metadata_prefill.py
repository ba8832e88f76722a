"""A fanotify mount on a node that does not hold the image prefills each layer's metadata by the layer's
signed metadata digest (docs/data-path.md, "Metadata before the mount"): real layerstores, a real node
daemon, real gRPC and byte streams. It fetches about the metadata's size instead of every chunk the
metadata lies in; a holder that serves forged metadata costs a fallback to whole verified chunks from
another holder, never a wrong byte."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from afsd.api import layerstore_pb2 as lpb
from afsd.cluster.peers import blob_spec_from_stat
from afsd.lab.catalogue import seeded_bytes
from afsd.lab.daemons import Daemon
from afsd.lab.layers import Entry, LayerSpec
from afsd.ondemand.fanotify.blobfile import METADATA_GAP, metadata_requests
from afsd.ondemand.metadata import metadata_spans
from afsd.ondemand.spec import BlobSpec
from tests.support.cluster import LocalCluster
from tests.support.hostile import ForgingLayerStore, fake_holder
from tests.support.metrics import daemon_metrics, metric

NODE_ARGS = ["--no-prefetch", "--no-learned-prefetch"]   # nothing but the prefill and the reads fetches


def scattered_layers(seed: str) -> tuple[LayerSpec, ...]:
    """Two layers whose metadata (one directory block per directory) lies between the data of big files,
    so it touches every chunk of the blob."""
    def directory(layer: int, index: int) -> list[Entry]:
        prefix = f"{seed}{layer}/d{index}"
        return [Entry(f"{prefix}/big.bin", data=seeded_bytes(f"{seed}{layer}{index}", 300 << 10)),
                *(Entry(f"{prefix}/small-{n:02d}.txt", data=f"{layer} {index} {n}\n".encode()) for n in range(40))]

    return tuple(LayerSpec(tuple(entry for index in range(8) for entry in directory(layer, index)))
                 for layer in range(2))


def expected_files(seed: str) -> dict[str, bytes]:
    return {entry.path: entry.data for layer in scattered_layers(seed) for entry in layer.entries}


async def specs_of(cluster: LocalCluster, holder: Daemon, digests: list[str]) -> list[BlobSpec]:
    stub = cluster.layerstore(holder)
    return [blob_spec_from_stat(await stub.StatLayer(lpb.StatLayerRequest(digest=d))) for d in digests]


async def mount_and_check(cluster: LocalCluster, node: Daemon, reference: str, seed: str) -> None:
    target = cluster.workdir / f"rootfs-{seed}"
    target.mkdir()
    mounted = await cluster.afsd(node, "mount", reference, str(target), "--backend", "fanotify")
    assert mounted.returncode == 0, mounted.stderr
    for path, data in expected_files(seed).items():
        assert (target / path).read_bytes() == data, path
    assert (await cluster.afsd(node, "umount", str(target))).returncode == 0


def span_bytes(spec: BlobSpec) -> int:
    return sum(length for _, length in metadata_spans(spec.metadata_ranges(), METADATA_GAP))


@pytest.mark.parametrize("own_layerstore", [False, True], ids=["no_own_layerstore", "own_layerstore_lacks_it"])
async def test_a_node_prefills_metadata_by_its_digest_fetching_about_its_size(cluster: LocalCluster,
                                                                              own_layerstore: bool) -> None:
    """With a layerstore of its own that lacks the image, the node asks it first (it ranks first), hears
    NOT_FOUND and reads the metadata from the holder: still by the digest, no fallback."""
    await cluster.start_discovery(1)
    holder, *own = await cluster.start_layerstores(2 if own_layerstore else 1)
    image = await cluster.push("metadigest", scattered_layers("m"))
    pulled = await cluster.pull(holder, image)
    specs = await specs_of(cluster, holder, [layer.digest for layer in pulled.layers])
    assert all(spec.metadata_digest.startswith("sha256:") for spec in specs)
    node = await cluster.start_node(own[0] if own else None, extra_args=NODE_ARGS)
    target = cluster.workdir / "rootfs"
    target.mkdir()
    mounted = await cluster.afsd(node, "mount", image.reference, str(target), "--backend", "fanotify")
    assert mounted.returncode == 0, mounted.stderr

    text = await asyncio.to_thread(daemon_metrics, node)   # mounted, nothing read yet: only the prefill fetched
    fetched = metric(text, "afsd_fetch_bytes_total")
    metadata = sum(length for spec in specs for _, length in spec.metadata_ranges())
    by_chunks = sum(length for spec in specs for _, length in metadata_requests(spec))
    print(f"prefill fetched {fetched:.0f} bytes for {metadata} bytes of metadata "
          f"(whole chunks: {by_chunks} bytes)")
    assert metric(text, "afsd_fetch_metadata_bytes_total") == fetched == sum(span_bytes(spec) for spec in specs)
    assert metadata <= fetched < by_chunks / 10
    assert metric(text, "afsd_fetch_metadata_failures_total") == 0
    assert metric(text, "afsd_fetch_verification_failures_total") == 0

    for path, data in expected_files("m").items():
        assert (target / path).read_bytes() == data, path
    assert (await cluster.afsd(node, "umount", str(target))).returncode == 0


async def test_forged_metadata_from_the_first_holder_falls_back_to_verified_chunks_from_another(
        cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1)
    (origin,) = await cluster.start_layerstores(1, discovery_endpoints=[])   # known to nobody but the fake
    (honest,) = await cluster.start_layerstores(1)
    image = await cluster.push("forgedmeta", scattered_layers("f"))
    pulled = await cluster.pull(origin, image)
    await cluster.pull(honest, image)
    digests = [layer.digest for layer in pulled.layers]
    specs = {spec.layer_digest: spec for spec in await specs_of(cluster, origin, digests)}

    def forge_metadata(digest: str, offset: int, data: bytes) -> bytes:
        """Every metadata byte of the blob flipped; file data passed on as it is."""
        forged = bytearray(data)
        for start, length in specs[digest].metadata_ranges():
            for at in range(max(start, offset), min(start + length, offset + len(data))):
                forged[at - offset] ^= 0xFF
        return bytes(forged)

    stats = [await cluster.layerstore(origin).StatLayer(lpb.StatLayerRequest(digest=d)) for d in digests]
    fake = ForgingLayerStore(cluster.layerstore(origin), forge_bytes=forge_metadata)
    async with fake_holder(fake, cluster.discovery(discovery), "evil", stats) as address:
        # The fake is the node's own layerstore: the one it asks first and reads from first.
        node = await cluster.start_node(None, extra_args=[*NODE_ARGS, "--layerstore", address])
        await mount_and_check(cluster, node, image.reference, "f")
        assert ("ReadLayer", digests[0]) in fake.calls, "the node never read from the fake"
        text = await asyncio.to_thread(daemon_metrics, node)
        assert metric(text, "afsd_fetch_metadata_failures_total") >= 1
        assert metric(text, "afsd_fetch_verification_failures_total") >= 1
        log = node.log()
        assert "does not match the blob's metadata digest" in log
        assert "fetching whole chunks instead" in log
