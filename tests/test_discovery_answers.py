"""Discovery's answers stay small however large the cluster: a real discovery process heartbeated by
300 simulated layerstores of 100 layers each (past the ~184 nodes at which one whole-record answer used
to exceed gRPC's 4 MiB receive limit)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from afsd.api import discovery_pb2 as pb
from afsd.api import discovery_pb2_grpc as pb_grpc
from afsd.cluster.answers import ANSWER_BYTES, READER_PROVIDERS, PageTokenError, Query, page
from afsd.cluster.nodetable import NodeRecord, NodeTable
from afsd.lab.daemons import discovery_daemon, start_all
from afsd.sim.heartbeats import fake_layerstores, heartbeat_all, image_key, layer_digest

NODES = 300


def record(n: int, layers: int = 3) -> NodeRecord:
    return NodeRecord(f"n{n}", f"10.0.0.{n}:1", 0.0, 0,
                      layers={f"sha256:{i}": (100 + i, f"sha256:b{i}") for i in range(layers)},
                      cached_images=frozenset({"docker.io/x/y:1", "docker.io/x/z:1"}))


def test_a_layer_query_gets_records_cut_down_to_that_layer() -> None:
    (service,), token, total = page([record(1)], Query(layer_digest="sha256:1"))
    assert (list(service.layer_digests), [s.digest for s in service.layer_stats], list(service.cached_images),
            token, total) == (["sha256:1"], ["sha256:1"], [], "", 1)
    (full,), _, _ = page([record(1)], Query(layer_digest="sha256:1", view=pb.SERVICE_VIEW_FULL))
    assert len(full.layer_digests) == 3 and len(full.cached_images) == 2
    (brief,), _, _ = page([record(1)], Query(view=pb.SERVICE_VIEW_ENDPOINTS))
    assert (brief.endpoint, list(brief.layer_digests)) == ("10.0.0.1:1", [])


def test_pages_cover_every_node_once_under_the_byte_budget() -> None:
    nodes = [record(n, layers=50) for n in range(40)]
    seen: list[str] = []
    token = ""
    while True:
        services, token, total = page(nodes, Query(page_token=token), budget=20_000)
        assert total == 40 and services
        assert sum(s.ByteSize() for s in services) <= 20_000 or len(services) == 1
        seen += [s.endpoint for s in services]
        if not token:
            break
    assert sorted(seen) == sorted(n.endpoint for n in nodes)


def test_the_requester_comes_first_and_different_requesters_see_different_orders() -> None:
    nodes = [record(n) for n in range(50)]
    plain, _, _ = page(nodes, Query(layer_digest="sha256:0", max_services=3))
    assert [s.node_id for s in plain] == ["n0", "n1", "n10"]  # no requester: by node id, as the reference
    first, _, _ = page(nodes, Query(layer_digest="sha256:0", requester="10.0.0.7:1", max_services=5))
    assert first[0].endpoint == "10.0.0.7:1" and len(first) == 5
    other, _, _ = page(nodes, Query(layer_digest="sha256:0", requester="10.0.0.8:1", max_services=5))
    assert [s.endpoint for s in first[1:]] != [s.endpoint for s in other[1:]]
    with pytest.raises(PageTokenError):
        page(nodes, Query(page_token="not-ours"))


def test_the_table_answers_from_its_indexes_and_forgets_what_a_heartbeat_dropped() -> None:
    clock = [0.0]
    table = NodeTable(ttl=10, clock=lambda: clock[0])
    table.update(record(1))
    table.update(record(2, layers=1))
    assert [n.node_id for n in table.holding_layer("sha256:2")] == ["n1"]
    assert [n.node_id for n in table.holding_image("docker.io/q/q:1", ["sha256:0", "sha256:1"])] == ["n1"]
    table.update(record(1, layers=1))
    assert table.holding_layer("sha256:2") == []
    clock[0] = 11
    table.update(NodeRecord("n3", "10.0.0.3:1", 11.0, 0, layers={"sha256:0": (1, "")}))
    assert [n.node_id for n in table.holding_layer("sha256:0")] == ["n3"]


def test_a_node_that_leaves_is_forgotten_at_once_and_its_endpoint_is_free() -> None:
    table = NodeTable(ttl=600)
    table.update(record(1))
    assert table.remove("n1") is not None and table.remove("n1") is None
    assert table.live() == [] and table.holding_layer("sha256:1") == [] and table.owner_of("10.0.0.1:1") is None
    table.update(NodeRecord("n1-restarted", "10.0.0.1:1", table.now(), 0))
    assert table.owner_of("10.0.0.1:1") == "n1-restarted"


@pytest.fixture
async def busy_discovery(tmp_path: Path):
    daemon = discovery_daemon(tmp_path, "discovery", ttl=600, metrics=False)
    await asyncio.to_thread(start_all, [daemon])
    channel = grpc.aio.insecure_channel(daemon.address)  # the default 4 MiB receive limit
    try:
        await heartbeat_all(channel, fake_layerstores(NODES, 100))
        yield pb_grpc.ServiceDiscoveryStub(channel)
    finally:
        await channel.close()
        daemon.stop()


async def test_answers_about_three_hundred_nodes_of_a_hundred_layers_stay_small(busy_discovery) -> None:
    stub = busy_discovery
    everyone = await stub.FindProvider(pb.FindProviderRequest())
    assert everyone.total_services == NODES and everyone.next_page_token
    assert everyone.ByteSize() <= ANSWER_BYTES + 64
    endpoints = [s.endpoint for s in everyone.services]
    token = everyone.next_page_token
    while token:
        more = await stub.FindProvider(pb.FindProviderRequest(page_token=token))
        endpoints += [s.endpoint for s in more.services]
        token = more.next_page_token
    assert sorted(endpoints) == sorted({s.endpoint for s in fake_layerstores(NODES, 100)})

    base = layer_digest(0)  # a base layer: every node holds it
    holders = await stub.FindProvider(pb.FindProviderRequest(layer_digest=base))
    assert (len(holders.services), holders.total_services) == (READER_PROVIDERS, NODES) and holders.next_page_token
    assert all(list(s.layer_digests) == [base] and len(s.layer_stats) == 1 for s in holders.services)
    assert holders.ByteSize() < 20_000
    rest = await stub.FindProvider(pb.FindProviderRequest(layer_digest=base, page_token=holders.next_page_token,
                                                          max_services=NODES))
    assert len({s.endpoint for s in [*holders.services, *rest.services]}) == NODES and not rest.next_page_token

    few = await stub.FindProvider(pb.FindProviderRequest(layer_digest=base, max_services=8,
                                                         requester_endpoint=endpoints[5]))
    assert len(few.services) == 8 and few.services[0].endpoint == endpoints[5] and few.total_services == NODES

    brief = await stub.FindProvider(pb.FindProviderRequest(view=pb.SERVICE_VIEW_ENDPOINTS))
    assert len(brief.services) == NODES and not brief.next_page_token

    key = image_key(1)
    image = await stub.FindImageProvider(pb.FindImageProviderRequest(image_key=key))
    assert image.services and all(list(s.cached_images) == [image.image_key] and not s.layer_stats
                                  for s in image.services)
    legacy = await stub.FindImage(pb.FindImageRequest())
    assert legacy.total_services == NODES and legacy.ByteSize() <= ANSWER_BYTES + 64

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.FindProvider(pb.FindProviderRequest(page_token="garbage"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
