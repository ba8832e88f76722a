"""One registry pull per layer per cluster, and verified copies between layerstores."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from pathlib import Path

from afsd.api import layerstore_pb2 as lpb
from tests.support.cluster import LocalCluster, small_image
from tests.support.corruption import flip_byte


def _blob_gets(cluster: LocalCluster) -> Counter[str]:
    return Counter(entry.uri.rsplit("/", 1)[-1] for entry in cluster.registry.access_log()
                   if entry.method == "GET" and "/blobs/" in entry.uri and entry.status == 200)


async def _verified(cluster: LocalCluster, node, layer: lpb.Layer) -> bool:
    data = await cluster.read_all(node, layer.digest)
    return "sha256:" + hashlib.sha256(data).hexdigest() == layer.blob_digest and len(data) == layer.afs_size


async def test_a_burst_of_pulls_fetches_each_blob_from_the_registry_once(cluster: LocalCluster) -> None:
    await cluster.start_discovery(2)
    nodes = await cluster.start_layerstores(3)
    image = await cluster.push("burst", small_image("burst", 6 << 20, layers=3))
    await cluster.wait_registered(3)

    calls = [cluster.pull(node, image) for node in nodes] + [cluster.pull(nodes[0], image) for _ in range(4)]
    responses = await asyncio.gather(*calls)

    fetched = _blob_gets(cluster)
    layer_digests = [layer.digest for layer in responses[0].layers]
    assert len(layer_digests) == 3
    assert all(fetched[digest] == 1 for digest in layer_digests), fetched
    assert all(count == 1 for count in fetched.values()), f"some blob was fetched twice: {fetched}"
    for node, response in zip(nodes, responses):
        assert [l.digest for l in response.layers] == layer_digests
        for layer in response.layers:
            assert layer.cached and await _verified(cluster, node, layer)
    # Every node holds the same bytes (reproducible conversion): one blob digest per layer.
    for index in range(3):
        assert len({response.layers[index].blob_digest for response in responses}) == 1


async def test_a_later_pull_copies_from_a_peer_not_the_registry(cluster: LocalCluster) -> None:
    await cluster.start_discovery(1)
    (first,) = await cluster.start_layerstores(1)
    image = await cluster.push("later", small_image("later", 2 << 20))
    await cluster.wait_registered(1)
    await cluster.pull(first, image)
    before = sum(_blob_gets(cluster).values())
    (second,) = await cluster.start_layerstores(1)
    await cluster.wait_registered(2)
    response = await cluster.pull(second, image)
    assert sum(_blob_gets(cluster).values()) == before
    assert all([await _verified(cluster, second, layer) for layer in response.layers])
    assert "copied" in second.log()


async def test_a_corrupt_blob_on_a_peer_is_detected_and_fetched_elsewhere(cluster: LocalCluster) -> None:
    await cluster.start_discovery(1)
    (holder,) = await cluster.start_layerstores(1)
    image = await cluster.push("corrupt", small_image("corrupt", 3 << 20, layers=1))
    await cluster.wait_registered(1)
    (layer,) = (await cluster.pull(holder, image)).layers
    flip_byte(Path(layer.cache_path), layer.afs_size // 2)
    (reader,) = await cluster.start_layerstores(1)
    await cluster.wait_registered(2)

    (copied,) = (await cluster.pull(reader, image)).layers
    assert copied.blob_digest == layer.blob_digest
    assert await _verified(cluster, reader, copied)
    assert "does not match the blob's chunk digest" in reader.log()
    assert _blob_gets(cluster)[layer.digest] == 2  # the second fetch was the fallback to the registry

