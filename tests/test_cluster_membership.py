"""Discovery replicas and layerstore heartbeats, with every daemon a real process on loopback."""

from __future__ import annotations

import asyncio
import signal

import grpc
import httpx
import pytest

from afsd.api import discovery_pb2 as dpb
from afsd.api import layerstore_pb2 as lpb
from afsd.lab.daemons import discovery_daemon, metrics_address, start_all, with_hosts_file
from afsd.lab.ports import reserve_shared_port
from tests.support.cluster import LocalCluster, small_image
from tests.support.metrics import metric

TTL = 4.0


async def test_a_pulled_image_is_reported_by_every_replica_until_its_node_dies(cluster: LocalCluster) -> None:
    first, second = await cluster.start_discovery(2, ttl=TTL)
    node_a, node_b, node_c = await cluster.start_layerstores(3, heartbeat_period=1.0)
    image = await cluster.push("app", small_image("app", 1 << 20))
    await cluster.wait_registered(3)

    response = await cluster.pull(node_a, image)
    digests = [layer.digest for layer in response.layers]
    key = response.image_key

    for replica in (first, second):
        await cluster.wait_until(lambda r=replica: _has(cluster.nodes_for_image(r, key), "node0"), 10,
                                 f"{replica.name} to list node0 for the image")
        for digest in digests:
            assert "node0" in await cluster.nodes_for_layer(replica, digest)
    # Any spelling of the same image finds it: keys are normalised references + platform.
    spelled = f"{image.reference.replace(':v1', '')}:v1|linux/amd64"
    assert "node0" in await cluster.nodes_for_image(first, spelled)

    node_a.kill()
    for replica in (first, second):
        gone_after = await cluster.wait_until(
            lambda r=replica: _lacks(cluster.nodes_for_layer(r, digests[0]), "node0"), TTL + 5,
            f"{replica.name} to forget the killed node")
        assert gone_after <= TTL + 5
    assert {"node1", "node2"} <= await _all_nodes(cluster, first)

    await cluster.restart(node_a)
    for replica in (first, second):
        await cluster.wait_until(lambda r=replica: _has(cluster.nodes_for_image(r, key), "node0"), 10,
                                 f"{replica.name} to list the restarted node with its cache")
    stat = await cluster.layerstore(node_a).HasImage(lpb.HasImageRequest(image=image.reference))
    assert stat.found and stat.missing_layers == 0


async def test_heartbeats_reach_every_address_of_a_discovery_name(cluster: LocalCluster) -> None:
    """One DNS name, two replicas (127.0.0.1 and 127.0.0.2, same port): the layerstore, configured with
    the name only, must heartbeat both. The name is resolved by the system resolver from /etc/hosts in the
    layerstore's own mount namespace."""
    hosts = ["127.0.0.1", "127.0.0.2"]
    replicas = [discovery_daemon(cluster.workdir, f"discovery-{host}", ttl=TTL, host=host, listen=reservation,
                                 metrics=False) for host, reservation in zip(hosts, reserve_shared_port(hosts))]
    port = replicas[0].port
    cluster.discoveries += replicas
    await asyncio.to_thread(start_all, replicas)
    hosts = cluster.workdir / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.1 discovery.afsd.test\n127.0.0.2 discovery.afsd.test\n")
    (node,) = await cluster.start_layerstores(1, discovery_endpoints=[f"discovery.afsd.test:{port}"],
                                               prefix=with_hosts_file(hosts))
    for replica in replicas:
        await cluster.wait_until(lambda r=replica: _has(_all_nodes(cluster, r), node.name), 10,
                                 f"a heartbeat at {replica.name}")


async def test_discovery_rejects_bad_requests_with_clear_status(cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1)
    stub = cluster.discovery(discovery)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.Heartbeat(dpb.HeartbeatRequest(node_id="", endpoint=""))
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as bad_key:
        await stub.FindImageProvider(dpb.FindImageProviderRequest(image_key="UPPER/Case:tag"))
    assert bad_key.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UPPER" in bad_key.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.ResolveImage(dpb.ResolveImageRequest(image=f"{cluster.registry.address}/test/nothing:here"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_resolve_image_returns_layers_and_runtime_config(cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1)
    image = await cluster.push("cfg", small_image("cfg", 1 << 16))
    stub = cluster.discovery(discovery)
    for spelling in (image.reference, image.reference.rsplit(":", 1)[0]):
        response = await stub.ResolveImage(dpb.ResolveImageRequest(image=spelling, tag="v1"))
        assert response.image_key == f"{image.reference}|linux/amd64"
        assert [layer.digest for layer in response.layers] == [l.digest for l in image.manifests[0].layers]
        assert response.runtime_config.cmd == ["/bin/sh"]
        assert response.manifest_digest == image.digest


async def test_daemons_serve_prometheus_metrics(cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1)
    (node,) = await cluster.start_layerstores(1)
    image = await cluster.push("metrics", small_image("metrics", 1 << 20))
    await cluster.pull(node, image)
    layer = (await cluster.pull(node, image)).layers[0].digest
    await cluster.read_all(node, layer)
    found = await cluster.discovery(discovery).FindImage(dpb.FindImageRequest(image_key=image.reference,
                                                                              layer_digest=layer))
    assert [s.node_id for s in found.services] == ["node0"]
    with pytest.raises(grpc.aio.AioRpcError) as failed:   # an error, to be counted by its code
        await cluster.layerstore(node).StatLayer(lpb.StatLayerRequest(digest="sha256:nothex"))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with httpx.AsyncClient() as http:
        discovery_text = (await http.get(f"http://{metrics_address(discovery)}/metrics")).text
        node_text = (await http.get(f"http://{metrics_address(node)}/metrics")).text
    assert 'afsd_rpc_requests_total{code="OK",method="/discovery.v1.ServiceDiscovery/Heartbeat"}' in discovery_text
    assert "afsd_rpc_duration_seconds_bucket" in discovery_text
    for name in ("afsd_layerstore_cache_bytes", "afsd_layerstore_cache_limit_bytes", "afsd_layerstore_evictions_total",
                 "afsd_layerstore_bytes_served_total", "afsd_layerstore_registry_bytes_total",
                 "afsd_layerstore_peer_bytes_total", 'method="/layerstore.v1.LayerStore/PullImage"'):
        assert name in node_text, name
    assert 'afsd_rpc_requests_total{code="INVALID_ARGUMENT",method="/layerstore.v1.LayerStore/StatLayer"} 1.0' \
        in node_text
    assert 'afsd_rpc_requests_total{code="OK",method="/discovery.v1.ServiceDiscovery/FindImage"} 1.0' in discovery_text
    for name in ("afsd_layerstore_bytes_served_total", "afsd_layerstore_registry_bytes_total"):
        assert metric(node_text, name) > 0, name


async def _has(nodes, name: str) -> bool:
    return name in await nodes


async def _lacks(nodes, name: str) -> bool:
    return name not in await nodes


async def _all_nodes(cluster: LocalCluster, discovery) -> set[str]:
    response = await cluster.discovery(discovery).FindProvider(dpb.FindProviderRequest())
    return {s.node_id for s in response.services}


async def test_a_layerstore_heartbeats_at_once_after_a_new_layer_and_after_an_eviction(cluster: LocalCluster) -> None:
    """With a 60 s heartbeat period, discovery still learns of a pulled image and of an eviction within
    seconds: the layerstore beats right after its cache changes, not at its next period."""
    (discovery,) = await cluster.start_discovery(1, ttl=120)
    (node,) = await cluster.start_layerstores(1, heartbeat_period=60)
    await cluster.wait_registered(1)
    image = await cluster.push("prompt", small_image("prompt", 1 << 20, layers=1))
    (layer,) = (await cluster.pull(node, image)).layers
    waited = await cluster.wait_until(lambda: _has(cluster.nodes_for_layer(discovery, layer.digest), "node0"), 10,
                                      "discovery to list the new layer")
    print(f"new layer listed after {waited:.2f} s")
    pruned = await cluster.layerstore(node).PruneCache(lpb.PruneCacheRequest(percent=100))
    assert pruned.evicted_layers == 1
    waited = await cluster.wait_until(lambda: _lacks(cluster.nodes_for_layer(discovery, layer.digest), "node0"), 10,
                                      "discovery to drop the evicted layer")
    print(f"evicted layer dropped after {waited:.2f} s")


async def test_a_layerstore_stopped_gracefully_is_no_longer_named_by_any_replica(cluster: LocalCluster) -> None:
    """SIGTERM: before it exits, the layerstore tells every replica it leaves, so right after its exit no
    answer names it — not even the "every node" list a node picks a puller from — long before its heartbeat
    (TTL 120 s) would expire."""
    replicas = await cluster.start_discovery(2, ttl=120)
    leaving, staying = await cluster.start_layerstores(2, heartbeat_period=60)
    await cluster.wait_registered(2)
    image = await cluster.push("leave", small_image("leave", 1 << 20))
    response = await cluster.pull(leaving, image)
    await cluster.pull(staying, image)
    digests = [layer.digest for layer in response.layers]
    for replica in replicas:
        for digest in digests:
            await cluster.wait_until(lambda r=replica, d=digest: _both(cluster.nodes_for_layer(r, d)), 10,
                                     f"{replica.name} to list both nodes for {digest}")
        await cluster.wait_until(lambda r=replica: _both(cluster.nodes_for_image(r, response.image_key)), 10,
                                 f"{replica.name} to list both nodes for the image")

    assert await asyncio.to_thread(leaving.stop) == 0
    for replica in replicas:
        for digest in digests:
            assert await cluster.nodes_for_layer(replica, digest) == {"node1"}, replica.name
            pulling = await cluster.discovery(replica).FindProvider(
                dpb.FindProviderRequest(layer_digest=digest, include_pulling=True))
            assert {s.node_id for s in pulling.services} == {"node1"}
        assert await cluster.nodes_for_image(replica, response.image_key) == {"node1"}
        everyone = await cluster.discovery(replica).FindProvider(dpb.FindProviderRequest(view=dpb.SERVICE_VIEW_ENDPOINTS))
        assert {s.node_id for s in everyone.services} == {"node1"}, replica.name
    assert "told 2 discovery replica(s) that we leave" in leaving.log()


async def test_a_layerstore_stops_promptly_when_discovery_does_not_answer(cluster: LocalCluster) -> None:
    """A stopped (SIGSTOP) discovery accepts connections and never answers: the last heartbeat gives up
    after its short deadline, and SIGTERM still ends the layerstore cleanly, well before SIGKILL."""
    (discovery,) = await cluster.start_discovery(1)
    (node,) = await cluster.start_layerstores(1)
    await cluster.wait_registered(1)
    discovery.signal(signal.SIGSTOP)
    try:
        assert await asyncio.to_thread(node.stop) == 0   # Daemon.stop SIGKILLs after deadlines.DAEMON_STOP
    finally:
        discovery.signal(signal.SIGCONT)
    assert "did not hear within" in node.log()


async def _both(nodes) -> bool:
    return {"node0", "node1"} <= await nodes
