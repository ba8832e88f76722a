"""`ReadLayer` byte ranges, `StatLayer` for readers, and what a restarted layerstore serves."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import grpc
import pytest

from afsd.api import layerstore_pb2 as lpb
from afsd.cluster.peers import MAX_READ_MESSAGE
from afsd.ondemand.chunks import ChunkTable
from tests.support.cluster import LocalCluster, small_image

MIB = 1 << 20


async def test_read_layer_returns_exactly_the_blob_bytes_for_any_range(cluster: LocalCluster) -> None:
    (node,) = await cluster.start_layerstores(1)
    image = await cluster.push("ranges", small_image("ranges", 12 * MIB, layers=1))
    (layer,) = (await cluster.pull(node, image)).layers
    blob = Path(layer.cache_path).read_bytes()
    assert len(blob) == layer.afs_size and "sha256:" + hashlib.sha256(blob).hexdigest() == layer.blob_digest

    stub = cluster.layerstore(node)
    rng = random.Random(7)
    ranges = [(0, 1), (0, len(blob)), (4095, 4097), (len(blob) - 10, 10), (len(blob) - 10, 5 * MIB),
              (MIB + 3, 9 * MIB), (0, 4 * MIB), (len(blob), 100), (len(blob) + 4096, 1)]
    ranges += [(rng.randrange(len(blob)), rng.randrange(1, 6 * MIB)) for _ in range(12)]
    for offset, length in ranges:
        messages = [m async for m in stub.ReadLayer(lpb.ReadLayerRequest(digest=layer.digest, offset=offset,
                                                                           length=length))]
        data = b"".join(m.data for m in messages)
        assert data == blob[offset:offset + length], (offset, length)
        assert all(len(m.data) <= MAX_READ_MESSAGE for m in messages)
        assert messages[-1].eof == (offset + length >= len(blob))
        position = offset
        for message in messages:  # each message says where its bytes belong
            assert message.offset == position
            position += len(message.data)


async def test_stat_layer_gives_what_a_reader_needs_to_verify(cluster: LocalCluster) -> None:
    (node,) = await cluster.start_layerstores(1)
    image = await cluster.push("stat", small_image("stat", 3 * MIB, layers=1))
    (layer,) = (await cluster.pull(node, image)).layers
    stat = await cluster.layerstore(node).StatLayer(lpb.StatLayerRequest(digest=layer.digest))
    blob = Path(layer.cache_path).read_bytes()
    assert (stat.afs_size, stat.blob_digest) == (len(blob), layer.blob_digest)
    table = ChunkTable(stat.afs_size, stat.chunk_size, tuple(stat.chunk_digests))
    table.check(0, blob, source="test")  # raises on any mismatch
    data_bytes = sum(r.length for r in stat.data_map)
    assert 0 < data_bytes < stat.afs_size
    assert stat.media_type == image.manifests[0].layers[0].media_type
    assert stat.diff_id == image.manifests[0].layers[0].diff_id


async def test_bad_and_unknown_digests_are_rejected(cluster: LocalCluster) -> None:
    (node,) = await cluster.start_layerstores(1)
    stub = cluster.layerstore(node)
    for digest in ("", "sha256:xyz", "md5:" + "0" * 32, "../../etc/passwd"):
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await cluster.read_all(node, digest)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    unknown = "sha256:" + "ab" * 32
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await cluster.read_all(node, unknown)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as missing_stat:
        await stub.StatLayer(lpb.StatLayerRequest(digest=unknown))
    assert missing_stat.value.code() == grpc.StatusCode.NOT_FOUND
    for offset, length in ((-1, 10), (0, 0), (0, -4)):
        with pytest.raises(grpc.aio.AioRpcError) as bad_range:
            await cluster.read_all(node, unknown, offset, length)
        assert bad_range.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not (await stub.HasLayer(lpb.HasLayerRequest(digest=unknown))).found


async def test_a_restarted_layerstore_serves_its_cache_and_drops_crash_leftovers(cluster: LocalCluster) -> None:
    (node,) = await cluster.start_layerstores(1)
    image = await cluster.push("restart", small_image("restart", 2 * MIB))
    layers = (await cluster.pull(node, image)).layers
    node.kill()
    cache = Path(layers[0].cache_path).parent
    orphan = cache / ("f" * 64 + ".erofs")          # a blob whose description never got written
    orphan.write_bytes(b"\0" * 4096)
    partial = cache.parents[1] / "tmp" / "x.partial"   # an interrupted download
    partial.write_bytes(b"half")
    await cluster.restart(node)

    assert not orphan.exists() and not partial.exists()
    assert not (await cluster.layerstore(node).HasLayer(lpb.HasLayerRequest(digest="sha256:" + "f" * 64))).found
    response = await cluster.layerstore(node).HasImage(lpb.HasImageRequest(image=image.reference))
    assert response.found and response.total_layers == len(layers)
    for layer in layers:
        data = await cluster.read_all(node, layer.digest)
        assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.blob_digest
