"""`afsd demo`: the whole system on one machine, on loopback, with real parts.

A local registry (Debian's docker-registry) gets a small runnable image (busybox); a cluster of one
discovery replica and two layerstores (separate processes) pulls it: the first node from the registry,
the second from its peer; then the image's rootfs is mounted from the second node's erofs blobs
(overlayfs over file-backed erofs) and a command runs inside it with chroot. Each step prints what
happened and how long it took. Everything started is stopped and unmounted at the end.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc

from afsd.api import layerstore_pb2 as lpb
from afsd.api import layerstore_pb2_grpc as lgrpc
from afsd.erofs.stack import StackLayer, mount_image_stack
from afsd.lab.catalogue import busybox_layers
from afsd.lab.daemons import Daemon, discovery_daemon, layerstore_daemon, start_all
from afsd.lab.oci_layout import ImageSpec, write_oci_layout
from afsd.lab.registry import RegistryProcess, start_registry
from afsd.lab.skopeo import push_layout


class _Steps:
    def __init__(self) -> None:
        self.started = time.monotonic()

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        print(f"==> {title}", flush=True)
        begun = time.monotonic()
        yield
        print(f"    done in {time.monotonic() - begun:.2f}s", flush=True)


def _blob_gets(registry: RegistryProcess) -> int:
    return sum(1 for e in registry.access_log() if e.method == "GET" and "/blobs/" in e.uri and e.status == 200)


async def _pull(daemon: Daemon, reference: str) -> lpb.PullImageResponse:
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        return await lgrpc.LayerStoreStub(channel).PullImage(lpb.PullImageRequest(image=reference), timeout=600)


async def _stat(daemon: Daemon, digest: str) -> lpb.StatLayerResponse:
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        return await lgrpc.LayerStoreStub(channel).StatLayer(lpb.StatLayerRequest(digest=digest))


def run_demo(workdir: Path | None = None, *, keep: bool = False) -> int:
    own_workdir = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="afsd-demo-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    steps = _Steps()
    print(f"afsd demo: working in {workdir}")
    with ExitStack() as cleanup:
        with steps.step("start a local OCI registry (docker-registry)"):
            registry = start_registry(workdir / "registry")
            cleanup.callback(registry.stop)
            print(f"    registry at {registry.url}")

        with steps.step("build a busybox image and push it with skopeo"):
            scratch = Path(tempfile.mkdtemp(dir=workdir))
            layout = write_oci_layout(workdir / "layout", "1", ImageSpec(busybox_layers(scratch), cmd=("/srv/app/run.sh",)))
            shutil.rmtree(scratch)
            image = push_layout(layout, registry.address, "demo/busybox", "1")
            print(f"    {image.reference} ({len(image.manifests[0].layers)} layers, {image.digest[:19]})")

        registry_args = ["--insecure-registry", registry.address]
        with steps.step("start discovery and a first layerstore, node-a (separate processes)"):
            discovery = discovery_daemon(workdir, "discovery", registry_args=registry_args)
            start_all([discovery])
            cleanup.callback(discovery.stop)
            nodes = [layerstore_daemon(workdir, f"node-{name}", [discovery.address], heartbeat_period=1.0,
                                       registry_args=registry_args) for name in ("a", "b")]
            start_all([nodes[0]])
            cleanup.callback(nodes[0].stop)
            for daemon in (discovery, *nodes[:1]):
                print(f"    {daemon.name:<10} {daemon.address}   log {daemon.log_path}")

        with steps.step("node-a pulls the image (from the registry) and converts its layers to erofs"):
            before = _blob_gets(registry)
            pulled = asyncio.run(_pull(nodes[0], image.reference))
            print(f"    {len(pulled.layers)} layers, {sum(l.afs_size for l in pulled.layers):,} bytes of erofs; "
                  f"registry blob downloads (config + layers): {_blob_gets(registry) - before}")

        with steps.step("node-b joins and pulls the same image (copied from node-a, chunk-verified)"):
            start_all([nodes[1]])
            cleanup.callback(nodes[1].stop)
            time.sleep(1.5)  # one heartbeat period: discovery learns node-b
            before = _blob_gets(registry)
            copied = asyncio.run(_pull(nodes[1], image.reference))
            print(f"    {len(copied.layers)} layers present on node-b; registry blob downloads: "
                  f"{_blob_gets(registry) - before}")

        with steps.step("mount the rootfs from node-b's blobs (erofs + overlayfs) and run a command in it"):
            stats = [asyncio.run(_stat(nodes[1], layer.digest)) for layer in copied.layers]
            target = workdir / "rootfs"
            target.mkdir(exist_ok=True)
            layers = [StackLayer(Path(layer.cache_path), list(stat.implicit_dirs))
                      for layer, stat in zip(copied.layers, stats)]
            with mount_image_stack(layers, target, scratch=workdir / "stack"):
                output = subprocess.run(["chroot", str(target), "/bin/sh", "-c", "cat /etc/motd; /srv/app/run.sh"],
                                        capture_output=True, text=True, timeout=60)
                for line in (output.stdout + output.stderr).splitlines():
                    print(f"    | {line}")
                if output.returncode != 0:
                    print(f"    command failed with exit code {output.returncode}")
                    return 1
                if keep:
                    print(f"    rootfs mounted at {target}; press Ctrl-C to stop everything")
                    try:
                        while True:
                            time.sleep(3600)
                    except KeyboardInterrupt:
                        pass
    print(f"afsd demo: finished in {time.monotonic() - steps.started:.1f}s; everything stopped and unmounted")
    if own_workdir and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
