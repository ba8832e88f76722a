"""The node daemon's layer leases (AttachLayer, ReleaseLayer, ListLayerLeases): one layer of an image
attached for a client that stacks layers itself (`afsd snapshotter`), over the real gRPC socket."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from afsd.api import node_pb2 as pb
from afsd.api import node_pb2_grpc as pb_grpc
from afsd.lab.daemons import Daemon
from afsd.node.records import mounted_paths
from tests.support.cluster import LocalCluster, small_image


@pytest.fixture
async def node_stub(cluster: LocalCluster) -> AsyncIterator[tuple[Daemon, pb_grpc.NodeStub]]:
    await cluster.start_discovery(1)
    (layerstore,) = await cluster.start_layerstores(1)
    node = await cluster.start_node(layerstore, extra_args=["--backend", "fanotify"])
    async with grpc.aio.insecure_channel(f"unix:{node.socket_path}") as channel:
        yield node, pb_grpc.NodeStub(channel)


async def _error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


async def test_a_leased_layer_is_shared_with_mounts_survives_a_restart_and_goes_when_released(
        cluster: LocalCluster, node_stub: tuple[Daemon, pb_grpc.NodeStub]) -> None:
    node, stub = node_stub
    image = await cluster.push("leased", small_image("leased", 2 << 20))
    bottom, top = [layer.digest for layer in image.manifests[0].layers]
    request = pb.AttachLayerRequest(lease_id="client.one", image=image.reference, layer_digest=bottom)

    lease = (await stub.AttachLayer(request)).lease
    assert lease.attached and lease.layer_digest == bottom and lease.size > 0
    assert lease.manifest_digest == image.manifests[0].digest
    assert lease.mountpoint in mounted_paths()
    with open(f"{lease.mountpoint}/etc/leased-0.txt") as handle:
        assert handle.read() == "leased layer 0\n"
    again = (await stub.AttachLayer(request)).lease   # the same id again: the same lease
    assert (again.lease_id, again.mountpoint) == (lease.lease_id, lease.mountpoint)
    other = await _error(stub.AttachLayer(pb.AttachLayerRequest(lease_id="client.one", image=image.reference,
                                                                layer_digest=top)))
    assert other.code() == grpc.StatusCode.INVALID_ARGUMENT and "holds layer" in other.details()

    # An image mount shares the layer; unmounting it leaves the leased layer attached.
    target = cluster.workdir / "rootfs"
    target.mkdir()
    assert (await cluster.afsd(node, "mount", image.reference, str(target))).returncode == 0
    assert (await cluster.afsd(node, "umount", str(target))).returncode == 0
    assert lease.mountpoint in mounted_paths()

    # A node daemon that crashes and restarts adopts the lease and its mount.
    node.kill()
    await cluster.restart(node)
    (listed,) = (await stub.ListLayerLeases(pb.ListLayerLeasesRequest(prefix="client."))).leases
    assert (listed.lease_id, listed.attached, listed.mountpoint) == ("client.one", True, lease.mountpoint)
    assert (await stub.ListLayerLeases(pb.ListLayerLeasesRequest(prefix="someone-else."))).leases == []

    assert (await stub.ReleaseLayer(pb.ReleaseLayerRequest(lease_id="client.one"))).released
    assert not (await stub.ReleaseLayer(pb.ReleaseLayerRequest(lease_id="client.one"))).released
    assert (await stub.ListLayerLeases(pb.ListLayerLeasesRequest())).leases == []
    assert [p for p in mounted_paths() if p.startswith(f"{cluster.workdir}/")] == []


async def test_bad_lease_requests_get_one_clear_status_and_attach_nothing(
        cluster: LocalCluster, node_stub: tuple[Daemon, pb_grpc.NodeStub]) -> None:
    _, stub = node_stub
    image = await cluster.push("refused", small_image("refused", 1 << 20, layers=1))
    (layer,) = [layer.digest for layer in image.manifests[0].layers]
    missing_image = f"{cluster.registry.address}/test/nothing:here"
    cases = [
        (pb.AttachLayerRequest(lease_id="../escape", image=image.reference, layer_digest=layer),
         grpc.StatusCode.INVALID_ARGUMENT, "invalid lease id"),
        (pb.AttachLayerRequest(lease_id="client.x", image=image.reference, layer_digest="sha256:zz"),
         grpc.StatusCode.INVALID_ARGUMENT, "invalid digest"),
        (pb.AttachLayerRequest(lease_id="client.x", image="Bad/Name", layer_digest=layer),
         grpc.StatusCode.INVALID_ARGUMENT, "invalid image reference"),
        (pb.AttachLayerRequest(lease_id="client.x", image=image.reference, layer_digest="sha256:" + "0" * 64),
         grpc.StatusCode.NOT_FOUND, "is not a layer of"),
        (pb.AttachLayerRequest(lease_id="client.x", image=missing_image, layer_digest=layer),
         grpc.StatusCode.NOT_FOUND, "nothing"),
        (pb.AttachLayerRequest(lease_id="client.x", image=image.reference),
         grpc.StatusCode.INVALID_ARGUMENT, "needs a lease id, an image and a layer digest"),
    ]
    for request, code, words in cases:
        error = await _error(stub.AttachLayer(request))
        assert (error.code(), words in error.details(), "\n" in error.details()) == (code, True, False), \
            (request, error.code(), error.details())
    released = await _error(stub.ReleaseLayer(pb.ReleaseLayerRequest(lease_id="a/b")))
    assert released.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await stub.ListLayerLeases(pb.ListLayerLeasesRequest())).leases == []
    assert [p for p in mounted_paths() if p.startswith(f"{cluster.workdir}/")] == []
