"""RangeFetcher against real layerstores over gRPC: exact bytes, failover, verification, deadlines,
discovery refresh, leases, priorities and single flight.

One cluster (registry, discovery, two layerstores as processes) is shared by the module; each test
pushes its own image, so what one test breaks (a deleted blob file, a flipped byte, a killed node)
only concerns its own layers. Tests that need fresh nodes start them.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from afsd.api import layerstore_pb2 as lpb
from afsd.cluster.discovery_client import DiscoveryClient
from afsd.cluster.fetcher import RangeFetcher
from afsd.cluster.peers import LayerStorePeer, blob_spec_from_stat
from afsd.errors import FetchError
from afsd.lab.daemons import Daemon, metrics_address
from afsd.lab.registry import start_registry
from afsd.lab.skopeo import PushedImage
from afsd.ondemand.spec import BlobSpec, FetchedRange, Priority
from afsd.rpc import ChannelPool
from tests.support.cluster import LocalCluster, small_image
from tests.support.corruption import flip_byte
from tests.support.stalling_layerstore import StallingLayerStore

pytestmark = pytest.mark.asyncio(loop_scope="module")

MIB = 1 << 20


@dataclass
class Shared:
    cluster: LocalCluster
    nodes: list[Daemon]
    discovery: DiscoveryClient
    channels: ChannelPool

    @asynccontextmanager
    async def fetcher(self, spec: BlobSpec, **options: object) -> AsyncIterator[RangeFetcher]:
        options.setdefault("discovery", self.discovery)
        fetcher = RangeFetcher(spec, channels=self.channels, **options)  # type: ignore[arg-type]
        try:
            yield fetcher
        finally:
            await fetcher.close()


@dataclass(frozen=True)
class HeldLayer:
    spec: BlobSpec
    paths: dict[str, Path]   # node name -> its blob file

    def blob(self, node: Daemon) -> bytes:
        return self.paths[node.name].read_bytes()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Shared]:
    workdir = tmp_path_factory.mktemp("fetcher")
    registry = await asyncio.to_thread(start_registry, workdir / "registry")
    cluster = LocalCluster(workdir, registry)
    channels = ChannelPool()
    try:
        (discovery,) = await cluster.start_discovery(1)
        nodes = await cluster.start_layerstores(2)
        await cluster.wait_registered(2)
        yield Shared(cluster, nodes, DiscoveryClient([discovery.address], channels), channels)
    finally:
        await channels.close()
        await cluster.close()
        await asyncio.to_thread(cluster.stop)


async def hold(shared: Shared, name: str, size: int, nodes: list[Daemon], layers: int = 1) -> list[HeldLayer]:
    """Push an image of `layers` layers onto exactly `nodes`; wait until discovery lists just them."""
    cluster = shared.cluster
    image = await cluster.push(name, small_image(name, size, layers=layers))
    paths: list[dict[str, Path]] = [{} for _ in range(layers)]
    for node in nodes:
        placed = await place(shared, node, image)
        for index, layer in enumerate(placed):
            paths[index][node.name] = Path(layer.cache_path)
    held = []
    for index, layer in enumerate(placed):
        stat = await cluster.layerstore(nodes[0]).StatLayer(lpb.StatLayerRequest(digest=layer.digest))
        held.append(HeldLayer(blob_spec_from_stat(stat), paths[index]))
        await wait_listed(shared, layer.digest, {node.name for node in nodes})
    return held


async def place(shared: Shared, node: Daemon, image: PushedImage) -> list[lpb.Layer]:
    """Get `image`'s layers into exactly `node` (a plain pull may hand a layer to its designated puller
    too): EnsureLayers marked delegated copies from a holder or pulls from the registry itself."""
    (manifest,) = image.manifests
    request = lpb.EnsureLayersRequest(image=image.reference, delegated=True, layers=[
        lpb.Layer(digest=l.digest, media_type=l.media_type, compressed_size=l.size, diff_id=l.diff_id)
        for l in manifest.layers])
    return list((await shared.cluster.layerstore(node).EnsureLayers(request)).layers)


async def wait_listed(shared: Shared, digest: str, names: set[str], timeout: float = 20.0) -> None:
    cluster = shared.cluster
    async def listed() -> bool:
        return await cluster.nodes_for_layer(cluster.discoveries[0], digest) == names
    await cluster.wait_until(listed, timeout, f"discovery to list exactly {sorted(names)} for {digest}")


def assert_widened(result: FetchedRange, offset: int, length: int, spec: BlobSpec, min_request: int) -> None:
    """Whole chunks, starting at the chunk holding `offset`, ending at the first chunk boundary that
    covers the request and `min_request` bytes (rounded up to chunks), or at the blob's end."""
    chunk = spec.chunk_size
    end = result.offset + len(result.data)
    assert result.offset == offset - offset % chunk
    wanted = max(offset + length, result.offset + min_request)
    assert end == min(spec.size, -(-wanted // chunk) * chunk), (offset, length, result.offset, end)


def node_at(shared: Shared, endpoint: str | None) -> Daemon:
    return next(node for node in shared.cluster.layerstores if node.address == endpoint)


async def range_reads(node: Daemon) -> float:
    """Range reads the layerstore process has served, ReadLayer calls and byte-stream ranges (its /metrics)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://{metrics_address(node)}/metrics")).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if (sample.name == "afsd_rpc_requests_total"
                   and sample.labels.get("method") == "/layerstore.v1.LayerStore/ReadLayer")
               or sample.name == "afsd_layerstore_stream_ranges_served_total")


async def prune_all(shared: Shared, node: Daemon) -> int:
    response = await shared.cluster.layerstore(node).PruneCache(lpb.PruneCacheRequest(percent=100))
    return response.evicted_layers


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def exact(shared: Shared) -> HeldLayer:
    """A layer of about 7.5 MiB held by node0 only; the tests using it only read."""
    (layer,) = await hold(shared, "exact", 15 * MIB // 2, shared.nodes[:1])
    return layer


async def test_fetches_return_exact_blob_bytes_widened_to_whole_chunks(shared: Shared, exact: HeldLayer) -> None:
    node0 = shared.nodes[0]
    spec, blob = exact.spec, await asyncio.to_thread(exact.blob, node0)
    assert len(blob) == spec.size and spec.size % spec.chunk_size  # the last chunk is a short one
    chance = random.Random(7)
    ranges = [(0, 1), (4095, 2), (MIB - 1, 2), (3 * MIB + 7, 2 * MIB), (spec.size - 1, 1), (spec.size - 10, 100)]
    ranges += [(chance.randrange(spec.size), chance.randrange(1, 3 * MIB)) for _ in range(12)]

    for min_request in (1 << 20, 3 * MIB + 1):
        async with shared.fetcher(spec, local_endpoint=node0.address, min_request=min_request) as fetcher:
            for offset, length in ranges:
                result = await fetcher.fetch(offset, length)
                assert_widened(result, offset, length, spec, -(-min_request // spec.chunk_size) * spec.chunk_size)
                assert result.data == blob[result.offset:result.offset + len(result.data)]
                assert result.source == "local"
            together = await asyncio.gather(*(fetcher.fetch(o, n, Priority.PREFETCH) for o, n in ranges))
            assert all(r.data == blob[r.offset:r.offset + len(r.data)] for r in together)
            stats = fetcher.stats()
            assert stats["provider"] == node0.address and stats["lease"]
            assert stats["bytes"]["local"] > 0 and stats["bytes"]["peer"] == 0
            assert stats["failovers"] == stats["verification_failures"] == stats["errors"] == 0


async def test_no_holder_of_the_blob_fails_promptly_naming_the_layer(shared: Shared, exact: HeldLayer) -> None:
    nobody = "sha256:" + hashlib.sha256(b"a layer no node holds").hexdigest()
    async with shared.fetcher(replace(exact.spec, layer_digest=nobody)) as fetcher:
        started = time.monotonic()
        with pytest.raises(FetchError, match=nobody) as unknown:
            await fetcher.fetch(0, 1)
        print(f"no provider: FetchError after {time.monotonic() - started:.3f} s: {unknown.value}")
        assert "no layerstore holds it" in str(unknown.value)
        assert fetcher.stats()["errors"] == 1

    # node0 holds the layer, but as another blob than ours (as another converter would make it).
    other = replace(exact.spec, blob_digest="sha256:" + "0" * 64, providers=())
    async with shared.fetcher(other) as fetcher:
        with pytest.raises(FetchError, match="another blob") as mixed:
            await fetcher.fetch(0, 1)
        assert shared.nodes[0].address in str(mixed.value) and exact.spec.layer_digest in str(mixed.value)


async def test_concurrent_fetches_of_the_same_chunks_share_one_read(shared: Shared, exact: HeldLayer) -> None:
    node0 = shared.nodes[0]
    blob = await asyncio.to_thread(exact.blob, node0)
    async with shared.fetcher(exact.spec) as fetcher:
        before = await range_reads(node0)
        results = await asyncio.gather(*(fetcher.fetch(2 * MIB + 5, 10) for _ in range(8)))
        assert {bytes(r.data) for r in results} == {blob[2 * MIB:3 * MIB]}   # (data: the fetch's bytearray)
        assert await range_reads(node0) == before + 1
        assert fetcher.stats()["shared_fetches"] == 7

        # Overlapping requests: the second joins the first's read of chunks 0-2 and reads chunk 3 itself.
        first, second = await asyncio.gather(fetcher.fetch(0, 3 * MIB), fetcher.fetch(MIB, 3 * MIB))
        assert first.data == blob[:3 * MIB] and second.data == blob[MIB:4 * MIB]
        assert await range_reads(node0) == before + 3

        # A waiter that gives up does not cancel the read the other waiter needs.
        leaving = asyncio.create_task(fetcher.fetch(5 * MIB, 1))
        staying = asyncio.create_task(fetcher.fetch(5 * MIB, 1))
        await asyncio.sleep(0)
        leaving.cancel()
        assert (await staying).data == blob[5 * MIB:6 * MIB]
        assert leaving.cancelled()
        assert await range_reads(node0) == before + 4


async def test_demand_fetches_are_served_before_prefetch(shared: Shared, exact: HeldLayer) -> None:
    node0 = shared.nodes[0]
    blob = await asyncio.to_thread(exact.blob, node0)
    chunk = exact.spec.chunk_size
    async with StallingLayerStore(upstream=node0.address) as slow:
        spec = replace(exact.spec, providers=(slow.address,))
        async with shared.fetcher(spec, discovery=None, max_concurrency=1) as fetcher:
            served: list[str] = []

            async def read(name: str, index: int, priority: Priority) -> None:
                result = await fetcher.fetch(index * chunk, 1, priority)
                assert result.data == blob[index * chunk:(index + 1) * chunk]
                served.append(name)

            tasks = [asyncio.create_task(read("first", 0, Priority.PREFETCH))]
            await shared.cluster.wait_until(lambda: slow.calls == 1, 10, "the first read to reach the peer")
            for name, index, priority in [("p1", 1, Priority.PREFETCH), ("p2", 2, Priority.PREFETCH),
                                          ("p3", 3, Priority.PREFETCH), ("d", 5, Priority.DEMAND),
                                          ("q", 6, Priority.PREFETCH), ("dq", 6, Priority.DEMAND)]:
                tasks.append(asyncio.create_task(read(name, index, priority)))
            # dq joins q's read (promoting it), so five reads wait behind the first.
            await shared.cluster.wait_until(lambda: fetcher.stats()["waiting"] == 5, 10, "five queued reads")
            slow.gate.set()
            await asyncio.gather(*tasks)
            assert served[:2] == ["first", "d"]
            assert set(served[2:4]) == {"q", "dq"}
            assert served[4:] == ["p1", "p2", "p3"]
            assert slow.calls == 6


async def test_a_hung_provider_is_abandoned_after_the_call_timeout(shared: Shared, exact: HeldLayer) -> None:
    node0 = shared.nodes[0]
    blob = await asyncio.to_thread(exact.blob, node0)
    async with StallingLayerStore() as hung:
        # Ranked first (it is the "local" one); accepts ReadLayer and never sends.
        spec = replace(exact.spec, providers=(hung.address, node0.address))
        async with shared.fetcher(spec, discovery=None, local_endpoint=hung.address, call_timeout=1.0) as fetcher:
            started = time.monotonic()
            result = await fetcher.fetch(MIB, 1)
            print(f"hung provider first: served after {time.monotonic() - started:.3f} s (call_timeout 1 s)")
            assert result.data == blob[MIB:2 * MIB] and result.source == f"peer:{node0.address}"
            assert hung.calls == 1 and fetcher.stats()["failovers"] == 1

        alone = replace(exact.spec, providers=(hung.address,))
        async with shared.fetcher(alone, discovery=None, call_timeout=1.0) as fetcher:
            started = time.monotonic()
            with pytest.raises(FetchError) as failed:
                await asyncio.wait_for(fetcher.fetch(0, 1), 30)  # a guard against hanging, not a benchmark
            print(f"only a hung provider: FetchError after {time.monotonic() - started:.3f} s: {failed.value}")
            message = str(failed.value)
            assert exact.spec.layer_digest in message and hung.address in message and "within 1 s" in message


async def test_a_corrupt_provider_is_detected_and_another_serves(shared: Shared) -> None:
    node0, node1 = shared.nodes
    (layer,) = await hold(shared, "corrupt", 4 * MIB, [node0, node1])
    spec = layer.spec
    middle = spec.size // 2
    good = await asyncio.to_thread(layer.blob, node1)
    await asyncio.to_thread(flip_byte, layer.paths[node0.name], middle)
    failures_before = REGISTRY.get_sample_value("afsd_fetch_verification_failures_total") or 0.0

    async with shared.fetcher(spec, local_endpoint=node0.address) as fetcher:
        result = await fetcher.fetch(middle, 1)
        assert result.data == good[result.offset:result.offset + len(result.data)]
        assert result.source == f"peer:{node1.address}"
        stats = fetcher.stats()
        assert stats["verification_failures"] == 1 and stats["failovers"] == 1
        assert stats["provider"] == node1.address
        (bad,) = [p for p in stats["providers"] if p["endpoint"] == node0.address]
        assert "does not match the blob's chunk digest" in bad["last_error"]
    assert REGISTRY.get_sample_value("afsd_fetch_verification_failures_total") == failures_before + 1


class RecordingSink:
    """A BlobSink that keeps every write (offset, bytes), from whichever thread it comes."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def write(self, offset: int, data: memoryview) -> int:
        self.writes.append((offset, bytes(data)))
        return len(data)


async def test_fills_hand_each_verified_piece_to_the_sink_as_it_arrives(shared: Shared, exact: HeldLayer) -> None:
    node0 = shared.nodes[0]
    spec, blob = exact.spec, await asyncio.to_thread(exact.blob, node0)
    sink = RecordingSink()
    async with shared.fetcher(spec, local_endpoint=node0.address) as fetcher:
        before = await range_reads(node0)
        filled = await fetcher.fill(MIB + 5, 5 * MIB, Priority.DEMAND, sink)
        assert (filled.offset, filled.length, filled.written, filled.source) == (MIB, 6 * MIB, 6 * MIB, "local")
        # Over the byte stream: chunk by chunk from the receive buffer (more than one write per piece).
        assert len(sink.writes) > 2 and all(data == blob[at:at + len(data)] for at, data in sink.writes)
        assert min(at for at, _ in sink.writes) == MIB
        assert sum(len(data) for _, data in sink.writes) == 6 * MIB
        # Concurrent fills of the same chunks share one read, and its bytes are counted once.
        sink.writes.clear()
        both = await asyncio.gather(*(fetcher.fill(spec.size - 10, 5, Priority.DEMAND, sink) for _ in range(3)))
        assert sum(f.written for f in both) == spec.size - spec.size // spec.chunk_size * spec.chunk_size
        assert await range_reads(node0) == before + 2 + 1   # (6 MiB: two 4 MiB pieces; then one)


async def test_a_corrupt_provider_never_reaches_the_sink(shared: Shared) -> None:
    node0, node1 = shared.nodes
    (layer,) = await hold(shared, "corrupt-fill", 4 * MIB, [node0, node1])
    spec = layer.spec
    good = await asyncio.to_thread(layer.blob, node1)
    await asyncio.to_thread(flip_byte, layer.paths[node0.name], 2 * MIB + 100)
    sink = RecordingSink()
    async with shared.fetcher(spec, local_endpoint=node0.address) as fetcher:
        filled = await fetcher.fill(0, spec.size, Priority.DEMAND, sink)
        assert f"peer:{node1.address}" in filled.source.split("+")
        # Chunks before the flipped one may come from node0 (checked, right), the rest from node1; the sink
        # never saw the flipped chunk.
        assert all(data == good[at:at + len(data)] for at, data in sink.writes)
        covered = 0
        for at, data in sorted(sink.writes):
            assert at <= covered
            covered = max(covered, at + len(data))
        assert covered == spec.size
        assert fetcher.stats()["verification_failures"] == 1


async def read_sequentially(fetcher: RangeFetcher, size: int, *, after_three: object) -> bytes:
    """Read the whole blob in min_request steps, calling `after_three()` after the third fetch."""
    parts, offset, count = [], 0, 0
    while offset < size:
        result = await fetcher.fetch(offset, 1)
        parts.append(result.data)
        offset = result.offset + len(result.data)
        count += 1
        if count == 3:
            await after_three()  # type: ignore[operator]
    assert count > 6
    return b"".join(parts)


async def test_a_read_survives_the_serving_providers_blob_file_being_deleted(shared: Shared) -> None:
    (layer,) = await hold(shared, "deleted", 12 * MIB, shared.nodes)
    async with shared.fetcher(layer.spec) as fetcher:
        state: dict[str, Daemon] = {}

        async def delete_serving_file() -> None:
            state["victim"] = node_at(shared, fetcher.stats()["provider"])
            await asyncio.to_thread(layer.paths[state["victim"].name].unlink)

        data = await read_sequentially(fetcher, layer.spec.size, after_three=delete_serving_file)
        (survivor,) = [n for n in shared.nodes if n is not state["victim"]]
        assert data == await asyncio.to_thread(layer.blob, survivor)
        stats = fetcher.stats()
        assert stats["provider"] == survivor.address and stats["failovers"] == 1
        assert stats["bytes_by_provider"][survivor.address] > 0
        (gone,) = [p for p in stats["providers"] if p["endpoint"] == state["victim"].address]
        assert "does not hold the layer" in gone["last_error"]


async def test_a_provider_that_joins_later_is_used_and_leases_follow_the_reader(shared: Shared) -> None:
    cluster = shared.cluster
    joiner, holder = await cluster.start_layerstores(2)
    image = await cluster.push("late", small_image("late", 3 * MIB, layers=1))
    (pulled,) = await place(shared, holder, image)
    await wait_listed(shared, pulled.digest, {holder.name})
    stat = await cluster.layerstore(holder).StatLayer(lpb.StatLayerRequest(digest=pulled.digest))
    spec = blob_spec_from_stat(stat)

    async with shared.fetcher(spec, local_endpoint=joiner.address, refresh_period=0.5) as fetcher:
        assert (await fetcher.fetch(0, 1)).source == f"peer:{holder.address}"
        assert await prune_all(shared, holder) == 0  # leased: survives a full prune

        await place(shared, joiner, image)  # copied from holder
        await wait_listed(shared, spec.layer_digest, {holder.name, joiner.name})

        async def reads_locally() -> bool:
            return (await fetcher.fetch(MIB, 1)).source == "local"
        await cluster.wait_until(reads_locally, 20, "the fetcher to switch to the local layerstore")
        assert fetcher.stats()["lease"] and fetcher.stats()["provider"] == joiner.address

        async def holder_released() -> bool:  # the lease moved with the reader
            return await prune_all(shared, holder) == 1
        await cluster.wait_until(holder_released, 10, "the holder's lease to be released")

        # Discovery stops listing the holder: the next refresh drops it from the candidates.
        await wait_listed(shared, spec.layer_digest, {joiner.name})

        async def holder_dropped() -> bool:
            await fetcher.fetch(0, 1)
            return [p["endpoint"] for p in fetcher.stats()["providers"]] == [joiner.address]
        await cluster.wait_until(holder_dropped, 10, "the fetcher to forget the holder")
        assert await prune_all(shared, joiner) == 0
    assert await prune_all(shared, joiner) == 1  # released on close

    # Nobody holds the layer now; then a node pulls it again: the failed read's discovery refresh finds it.
    await wait_listed(shared, spec.layer_digest, set())
    async with shared.fetcher(spec, refresh_period=3600) as fetcher:
        with pytest.raises(FetchError, match="no layerstore holds it"):
            await fetcher.fetch(0, 1)
        await place(shared, holder, image)
        await wait_listed(shared, spec.layer_digest, {holder.name})
        result = await fetcher.fetch(0, 1)
        assert result.source == f"peer:{holder.address}"
        assert result.data == (await cluster.read_all(holder, spec.layer_digest))[:len(result.data)]
        # each failed round asked discovery again (how many rounds joined the first, background refresh
        # depends on timing)
        assert fetcher.stats()["refreshes"] >= 2


async def test_a_read_survives_the_serving_provider_being_killed(shared: Shared) -> None:
    (layer,) = await hold(shared, "killed", 12 * MIB, shared.nodes)
    down: list[Daemon] = []
    try:
        async with shared.fetcher(layer.spec, lease_ttl=1.0) as fetcher:
            async def kill_serving_node() -> None:
                down.append(node_at(shared, fetcher.stats()["provider"]))
                await asyncio.to_thread(down[0].kill)

            data = await read_sequentially(fetcher, layer.spec.size, after_three=kill_serving_node)
            (victim,) = down
            (survivor,) = [n for n in shared.nodes if n is not victim]
            assert data == await asyncio.to_thread(layer.blob, survivor)
            stats = fetcher.stats()
            assert stats["provider"] == survivor.address and stats["failovers"] >= 1

            # Bring the victim back, then kill the survivor while the fetcher only holds its lease:
            # the failed renewal moves the lease to the victim without waiting for a read.
            await shared.cluster.restart(victim)
            down.remove(victim)
            await shared.cluster.wait_until(lambda: answers(shared, victim), 20, f"{victim.name} to answer again")
            down.append(survivor)
            await asyncio.to_thread(survivor.kill)
            await shared.cluster.wait_until(lambda: fetcher.stats()["provider"] == victim.address, 20,
                                            "the lease to move to the restarted node")
            assert fetcher.stats()["lease"]
            result = await fetcher.fetch(MIB, 1)
            assert result.data == data[MIB:2 * MIB] and result.source == f"peer:{victim.address}"
    finally:
        for node in down:
            await shared.cluster.restart(node)


async def answers(shared: Shared, node: Daemon) -> bool:
    """Whether `node` answers over the fetchers' own channel (which backs off after failures)."""
    stub = LayerStorePeer(node.address, shared.channels).stub
    try:
        await stub.HasLayer(lpb.HasLayerRequest(digest="sha256:" + "0" * 64), timeout=1)
        return True
    except grpc.aio.AioRpcError:
        return False
