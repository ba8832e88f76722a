"""`afsd snapshotter` under a real containerd (Debian's 1.6): pods start from lazily attached layers.

Each test runs, as separate processes: the lab registry, discovery, a peer layerstore that has pulled
the test images, this node's `afsd node` (fanotify, --no-prefetch: only what is read is fetched),
`afsd snapshotter` and containerd (CRI plugin, the afsd snapshotter as a proxy plugin). The CRI calls
are the ones a kubelet makes, over the CRI runtime.v1 protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from afsd.api import cri_runtime_pb2 as cri
from afsd.api import node_pb2 as npb
from afsd.api import node_pb2_grpc as npb_grpc
from afsd.lab.catalogue import busybox_rootfs, seeded_bytes
from afsd.lab.containerd import (
    Containerd,
    CriClient,
    container_output,
    snapshotter_daemon,
    snapshotter_root,
    start_containerd,
)
from afsd.lab.daemons import Daemon, stop_node_daemon
from afsd.lab.layers import Entry, LayerSpec, entries_from_directory
from afsd.lab.oci_layout import ImageSpec, write_oci_layout
from afsd.lab.skopeo import PushedImage, push_layout
from afsd.node.records import mounted_paths
from afsd.snapshotter.lazy import LAZY_LAYER_LABEL
from tests.support.cluster import LocalCluster
from tests.support.containerd import SnapshotsClient
from tests.support.metrics import daemon_metrics, metric
from tests.support.treecompare import compare_trees, format_differences, snapshot
from tests.support.umoci import umoci_rootfs

DEADLINE = 120.0
UNREAD_BYTES = 32 << 20   # a file in the app layer nobody reads (a read miss also fills a few MiB ahead)
# What the container runtime puts into every container, not the image: mounts runc and the CRI
# plugin make (their mount points are created in the writable layer when the image lacks them).
RUNTIME_PATHS = ("/proc", "/sys", "/dev", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf")
APP_SCRIPT = ("cat /srv/app/hello.txt /srv/app/extra.txt; stat -c '%a %u:%g' /srv/app; "
              "test -e /usr/share/doc/busybox/README || echo README whited out; echo ready; "
              "while true; do sleep 1; cat /srv/app/hello.txt > /dev/null || echo read failed; done")
EXPECTED_OUTPUT = ["hello from a lazily attached layer", "written by a layer that does not list /srv/app",
                   "750 1234:5678", "README whited out", "ready"]


@dataclass
class Images:
    app: PushedImage
    pause: PushedImage

    def layer_digests(self) -> set[str]:
        return {layer.digest for image in (self.app, self.pause) for record in image.manifests
                for layer in record.layers}


def _push_images(cluster: LocalCluster) -> Images:
    """A busybox base layer, an application layer and a top layer that writes into /srv/app without
    listing it (the fixup must give /srv/app the app layer's owner, mode and xattr) and whites out a
    file; and a pause image (the pod sandbox's) sharing the base layer."""
    rootfs = cluster.workdir / "busybox-rootfs"
    rootfs.mkdir()
    busybox_rootfs(rootfs)
    base = LayerSpec(tuple(entries_from_directory(rootfs)))
    app = LayerSpec((Entry.dir("srv/app", mode=0o750, uid=1234, gid=5678, xattrs={"user.from": b"app layer"}),
                     Entry.file("srv/app/hello.txt", b"hello from a lazily attached layer\n"),
                     Entry.file("srv/data/unread.bin", seeded_bytes("unread", UNREAD_BYTES))), "zstd")
    top = LayerSpec((Entry.file("srv/app/extra.txt", b"written by a layer that does not list /srv/app\n"),
                     Entry.whiteout("usr/share/doc/busybox/README")), "gzip", add_parents=False)
    layouts = cluster.workdir / "layouts"
    app_layout = write_oci_layout(layouts, "app", ImageSpec((base, app, top), cmd=("/bin/sh",)))
    pause_layout = write_oci_layout(layouts, "pause", ImageSpec((base,), entrypoint=("/bin/sleep", "2147483647"),
                                                               cmd=()))
    registry = cluster.registry.address
    return Images(app=push_layout(app_layout, registry, "test/app", "v1"),
                  pause=push_layout(pause_layout, registry, "test/pause", "v1"))


@dataclass
class Node:
    """This node: the node daemon, the snapshotter and containerd."""

    cluster: LocalCluster
    images: Images
    node: Daemon
    snapshotter: Daemon
    containerd: Containerd
    cri: CriClient


@contextlib.asynccontextmanager
async def _node_stack(cluster: LocalCluster, *, peer_cache_bytes: int = 0,
                      preload: tuple[str, ...] = ("app", "pause")) -> AsyncIterator[Node]:
    """The peer layerstore (holding the `preload` images), then this node's daemons."""
    await cluster.start_discovery(1)
    (peer,) = await cluster.start_layerstores(1, cache_max_bytes=peer_cache_bytes)
    images = await asyncio.to_thread(_push_images, cluster)
    for name in preload:
        await cluster.pull(peer, getattr(images, name))
    node_daemon = await cluster.start_node(None, extra_args=["--no-prefetch", "--backend", "fanotify"])
    snapshotter = snapshotter_daemon(cluster.workdir, "snapshotter", node_daemon.socket_path)
    containerd = None
    cri_client = None
    try:
        await asyncio.to_thread(snapshotter.start)
        containerd = await asyncio.to_thread(
            start_containerd, snapshotter_socket=snapshotter.socket_path, registry=cluster.registry.address,
            sandbox_image=images.pause.reference)
        cri_client = CriClient(containerd)
        yield Node(cluster, images, node_daemon, snapshotter, containerd, cri_client)
    finally:
        if cri_client is not None:
            await cri_client.close()
        if containerd is not None:   # what a test leaves running (it failed) is removed by force
            await asyncio.to_thread(containerd.stop)
        snapshotter.stop()
        await asyncio.to_thread(stop_node_daemon, node_daemon)


@pytest.fixture
async def node(cluster: LocalCluster) -> AsyncIterator[Node]:
    async with _node_stack(cluster) as stack:
        yield stack


def _app_command(script: str = APP_SCRIPT) -> list[str]:
    return ["/bin/sh", "-c", script]


async def _run_app_pod(node: Node, name: str) -> tuple[cri.PodSandboxConfig, str, str]:
    """Pull the app image, run a pod and the app container, as a kubelet does, and check its output:
    (pod config, pod id, app container id)."""
    assert (await node.cri.pull(node.images.app.reference)).startswith("sha256:")
    pod = node.cri.pod_config(name, node.cluster.workdir / "pod-logs" / name)
    pod_id = await node.cri.run_pod(pod)
    app_id = await node.cri.start_container(pod_id, pod, "app", node.images.app.reference, _app_command())
    await node.cluster.wait_until(lambda: "ready" in container_output(pod, "app"), DEADLINE,
                                  "the container to print its output")
    assert container_output(pod, "app")[:len(EXPECTED_OUTPUT)] == EXPECTED_OUTPUT
    return pod, pod_id, app_id


async def _node_leases(node: Node) -> list[npb.LayerLease]:
    async with grpc.aio.insecure_channel(f"unix:{node.node.socket_path}") as channel:
        return list((await npb_grpc.NodeStub(channel).ListLayerLeases(npb.ListLayerLeasesRequest())).leases)


def _image_tree(root: Path | str) -> dict:
    """A snapshot of a root filesystem without what the runtime adds to every container."""
    tree = snapshot(root)
    return {path: node for path, node in tree.items()
            if not any(path == p or path.startswith(p + "/") for p in RUNTIME_PATHS)}


async def _check_rootfs_is_umocis(node: Node, pid: int) -> None:
    """The container's root filesystem (seen through its init's /proc/PID/root) is the app image as
    `umoci unpack` makes it."""
    image = node.images.app
    expected = await asyncio.to_thread(umoci_rootfs, image, image.platforms[0], node.cluster.workdir / "umoci")
    differences = compare_trees(await asyncio.to_thread(_image_tree, f"/proc/{pid}/root/"),   # the slash: the
                                await asyncio.to_thread(_image_tree, expected),              # root, not the link
                                labels=("container", "umoci"))
    assert differences == [], format_differences(differences, ("container", "umoci"))


async def test_a_pod_starts_from_lazily_attached_layers_as_a_kubelet_drives_it(node: Node) -> None:
    cluster, images = node.cluster, node.images
    blob_gets_before = len(cluster.registry.access_log())

    pod, pod_id, app_id = await _run_app_pod(node, "lazy-pod")

    # No layer came from the registry: every layer snapshot is one afsd attached.
    layer_gets = [e for e in cluster.registry.access_log()[blob_gets_before:]
                  if "/blobs/" in e.uri and e.uri.rsplit("/", 1)[-1] in images.layer_digests()]
    assert layer_gets == [], f"containerd downloaded layers: {layer_gets}"
    listed = node.containerd.ctr("snapshots", "--snapshotter", "afsd", "ls")
    committed = [line for line in listed.stdout.splitlines()[1:] if "Committed" in line]
    assert len(committed) == 3, listed.stdout   # base, app, top (the pause image shares the base)
    snapshots = SnapshotsClient(node.snapshotter)
    try:
        lazy = [info for info in await snapshots.list("kind==committed") if LAZY_LAYER_LABEL in info.labels]
        assert len(lazy) == 3, lazy
        snapshotter_metrics = await asyncio.to_thread(daemon_metrics, node.snapshotter)
        assert metric(snapshotter_metrics, "afsd_snapshotter_layers_total", path="lazy") == 3
        assert metric(snapshotter_metrics, "afsd_snapshotter_layers_total", path="fallback") == 0

        # The node read only what the container touched: the unread 8 MiB stayed behind.
        async def filled_from_peer() -> float:
            return metric(await asyncio.to_thread(daemon_metrics, node.node), "afsd_fanotify_bytes_filled_peer_total")
        await cluster.wait_until(filled_from_peer, DEADLINE, "the node's /metrics to count bytes read from the peer")
        filled = await filled_from_peer()
        leases = await _node_leases(node)
        total = sum(lease.size for lease in leases)
        assert len(leases) == 3 and filled < total - UNREAD_BYTES / 2, \
            f"{filled:.0f} of {total} bytes read from the peer"

        pid = await node.cri.running_pid(app_id)
        await _check_rootfs_is_umocis(node, pid)

        # A snapshotter that crashes and comes back leaves the running container alone, and serves
        # containerd again: a second container of the pod starts from the same lazy layers.
        node.snapshotter.kill()
        await asyncio.to_thread(node.snapshotter.start)
        assert (await node.cri.running_pid(app_id)) == pid
        # containerd redials a proxy plugin with a backoff of up to 3 s (a kubelet would retry meanwhile).
        def reaches_the_snapshotter() -> bool:
            return node.containerd.ctr("snapshots", "--snapshotter", "afsd", "ls").returncode == 0
        await cluster.wait_until(reaches_the_snapshotter, DEADLINE, "containerd to reach the restarted snapshotter")
        later_id = await node.cri.start_container(pod_id, pod, "later", images.app.reference,
                                                  _app_command("cat /srv/app/extra.txt"))
        await cluster.wait_until(lambda: container_output(pod, "later"), DEADLINE, "the second container's output")
        assert container_output(pod, "later") == ["written by a layer that does not list /srv/app"]
        assert "read failed" not in container_output(pod, "app")
        assert (await node.cri.running_pid(app_id)) == pid

        # Removing the pod and its images, then Cleanup, leaves no snapshot, mount or lease behind.
        await node.cri.remove_pod(pod_id, [app_id, later_id])
        for image in (images.app, images.pause):
            await node.cri.remove_image(image.reference)
        await snapshots.cleanup()
        assert await snapshots.list() == []
        listed = node.containerd.ctr("snapshots", "--snapshotter", "afsd", "ls")
        assert listed.returncode == 0 and listed.stdout.splitlines()[1:] == [], listed.stdout
        assert await _node_leases(node) == []
        containerd_leases = node.containerd.ctr("leases", "ls")
        assert containerd_leases.returncode == 0 and containerd_leases.stdout.splitlines()[1:] == [], \
            containerd_leases.stdout
        await cluster.wait_until(lambda: node.containerd.leftovers() == [], DEADLINE,
                                 "the pod's shim, mounts and cgroups to go")
        assert [p for p in mounted_paths() if p.startswith(f"{cluster.workdir}/")] == []
        assert list((snapshotter_root(node.snapshotter) / "snapshots").iterdir()) == []
    finally:
        await snapshots.close()


async def test_ctr_pull_and_run_without_cri_labels_take_containerds_own_unpack_path(node: Node) -> None:
    containerd, image = node.containerd, node.images.app
    namespace = f"afsd-test-{containerd.token}"
    registry_entries = len(node.cluster.registry.access_log())
    pulled = await asyncio.to_thread(containerd.ctr, "image", "pull", "--plain-http", "--snapshotter", "afsd",
                                     image.reference, namespace=namespace)
    assert pulled.returncode == 0, pulled.stderr
    # Without the CRI's labels afsd cannot tell which image a layer belongs to: containerd downloads
    # every layer and unpacks it into a plain snapshot of the afsd snapshotter.
    layer_gets = {e.uri.rsplit("/", 1)[-1] for e in node.cluster.registry.access_log()[registry_entries:]
                  if "/blobs/" in e.uri and e.method == "GET"}
    assert {layer.digest for layer in image.manifests[0].layers} <= layer_gets
    snapshots = SnapshotsClient(node.snapshotter)
    try:
        committed = await snapshots.list("kind==committed")
        assert len(committed) == 3 and not any(LAZY_LAYER_LABEL in info.labels for info in committed), committed
        assert await _node_leases(node) == []

        ran = await asyncio.to_thread(
            containerd.ctr, "run", "--rm", "--snapshotter", "afsd",
            "--runc-root", str(containerd.runc_root / namespace),
            "--fifo-dir", str(containerd.fifo_dir), "--cgroup", f"{containerd.cgroup_parent}/ctr-run",
            image.reference, "ctr-run", "/bin/sh", "-c", APP_SCRIPT.split("; while")[0], namespace=namespace)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.splitlines() == EXPECTED_OUTPUT

        removed = await asyncio.to_thread(containerd.ctr, "image", "rm", "--sync", image.reference,
                                          namespace=namespace)
        assert removed.returncode == 0, removed.stderr
        await snapshots.cleanup()
        assert await snapshots.list() == []
        assert list((snapshotter_root(node.snapshotter) / "snapshots").iterdir()) == []
        await node.cluster.wait_until(lambda: containerd.leftovers() == [], DEADLINE,
                                      "the container's shim, mounts and cgroups to go")
    finally:
        await snapshots.close()


async def test_layers_afsd_cannot_serve_are_unpacked_by_containerd_above_the_lazy_ones(cluster: LocalCluster) -> None:
    # The peer's cache holds the pause image (the shared base layer) but cannot take the app layer:
    # nobody can serve the app image's upper layers, so containerd downloads and unpacks them on top
    # of the lazily attached base.
    async with _node_stack(cluster, peer_cache_bytes=UNREAD_BYTES // 2, preload=("pause",)) as node:
        images = node.images
        base, *uppers = [layer.digest for layer in images.app.manifests[0].layers]
        registry_entries = len(cluster.registry.access_log())
        _, pod_id, app_id = await _run_app_pod(node, "mixed-pod")

        fetched = {e.uri.rsplit("/", 1)[-1] for e in cluster.registry.access_log()[registry_entries:]
                   if "/blobs/" in e.uri and e.method == "GET"}
        assert base not in fetched and set(uppers) <= fetched, fetched
        snapshots = SnapshotsClient(node.snapshotter)
        try:
            committed = await snapshots.list("kind==committed")
        finally:
            await snapshots.close()
        kinds = sorted(info.labels.get(LAZY_LAYER_LABEL, "plain") for info in committed)
        assert kinds == sorted([base, "plain", "plain"]), kinds

        await _check_rootfs_is_umocis(node, await node.cri.running_pid(app_id))
        await node.cri.remove_pod(pod_id, [app_id])
