"""Image metadata leaves the registry once per cluster, like layers: re-resolving a tag whose manifest has
not changed costs one manifest request and no config download (in discovery and in a layerstore),
resolving by digest what a tag led to costs nothing, a config some layerstore holds comes from it, and a
moved tag still gets its new config. Counted in the real registry's access log."""

from __future__ import annotations

import asyncio
import shutil

import grpc

from afsd.api import discovery_pb2 as dpb
from afsd.api import discovery_pb2_grpc as dgrpc
from afsd.api import layerstore_pb2 as lpb
from afsd.api import layerstore_pb2_grpc as lgrpc
from afsd.lab.catalogue import busybox_layers
from afsd.lab.daemons import afslet_daemon, stop_daemon
from afsd.lab.oci_layout import ImageSpec, write_oci_layout
from afsd.lab.skopeo import PushedImage, push_layout
from afsd.oci.digest import digest_bytes
from afsd.rpc import new_server
from tests.support.afslet import sweep_afslet
from tests.support.cluster import LocalCluster, small_image


def registry_gets(cluster: LocalCluster, since: int) -> list[str]:
    """The paths of the GETs the registry served after its `since`-th request (`/v2/...`)."""
    return [e.uri for e in cluster.registry.access_log()[since:] if e.method == "GET"]


def kinds(uris: list[str]) -> list[str]:
    """`manifests/<tag or digest>` or `blobs/<digest>` for each request path (`/v2/` pings left out)."""
    return [f"{kind}/{uri.rsplit('/', 1)[1]}" for uri in uris for kind in ("manifests", "blobs") if f"/{kind}/" in uri]


async def push_to(cluster: LocalCluster, layout_name: str, repository: str, layers, tag: str = "v1",
                  cmd: tuple[str, ...] = ("/bin/sh",)) -> PushedImage:
    """Push an image to `test/<repository>:<tag>` from its own layout (a second push moves the tag)."""
    def build_and_push() -> PushedImage:
        layout = write_oci_layout(cluster.workdir / "layouts" / layout_name, tag, ImageSpec(layers, cmd=cmd))
        return push_layout(layout, cluster.registry.address, f"test/{repository}", tag)
    return await asyncio.to_thread(build_and_push)


def config_of(image: PushedImage) -> str:
    return image.manifests[0].config_digest


async def test_discovery_re_resolves_a_tag_with_one_manifest_request_and_a_digest_with_none(
        cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1)
    image = await push_to(cluster, "first", "retag", small_image("first", 1 << 16))
    stub = cluster.discovery(discovery)
    first = await stub.ResolveImage(dpb.ResolveImageRequest(image=image.reference))
    assert first.config_digest == config_of(image) and digest_bytes(first.config) == config_of(image)

    before = len(cluster.registry.access_log())
    again = await stub.ResolveImage(dpb.ResolveImageRequest(image=image.reference, force_refresh=True))
    assert kinds(registry_gets(cluster, before)) == ["manifests/v1"]   # the digest compared, nothing else
    assert (again.manifest_digest, again.config) == (first.manifest_digest, first.config)

    before = len(cluster.registry.access_log())
    pinned = await stub.ResolveImage(dpb.ResolveImageRequest(image=f"{image.registry}/{image.repository}@{image.digest}"))
    assert registry_gets(cluster, before) == []    # what the tag led to: no request at all
    assert [layer.digest for layer in pinned.layers] == [layer.digest for layer in first.layers]

    moved = await push_to(cluster, "second", "retag", small_image("second", 1 << 16), cmd=("/bin/true",))
    before = len(cluster.registry.access_log())
    after_move = await stub.ResolveImage(dpb.ResolveImageRequest(image=image.reference, force_refresh=True))
    assert kinds(registry_gets(cluster, before)) == ["manifests/v1", f"blobs/{config_of(moved)}"]
    assert after_move.manifest_digest == moved.digest != first.manifest_digest
    assert list(after_move.runtime_config.cmd) == ["/bin/true"]


async def test_a_layerstore_re_resolving_by_itself_fetches_a_config_once_even_across_restarts(
        cluster: LocalCluster) -> None:
    # No discovery: the layerstore resolves with its own registry client, every time (--resolve-ttl 0).
    (store,) = await cluster.start_layerstores(1, discovery_endpoints=[], extra_args=["--resolve-ttl", "0"])
    image = await push_to(cluster, "first", "solo", small_image("solo", 1 << 16))
    before = len(cluster.registry.access_log())
    await cluster.pull(store, image)
    assert kinds(registry_gets(cluster, before)).count(f"blobs/{config_of(image)}") == 1

    before = len(cluster.registry.access_log())
    await cluster.pull(store, image)
    await store_restarted(cluster, store)   # the config is kept beside the cache
    await cluster.pull(store, image)
    assert kinds(registry_gets(cluster, before)) == ["manifests/v1", "manifests/v1"]
    kept = await cluster.layerstore(store).ReadImageConfig(lpb.ReadImageConfigRequest(digest=config_of(image)))
    assert digest_bytes(kept.data) == config_of(image)

    moved = await push_to(cluster, "second", "solo", small_image("moved", 1 << 16))
    before = len(cluster.registry.access_log())
    pulled = await cluster.pull(store, image)
    assert pulled.manifest_digest == moved.digest
    assert kinds(registry_gets(cluster, before)).count(f"blobs/{config_of(moved)}") == 1


async def store_restarted(cluster: LocalCluster, store) -> None:
    store.stop()
    await cluster.restart(store)


async def test_a_restarted_discovery_gets_a_config_from_a_layerstore_that_holds_the_image(
        cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1)
    (store,) = await cluster.start_layerstores(1)
    image = await push_to(cluster, "first", "kept", small_image("kept", 1 << 16))
    await cluster.pull(store, image)   # through discovery, which hands the config to the layerstore

    discovery.stop()                   # forgets everything it resolved
    await cluster.restart(discovery)
    await cluster.wait_registered(1)
    before = len(cluster.registry.access_log())
    resolved = await cluster.discovery(discovery).ResolveImage(dpb.ResolveImageRequest(image=image.reference))
    assert kinds(registry_gets(cluster, before)) == ["manifests/v1"]
    assert digest_bytes(resolved.config) == config_of(image)
    assert "came from layerstore" in discovery.log()


class LyingLayerStore(lgrpc.LayerStoreServicer):
    """A peer that claims to hold an image's layers and answers ReadImageConfig with other bytes."""

    async def ReadImageConfig(self, request: lpb.ReadImageConfigRequest,
                              context: grpc.aio.ServicerContext) -> lpb.ReadImageConfigResponse:
        return lpb.ReadImageConfigResponse(digest=request.digest, data=b'{"config": {"Cmd": ["/bin/evil"]}}')


async def test_a_config_from_a_lying_peer_is_refused_and_fetched_from_the_registry(cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1)
    image = await push_to(cluster, "first", "lied", small_image("lied", 1 << 16))
    liar = new_server()
    lgrpc.add_LayerStoreServicer_to_server(LyingLayerStore(), liar)
    port = liar.add_insecure_port("127.0.0.1:0")
    await liar.start()
    try:
        layers = [layer.digest for layer in image.manifests[0].layers]
        await cluster.discovery(discovery).Heartbeat(dpb.HeartbeatRequest(
            node_id="liar", endpoint=f"127.0.0.1:{port}", layer_digests=layers))
        before = len(cluster.registry.access_log())
        resolved = await cluster.discovery(discovery).ResolveImage(dpb.ResolveImageRequest(image=image.reference))
        assert kinds(registry_gets(cluster, before)) == ["manifests/v1", f"blobs/{config_of(image)}"]
        assert list(resolved.runtime_config.cmd) == ["/bin/sh"] and digest_bytes(resolved.config) == config_of(image)
        assert "other bytes" in discovery.log()
    finally:
        await liar.stop(0)


async def test_execute_on_another_node_by_tag_and_by_digest_downloads_nothing_from_the_registry(
        cluster: LocalCluster) -> None:
    """Node A pulls an image; node B runs it by tag, then pinned by digest: its config, manifests and
    layers come from the cluster, and the registry serves no blob (the flow `afsd demo` shows)."""
    (discovery,) = await cluster.start_discovery(1)
    store_a, store_b = await cluster.start_layerstores(2)
    scratch = cluster.workdir / "busybox-scratch"
    scratch.mkdir()
    image = await push_to(cluster, "busybox", "busybox", busybox_layers(scratch), cmd=("/srv/app/run.sh",))
    shutil.rmtree(scratch)
    await cluster.pull(store_a, image)
    node_b = await cluster.start_node(store_b)
    afslet = afslet_daemon(cluster.workdir, "afslet-b", node_b, [discovery.address])
    try:
        await asyncio.to_thread(afslet.start)
        before = len(cluster.registry.access_log())
        pinned = f"{image.registry}/{image.repository}@{image.digest}"
        for reference in (image.reference, pinned):
            ran = await cluster.afsd(None, "run", "--target", afslet.address, "--memory-mb", "64", reference)
            assert ran.returncode == 0, ran.stderr
            assert "running on Linux" in ran.stdout
        blobs = [uri for uri in registry_gets(cluster, before) if "/blobs/" in uri]
        assert blobs == [], f"node b fetched from the registry: {blobs}"
    finally:
        await asyncio.to_thread(stop_daemon, afslet)
        await asyncio.to_thread(sweep_afslet, afslet)

