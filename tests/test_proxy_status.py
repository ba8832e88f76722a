"""What `afsd proxy` says about the cluster, and ReconcileImageReplica: the AfsProxy Status stream and
reconcile through the published afs-sdk, `GET /status` summed over two proxies found by DNS, and layer
copies made from peers rather than the registry. Everything is found through a real dnsmasq."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from afsd.api import afsproxy_pb2, afsproxy_pb2_grpc
from afsd.api import discovery_pb2 as dpb
from afsd.api import discovery_pb2_grpc as dgrpc
from afsd.api import layerstore_pb2 as lpb
from afsd.api import layerstore_pb2_grpc as lgrpc
from afsd.lab.daemons import Daemon, http_address, layerstore_daemon, metrics_address, start_all
from afsd.lab.ports import reserve_shared_port
from afsd.lab.oci_layout import ImageSpec, write_oci_layout
from afsd.lab.skopeo import push_layout
from tests.support.cluster import small_image
from tests.support.proxy import (  # noqa: F401 - fixtures
    AFSLETS,
    ProxyCluster,
    afslet_cluster,
    afslet_host,
    execute_call,
    metric,
    module_proxy_cluster,
    proxies_idle,
    proxy_metrics,
    proxy_status,
    scrape,
    sdk_proxy_status,
    sdk_reconcile,
    wait_for,
)

HOSTS = ["127.0.0.2", "127.0.0.3"]
DISCOVERY = "discovery.afsd.test"
PROXIES = "proxies.afsd.test"
proxy_cluster = module_proxy_cluster("proxy-status", HOSTS, limit_cpu=2, limit_memory_mb=1024)
pytestmark = pytest.mark.usefixtures("nothing_left_behind", "proxies_idle")


class Setup:
    """Three layerstores (the afslet cluster's store0 plus two), two proxies sharing an HTTP port on
    127.0.0.11 and 127.0.0.12, and DNS names for the discovery replica and the proxies."""

    def __init__(self, cluster: ProxyCluster) -> None:
        self.cluster = cluster
        base = cluster.base
        registry_args = ["--insecure-registry", base.registry.address]
        self.layerstores = [base.daemons[1]] + [
            layerstore_daemon(base.workdir, f"store{i}", [base.discovery.address], heartbeat_period=1.0,
                              registry_args=registry_args) for i in (1, 2)]
        base.daemons += self.layerstores[1:]  # stopped with the cluster
        start_all(self.layerstores[1:])
        self.discovery_target = f"{DISCOVERY}:{base.discovery.port}"
        cluster.dns.set(DISCOVERY, [base.discovery.host])
        self.http_ports = dict(zip(["127.0.0.11", "127.0.0.12", "127.0.0.13"],
                                   reserve_shared_port(["127.0.0.11", "127.0.0.12", "127.0.0.13"])))
        http_port = self.http_ports["127.0.0.11"].port
        self.peers = [f"127.0.0.1{i}" for i in (1, 2)]
        cluster.dns.set(PROXIES, self.peers)
        self.proxies = [cluster.start_proxy(f"proxy-{i}", host=host, http=self.http_ports[host],
                                            discovery_target=self.discovery_target,
                                            peers_target=f"{PROXIES}:{http_port}")
                        for i, host in zip("ab", self.peers)]
        self.wait_registered(3)

    def wait_registered(self, count: int) -> None:
        with grpc.insecure_channel(self.cluster.base.discovery.address) as channel:
            stub = dgrpc.ServiceDiscoveryStub(channel)
            wait_for(lambda: len(stub.FindProvider(dpb.FindProviderRequest(), timeout=10).services) >= count,
                     f"{count} layerstores in discovery")

    def holders(self, digest: str) -> set[str]:
        with grpc.insecure_channel(self.cluster.base.discovery.address) as channel:
            response = dgrpc.ServiceDiscoveryStub(channel).FindProvider(dpb.FindProviderRequest(layer_digest=digest),
                                                                         timeout=10)
        return {service.node_id for service in response.services}


@pytest.fixture(scope="module")
def setup(proxy_cluster: ProxyCluster) -> Iterator[Setup]:
    ready = Setup(proxy_cluster)
    yield ready
    for reservation in ready.http_ports.values():
        reservation.close()


@pytest.fixture
def dns_restored(proxy_cluster: ProxyCluster, setup: Setup) -> Iterator[None]:
    yield
    proxy_cluster.publish_afslets(HOSTS)
    proxy_cluster.dns.set(DISCOVERY, [proxy_cluster.base.discovery.host])
    proxy_cluster.dns.set(PROXIES, setup.peers)


def test_the_status_stream_lists_layerstores_afslets_and_a_summary(setup: Setup) -> None:
    events = sdk_proxy_status(setup.proxies[0])
    layerstores = [e for e in events if e["event"] == "layerstore"]
    afslets = [e for e in events if e["event"] == "afslet"]
    assert [e["event"] for e in events] == ["layerstore"] * 3 + ["afslet"] * 2 + ["summary"]
    assert [e["node_id"] for e in layerstores] == ["store0", "store1", "store2"]
    assert {e["endpoint"] for e in layerstores} == {d.address for d in setup.layerstores}
    assert all(e["last_seen_unix"] > 0 and e["cache_max_bytes"] > 0 for e in layerstores)
    port = setup.cluster.afslet_port
    assert afslets == [{"event": "afslet", "endpoint": f"{host}:{port}", "reachable": True, "error": "",
                        "running_containers": 0, "limit_cpu_cores": 2, "limit_memory_mb": 1024, "used_cpu_cores": 0,
                        "used_memory_mb": 0, "available_cpu_cores": 2, "available_memory_mb": 1024}
                       for host in HOSTS]
    assert events[-1] == {"event": "summary", "layerstore_instances": 3, "afslet_instances": 2, "afslet_reachable": 2,
                          "total_layers": sum(len(e["layers"]) for e in layerstores)}


@pytest.mark.usefixtures("dns_restored")
def test_what_does_not_answer_is_reported_in_the_stream(proxy_cluster: ProxyCluster, setup: Setup) -> None:
    proxy_cluster.publish_afslets([*HOSTS, "127.0.0.9"])                     # nothing listens on .9
    proxy_cluster.dns.set(DISCOVERY, [proxy_cluster.base.discovery.host, "127.0.0.8"])  # a dead replica
    events = sdk_proxy_status(setup.proxies[1])
    (error,) = [e for e in events if e["event"] == "status_error"]
    assert error["source"] == "discovery" and f"127.0.0.8:{proxy_cluster.base.discovery.port}" in error["message"]
    assert len([e for e in events if e["event"] == "layerstore"]) == 3   # the live replica's view
    dead = [e for e in events if e["event"] == "afslet" and e["endpoint"].startswith("127.0.0.9:")]
    assert len(dead) == 1 and not dead[0]["reachable"] and "Connection refused" in dead[0]["error"]   # the cause
    assert events[-1]["afslet_instances"] == 3 and events[-1]["afslet_reachable"] == 2

    proxy_cluster.dns.set(AFSLETS, [])
    events = sdk_proxy_status(setup.proxies[1])
    assert [e["source"] for e in events if e["event"] == "status_error"][-1] == "afslet_resolve"


def test_reconcile_copies_layers_from_peers_not_from_the_registry(setup: Setup) -> None:
    base = setup.cluster.base
    layout = write_oci_layout(base.workdir / "layouts" / "replicated", "v1", ImageSpec(small_image("replicated", 2 << 20)))
    image = push_layout(layout, base.registry.address, "afsd-test/replicated", "v1").reference
    with grpc.insecure_channel(base.discovery.address) as channel:
        resolved = dgrpc.ServiceDiscoveryStub(channel).ResolveImage(dpb.ResolveImageRequest(image=image), timeout=60)
    # The image on one layerstore: `delegated` makes store0 fetch it itself rather than ask the
    # layerstore that the cluster designates as the puller of each layer (which would hold it too).
    with grpc.insecure_channel(setup.layerstores[0].address) as channel:
        lgrpc.LayerStoreStub(channel).EnsureLayers(lpb.EnsureLayersRequest(
            image=image, delegated=True,
            layers=[lpb.Layer(digest=layer.digest, media_type=layer.media_type, compressed_size=layer.compressed_size,
                              diff_id=layer.diff_id) for layer in resolved.layers]), timeout=120)
    digests = [layer.digest for layer in resolved.layers]
    assert len(digests) == 2
    wait_for(lambda: all(setup.holders(d) == {"store0"} for d in digests), "store0 listed as the holder")
    downloads = {d: base.registry.blob_fetches(d) for d in digests}
    assert downloads == {d: 1 for d in digests}
    peer_copies = {d.name: metric(scrape(_metrics(d)), "afsd_layerstore_layers_fetched_total", source="peer")
                   for d in setup.layerstores}

    result = sdk_reconcile(setup.proxies[0], image=image, replica=3)
    assert result == {"event": "reconciled", "image_key": f"{image}|linux/amd64", "current_replica": 3,
                      "requested_replica": 3, "ensured": True}
    for digest in digests:  # discovery says so right away: the proxy waited for the heartbeats
        assert setup.holders(digest) == {"store0", "store1", "store2"}
    assert {d: base.registry.blob_fetches(d) for d in digests} == downloads  # no new registry download
    for store in setup.layerstores[1:]:
        copied = metric(scrape(_metrics(store)), "afsd_layerstore_layers_fetched_total", source="peer")
        assert copied - peer_copies[store.name] == 2, store.name

    # The raw answer carries the placements, which afs-sdk does not show.
    with grpc.insecure_channel(setup.proxies[1].address) as channel:
        stub = afsproxy_pb2_grpc.AfsProxyStub(channel)
        again = stub.ReconcileImageReplica(afsproxy_pb2.ReconcileImageReplicaRequest(image=image, replica=3), timeout=60)
        assert (again.current_replica, again.ensured) == (3, True)
        assert sorted(p.digest for p in again.layers) == sorted(digests)
        for placement in again.layers:
            assert [(t.node_id, t.endpoint) for t in placement.instances] == \
                [(d.name, d.address) for d in setup.layerstores]
        more = stub.ReconcileImageReplica(afsproxy_pb2.ReconcileImageReplicaRequest(image=image, replica=4), timeout=60)
        assert (more.current_replica, more.requested_replica, more.ensured) == (3, 4, False)
        with pytest.raises(grpc.RpcError) as invalid:
            stub.ReconcileImageReplica(afsproxy_pb2.ReconcileImageReplicaRequest(image=image, replica=-1), timeout=60)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {d: base.registry.blob_fetches(d) for d in digests} == downloads


def _metrics(daemon: Daemon) -> str:
    address = metrics_address(daemon)
    assert address is not None, f"{daemon.name} serves no metrics"
    return address


@pytest.mark.usefixtures("dns_restored")
def test_status_counts_every_proxys_calls_once(proxy_cluster: ProxyCluster, setup: Setup) -> None:
    a, b = setup.proxies
    tools = proxy_cluster.base.images["tools"]
    long_calls = [execute_call(proxy, image=tools, cpu_cores=1, memory_mb=256, timeout_ms=600_000,
                               command=["/bin/sh", "-c", "echo started; sleep 600"]) for proxy in (a, b, b)]
    try:
        for call in long_calls:
            call.wait_for(lambda e: e.get("message") == "started")
        at_a, at_b = proxy_status(a, include_cluster=True), proxy_status(b)  # the default is true too
        assert (at_a["node_id"], at_a["local_dispatching"], at_a["cluster_dispatching"]) == ("proxy-a", 1, 3)
        assert (at_b["node_id"], at_b["local_dispatching"], at_b["cluster_dispatching"]) == ("proxy-b", 2, 3)
        for report in (at_a, at_b):  # both proxies asked both addresses, themselves included, and counted once
            assert (report["include_cluster"], report["queried_peers"], report["peer_errors"]) == (True, 2, 0)
            assert (report["local_waiting"], report["cluster_relaying"]) == (0, 3)
            assert sorted(p["node_id"] for p in report["peers"]) == ["proxy-a", "proxy-b"]
        local = proxy_status(b, include_cluster=False)
        assert (local["cluster_dispatching"], local["queried_peers"], local["peers"]) == (2, 0, [])

        # A peer address with nothing behind it, and a proxy listed twice: an error, and no double count.
        proxy_cluster.dns.set(PROXIES, [*setup.peers, "127.0.0.13"])
        report = proxy_status(a)
        assert (report["cluster_dispatching"], report["queried_peers"], report["peer_errors"]) == (3, 3, 1)
    finally:
        for call in long_calls:
            call.kill()


def test_the_http_endpoint_answers_like_the_references(setup: Setup) -> None:
    address = http_address(setup.proxies[0])
    assert proxy_status(setup.proxies[0], include_cluster=None)["include_cluster"] is True
    with urllib.request.urlopen(f"http://{address}/status?include_cluster=no", timeout=30) as response:
        assert json.loads(response.read())["include_cluster"] is False  # unparsable means false, as before
    for path in ("/dispatching", "/"):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://{address}{path}", timeout=30)
        assert missing.value.code == 404
    assert "afsd_proxy_dispatch_queue_length 0.0" in proxy_metrics(setup.proxies[0])
