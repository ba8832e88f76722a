"""Mutual TLS on every daemon: discovery, layerstore, afslet and proxy run with certificates from a test
cluster CA (afsd/lab/pki.py), as separate processes on loopback; clients without a certificate, with
one from another CA, or with the wrong role or name are refused, and the afs-sdk client runs a command
through the proxy and an afslet with a user certificate."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from afsd.api import afslet_pb2, afslet_pb2_grpc
from afsd.api import discovery_pb2 as dpb
from afsd.api import discovery_pb2_grpc as dgrpc
from afsd.api import layerstore_pb2 as lpb
from afsd.api import layerstore_pb2_grpc as lgrpc
from afsd.lab.catalogue import busybox_layers
from afsd.lab.daemons import (
    SHORT_STOP_TIMEOUTS,
    Daemon,
    afsd_command,
    afslet_daemon,
    discovery_daemon,
    layerstore_daemon,
    node_daemon,
    proxy_daemon,
    start_all,
    stop_daemon,
)
from afsd.lab.oci_layout import ImageSpec, write_oci_layout
from afsd.lab.pki import LabPki
from afsd.lab.registry import RegistryProcess, start_registry
from afsd.lab.skopeo import push_layout
from afsd.rpc import open_channel
from afsd.trust.tls import TlsConfig
from tests.support.afslet import SdkCall
from tests.support.cluster import unmount_everything_under
from tests.support.metrics import daemon_metrics, metric

pytestmark = pytest.mark.slow


@dataclass
class TlsCluster:
    workdir: Path
    registry: RegistryProcess
    pki: LabPki
    discovery: Daemon
    layerstore: Daemon
    node: Daemon
    afslet: Daemon
    proxy: Daemon
    image: str

    def tls(self, name: str, *hosts: str) -> TlsConfig:
        return TlsConfig.from_dir(self.pki.node(name, *hosts))

    def user(self, name: str = "alice") -> TlsConfig:
        return TlsConfig.from_dir(self.pki.user(name))

    def stop(self) -> None:
        for daemon in (self.proxy, self.afslet, self.node, self.layerstore, self.discovery):
            stop_daemon(daemon)
        self.registry.stop()
        unmount_everything_under(self.workdir)


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCluster]:
    """Every daemon on its own loopback address with a node certificate for it: discovery 127.0.0.1,
    layerstore 127.0.0.2, afslet 127.0.0.3, proxy 127.0.0.4 (the node daemon only dials out)."""
    workdir = tmp_path_factory.mktemp("tls")
    registry = start_registry(workdir / "registry")
    pki = LabPki(workdir / "pki")
    registry_args = ["--insecure-registry", registry.address]
    started: list[Daemon] = []
    try:
        discovery = discovery_daemon(workdir, "discovery0", registry_args=registry_args,
                                     tls_dir=pki.node("discovery0", "127.0.0.1"))
        layerstore = layerstore_daemon(workdir, "store0", [discovery.address], heartbeat_period=1.0,
                                       registry_args=registry_args, host="127.0.0.2",
                                       tls_dir=pki.node("store0", "127.0.0.2"))
        start_all([discovery, layerstore])
        started += [discovery, layerstore]
        node = node_daemon(workdir, "node0", [discovery.address], layerstore=layerstore, tls_dir=pki.node("node0"))
        node.start()
        started.append(node)
        afslet = afslet_daemon(workdir, "afslet0", node, [discovery.address], host="127.0.0.3",
                               stop_timeouts=SHORT_STOP_TIMEOUTS, extra_args=["--mount-backend", "eager"],
                               tls_dir=pki.node("afslet0", "127.0.0.3"))
        proxy = proxy_daemon(workdir, "proxy0", afslet.address, host="127.0.0.4",
                             discovery_target=discovery.address, tls_dir=pki.node("proxy0", "127.0.0.4"))
        start_all([afslet, proxy])
        started += [afslet, proxy]
        scratch = workdir / "scratch"
        scratch.mkdir()
        layout = write_oci_layout(workdir / "layout", "v1", ImageSpec(busybox_layers(scratch)))
        image = push_layout(layout, registry.address, "tls/busybox", "v1").reference
    except BaseException:
        for daemon in reversed(started):
            stop_daemon(daemon)
        registry.stop()
        unmount_everything_under(workdir)
        raise
    cluster = TlsCluster(workdir, registry, pki, discovery, layerstore, node, afslet, proxy, image)
    try:
        yield cluster
    finally:
        cluster.stop()


def _probes(cluster: TlsCluster) -> dict[str, tuple[str, object]]:
    """daemon -> (address, a call that reads something harmless, given a channel)."""
    return {
        "discovery": (cluster.discovery.address,
                      lambda ch: dgrpc.ServiceDiscoveryStub(ch).FindProvider(dpb.FindProviderRequest(), timeout=10)),
        "layerstore": (cluster.layerstore.address,
                       lambda ch: lgrpc.LayerStoreStub(ch).HasLayer(lpb.HasLayerRequest(digest="sha256:" + "0" * 64),
                                                                    timeout=10)),
        "afslet": (cluster.afslet.address,
                   lambda ch: afslet_pb2_grpc.AfsletStub(ch).GetRuntimeStatus(afslet_pb2.GetRuntimeStatusRequest(),
                                                                              timeout=10)),
        "proxy": (cluster.proxy.address,
                  lambda ch: afslet_pb2_grpc.AfsletStub(ch).GetRuntimeStatus(afslet_pb2.GetRuntimeStatusRequest(),
                                                                             timeout=10)),
    }


async def _call(address: str, probe, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    channel = grpc.aio.secure_channel(address, credentials) if credentials else grpc.aio.insecure_channel(address)
    async with channel:
        try:
            await probe(channel)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def test_every_daemon_refuses_clients_without_a_certificate_of_its_ca(tls_cluster: TlsCluster) -> None:
    ca = tls_cluster.pki.ca.read_bytes()
    stranger = TlsConfig.from_dir(LabPki(tls_cluster.workdir / "other-ca").node("operator"))
    member = tls_cluster.tls("operator")
    answers = {}
    for name, (address, probe) in _probes(tls_cluster).items():
        answers[name] = {
            "member": await _call(address, probe, member.channel_credentials()),
            "plaintext": await _call(address, probe, None),
            "no certificate": await _call(address, probe, grpc.ssl_channel_credentials(root_certificates=ca)),
            # trusts the cluster CA for the server, presents a certificate of another CA
            "other CA": await _call(address, probe, grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=stranger.key_pem, certificate_chain=stranger.cert_pem)),
            # a server is checked too: a client trusting only another CA does not talk to it
            "trusting another CA": await _call(address, probe, stranger.channel_credentials()),
        }
    for name, by_client in answers.items():
        assert by_client["member"] == grpc.StatusCode.OK, (name, by_client)
        # The handshake itself is refused (gRPC Python cannot make a client certificate optional), so no
        # call reaches the service: the client sees the connection fail.
        assert {by_client[k] for k in by_client if k != "member"} == {grpc.StatusCode.UNAVAILABLE}, (name, by_client)


async def test_cluster_services_take_node_certificates_and_user_facing_ones_users_too(tls_cluster: TlsCluster) -> None:
    user = tls_cluster.user()
    for name, (address, probe) in _probes(tls_cluster).items():
        async with open_channel(address, user) as channel:
            try:
                await probe(channel)
                code, details = grpc.StatusCode.OK, ""
            except grpc.aio.AioRpcError as error:
                code, details = error.code(), error.details()
        if name in ("discovery", "layerstore"):
            assert code == grpc.StatusCode.PERMISSION_DENIED, (name, code)
            assert "needs a certificate with role afsd:nodes; alice (afsd:users) has none" in details
        else:
            assert code == grpc.StatusCode.OK, (name, code, details)
    # Cache control too: a user may not prune a layerstore's cache or pin its layers.
    async with open_channel(tls_cluster.layerstore.address, user) as channel:
        for call in (lgrpc.LayerStoreStub(channel).PruneCache(lpb.PruneCacheRequest(percent=100), timeout=10),
                     lgrpc.LayerStoreStub(channel).AcquireLayerLease(
                         lpb.AcquireLayerLeaseRequest(digests=["sha256:" + "0" * 64]), timeout=10)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_node_certificate_heartbeats_only_for_its_own_node_and_hosts(tls_cluster: TlsCluster) -> None:
    store = tls_cluster.layerstore
    stub_for = lambda tls: dgrpc.ServiceDiscoveryStub(open_channel(tls_cluster.discovery.address, tls))  # noqa: E731
    refusals = {
        # store0's own certificate, speaking for another node
        "another node id": (tls_cluster.tls("store0", "127.0.0.2"),
                             dpb.HeartbeatRequest(node_id="store9", endpoint="127.0.0.2:1")),
        # a real node, claiming store0's endpoint: its certificate does not cover 127.0.0.2
        "another node's host": (tls_cluster.tls("intruder", "127.0.0.9"),
                                dpb.HeartbeatRequest(node_id="intruder", endpoint=store.address)),
        # a node on the same host as store0, claiming the endpoint store0 holds
        "another node's endpoint": (tls_cluster.tls("twin", "127.0.0.2"),
                                    dpb.HeartbeatRequest(node_id="twin", endpoint=store.address)),
    }
    for what, (tls, heartbeat) in refusals.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub_for(tls).Heartbeat(heartbeat, timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, (what, refused.value)
    reply = await stub_for(tls_cluster.tls("twin", "127.0.0.2")).Heartbeat(
        dpb.HeartbeatRequest(node_id="twin", endpoint="127.0.0.2:9"), timeout=10)
    assert reply.expires_in_seconds > 0
    listed = await stub_for(tls_cluster.tls("operator")).FindProvider(dpb.FindProviderRequest(), timeout=10)
    assert {(s.node_id, s.endpoint) for s in listed.services} == {("store0", store.address), ("twin", "127.0.0.2:9")}


def _sdk(address: str, tls: dict | None, token: str = "", **fields: object) -> list[dict]:
    request = {"address": address, "op": "execute", "input": fields, "tls": tls, "token": token}
    return SdkCall(request).finish(timeout=300).events


def test_afs_sdk_executes_through_the_proxy_and_the_afslet_with_a_user_certificate(tls_cluster: TlsCluster) -> None:
    user = tls_cluster.user()
    with_cert = {"ca": str(user.ca_path), "cert": str(user.cert_path), "key": str(user.key_path)}
    for daemon in (tls_cluster.proxy, tls_cluster.afslet):
        events = _sdk(daemon.address, with_cert, image=tls_cluster.image, command=("/bin/echo", "over TLS"),
                      cpu_cores=1, memory_mb=64)
        assert {"event": "log", "source": "runc:stdout", "message": "over TLS"} in events, events
        assert [e["exit_code"] for e in events if e["event"] == "result"] == [0], events
        refused = _sdk(daemon.address, {"ca": str(user.ca_path)}, image=tls_cluster.image, command=("/bin/true",))
        assert [e["event"] for e in refused] == ["error"], refused
        assert not any(e["event"] == "result" for e in refused)


def test_afsd_run_and_ps_need_the_users_certificate(tls_cluster: TlsCluster) -> None:
    user_dir = str(tls_cluster.pki.user("alice"))
    ran = afsd_command("run", "--target", tls_cluster.proxy.address, "--tls-dir", user_dir, "--memory-mb", "64",
                       tls_cluster.image, "--", "/bin/echo", "hello")
    assert ran.returncode == 0 and ran.stdout == "hello\n", ran.stderr
    listed = afsd_command("ps", "-a", "--json", "--target", tls_cluster.proxy.address, "--tls-dir", user_dir)
    assert listed.returncode == 0, listed.stderr
    assert any(e["command"] == ["/bin/echo", "hello"] for e in json.loads(listed.stdout)["executions"])
    refused = afsd_command("run", "--target", tls_cluster.proxy.address, tls_cluster.image, "--", "/bin/true")
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode != 0 and len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "--tls-dir" in lines[0]


async def test_blobs_carry_descriptors_signed_by_their_converter_and_the_node_verifies_them(
        tls_cluster: TlsCluster) -> None:
    from afsd.trust.descriptors import BlobTrust

    operator = tls_cluster.tls("operator")
    async with open_channel(tls_cluster.layerstore.address, operator) as channel:
        pulled = await lgrpc.LayerStoreStub(channel).PullImage(lpb.PullImageRequest(image=tls_cluster.image),
                                                               timeout=300)
        for layer in pulled.layers:
            stat = await lgrpc.LayerStoreStub(channel).StatLayer(lpb.StatLayerRequest(digest=layer.digest))
            descriptor = BlobTrust(operator).verified_descriptor(stat, layer.digest, peer="store0",
                                                                 diff_id=layer.diff_id)
            assert descriptor is not None and descriptor.signer == "store0"
            assert descriptor.blob_digest == layer.blob_digest
    target = tls_cluster.workdir / "rootfs"
    target.mkdir(exist_ok=True)
    mounted = await asyncio.to_thread(afsd_command, "mount", "--socket", str(tls_cluster.node.socket_path),
                                      tls_cluster.image, str(target))
    assert mounted.returncode == 0, mounted.stderr
    assert (target / "bin/busybox").exists()
    assert (await asyncio.to_thread(afsd_command, "umount", "--socket", str(tls_cluster.node.socket_path),
                                    str(target))).returncode == 0
    # The node read the blob bytes over the layerstore's data listener, which speaks TLS like its gRPC port.
    assert "byte-stream data listener on 127.0.0.2:" in tls_cluster.layerstore.log()
    assert "(TLS)" in tls_cluster.layerstore.log().split("byte-stream data listener on", 1)[1].splitlines()[0]
    served = metric(await asyncio.to_thread(daemon_metrics, tls_cluster.layerstore),
                    "afsd_layerstore_stream_bytes_served_total")
    assert served > 0


def test_a_proxy_serving_users_by_bearer_token(tls_cluster: TlsCluster) -> None:
    workdir = tls_cluster.workdir
    tokens = workdir / "user-tokens"
    tokens.write_text("# NAME TOKEN\nalice s3cret-token-of-alice-0123\n")
    tokens.chmod(0o600)
    alice = workdir / "alice.token"
    alice.write_text("s3cret-token-of-alice-0123\n")
    wrong = workdir / "wrong.token"
    wrong.write_text("not-a-token-this-proxy-knows\n")
    proxy = proxy_daemon(workdir, "proxy-tokens", tls_cluster.afslet.address, host="127.0.0.4",
                         tls_dir=tls_cluster.pki.node("proxy-tokens", "127.0.0.4"),
                         extra_args=["--user-token-file", str(tokens)])
    proxy.start()
    try:
        ca = str(tls_cluster.pki.ca)
        ran = afsd_command("run", "--target", proxy.address, "--tls-ca", ca, "--token-file", str(alice),
                           "--memory-mb", "64", tls_cluster.image, "--", "/bin/echo", "by token")
        assert ran.returncode == 0 and ran.stdout == "by token\n", ran.stderr
        for token_args in (["--token-file", str(wrong)], []):
            refused = afsd_command("run", "--target", proxy.address, "--tls-dir", str(tls_cluster.pki.user("alice")),
                                   *token_args, tls_cluster.image, "--", "/bin/true")
            assert refused.returncode != 0 and "needs `authorization: Bearer TOKEN`" in refused.stderr, refused.stderr
        events = _sdk(proxy.address, {"ca": ca}, token="s3cret-token-of-alice-0123", image=tls_cluster.image,
                      command=("/bin/echo", "sdk by token"), cpu_cores=1, memory_mb=64)
        assert {"event": "log", "source": "runc:stdout", "message": "sdk by token"} in events, events
        refused = _sdk(proxy.address, {"ca": ca}, image=tls_cluster.image, command=("/bin/true",))
        assert [(e["event"], e["status"]) for e in refused] == [("error", "UNAUTHENTICATED")], refused
    finally:
        proxy.stop()
