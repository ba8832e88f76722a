"""`afsd demo`: the whole system on one machine, on loopback, with real parts.

A local registry (Debian's docker-registry) gets a small runnable image (busybox). Two nodes run:
node-a has only a layerstore; node-b has a layerstore, the node daemon (`afsd node`, kernel mounts)
and afslet, with the proxy in front. node-a pulls the image from the registry and converts its layers
to erofs; then a command runs through the proxy on node-b, whose mount reads the layers lazily from
node-a; `afsd mount` shows the same image as a plain rootfs; finally node-b, having read the image,
is listed by discovery as a provider of its layers. Each step prints what happened and how long it
took. Everything started is stopped and unmounted at the end.

With `tls`, a throwaway cluster CA issues a certificate to every daemon and to the demo's user, and
every call of the flow goes over mutual TLS (blob descriptors signed and verified).
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

from afsd.api import discovery_pb2 as dpb
from afsd.api import discovery_pb2_grpc as dgrpc
from afsd.api import layerstore_pb2 as lpb
from afsd.api import layerstore_pb2_grpc as lgrpc
from afsd.lab.catalogue import busybox_layers
from afsd.lab.daemons import (
    Daemon,
    afsd_command,
    afslet_daemon,
    discovery_daemon,
    layerstore_daemon,
    node_daemon,
    proxy_daemon,
    start_all,
    stop_node_daemon,
)
from afsd.lab.oci_layout import ImageSpec, write_oci_layout
from afsd.lab.pki import LabPki
from afsd.lab.registry import RegistryProcess, start_registry
from afsd.lab.skopeo import push_layout
from afsd.rpc import open_channel
from afsd.trust.tls import TlsConfig


class _Steps:
    def __init__(self) -> None:
        self.started = time.monotonic()

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        print(f"==> {title}", flush=True)
        begun = time.monotonic()
        yield
        print(f"    done in {time.monotonic() - begun:.2f}s", flush=True)


def _say(text: str) -> None:
    for line in text.rstrip().splitlines():
        print(f"    | {line}", flush=True)


def _blob_gets(registry: RegistryProcess) -> int:
    return sum(1 for e in registry.access_log() if e.method == "GET" and "/blobs/" in e.uri and e.status == 200)


async def _pull(daemon: Daemon, reference: str, tls: TlsConfig | None) -> lpb.PullImageResponse:
    async with open_channel(daemon.address, tls) as channel:
        return await lgrpc.LayerStoreStub(channel).PullImage(lpb.PullImageRequest(image=reference), timeout=600)


async def _providers(discovery: Daemon, digests: list[str], tls: TlsConfig | None) -> dict[str, list[str]]:
    async with open_channel(discovery.address, tls) as channel:
        stub = dgrpc.ServiceDiscoveryStub(channel)
        return {d: sorted(s.node_id for s in (await stub.FindProvider(dpb.FindProviderRequest(layer_digest=d))).services)
                for d in digests}


def run_demo(workdir: Path | None = None, *, keep: bool = False, tls: bool = False) -> int:
    own_workdir = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="afsd-demo-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    steps = _Steps()
    print(f"afsd demo: working in {workdir}" + (" (mutual TLS)" if tls else ""))
    pki = LabPki(workdir / "pki") if tls else None

    def cert(name: str) -> Path | None:
        """`name`'s node certificate (--tls-dir) when the demo runs with TLS."""
        return pki.node(name) if pki is not None else None

    operator = TlsConfig.from_dir(pki.node("demo-operator")) if pki is not None else None
    user_args = ["--tls-dir", str(pki.user("demo-user"))] if pki is not None else []
    with ExitStack() as cleanup:
        with steps.step("start a local OCI registry (docker-registry)"):
            registry = start_registry(workdir / "registry")
            cleanup.callback(registry.stop)
            print(f"    registry at {registry.url}")

        with steps.step("build a busybox image and push it with skopeo"):
            scratch = Path(tempfile.mkdtemp(dir=workdir))
            layout = write_oci_layout(workdir / "layout", "1",
                                      ImageSpec(busybox_layers(scratch), cmd=("/srv/app/run.sh",)))
            shutil.rmtree(scratch)
            image = push_layout(layout, registry.address, "demo/busybox", "1")
            print(f"    {image.reference} ({len(image.manifests[0].layers)} layers, {image.digest[:19]})")

        registry_args = ["--insecure-registry", registry.address]
        with steps.step("start discovery and node-a's layerstore (separate processes)"):
            discovery = discovery_daemon(workdir, "discovery", registry_args=registry_args, tls_dir=cert("discovery"))
            store_a = layerstore_daemon(workdir, "node-a", [discovery.address], heartbeat_period=1.0,
                                        registry_args=registry_args, tls_dir=cert("node-a"))
            start_all([discovery, store_a])
            cleanup.callback(discovery.stop)
            cleanup.callback(store_a.stop)
            for daemon in (discovery, store_a):
                print(f"    {daemon.name:<10} {daemon.address:<18} log {daemon.log_path}")

        with steps.step("node-a pulls the image from the registry and converts its layers to erofs"):
            before = _blob_gets(registry)
            pulled = asyncio.run(_pull(store_a, image.reference, operator))
            print(f"    {len(pulled.layers)} layers, {sum(l.afs_size for l in pulled.layers):,} bytes of erofs; "
                  f"registry blob downloads (config + layers): {_blob_gets(registry) - before}")

        with steps.step("start node-b: layerstore, node daemon (kernel mounts), afslet; and the proxy"):
            store_b = layerstore_daemon(workdir, "node-b", [discovery.address], heartbeat_period=1.0,
                                        registry_args=registry_args, tls_dir=cert("node-b"))
            start_all([store_b])
            cleanup.callback(store_b.stop)
            node_b = node_daemon(workdir, "node-b-mounts", [discovery.address], layerstore=store_b,
                                 tls_dir=cert("node-b-mounts"))
            start_all([node_b])
            # Mounts, and the backend processes serving them, outlive the node daemon by design:
            # stopping the demo unmounts them explicitly.
            cleanup.callback(stop_node_daemon, node_b)
            afslet = afslet_daemon(workdir, "afslet-b", node_b, [discovery.address], tls_dir=cert("afslet-b"))
            proxy = proxy_daemon(workdir, "proxy", afslet.address, tls_dir=cert("proxy"))
            start_all([afslet, proxy])
            cleanup.callback(proxy.stop)
            cleanup.callback(afslet.stop)
            for daemon in (store_b, afslet, proxy):
                print(f"    {daemon.name:<10} {daemon.address:<18} log {daemon.log_path}")
            print(f"    node daemon socket {node_b.socket_path}")

        with steps.step("run the image's command through the proxy (afsd run): node-b mounts it lazily"):
            before = _blob_gets(registry)
            ran = afsd_command("run", "--target", proxy.address, "--cpu", "1", "--memory-mb", "64", *user_args,
                               image.reference)
            _say(ran.stdout + ran.stderr)
            print(f"    exit code {ran.returncode}; registry blob downloads: {_blob_gets(registry) - before}")
            if ran.returncode != 0:
                return 1

        with steps.step("mount the same image with `afsd mount` and look inside"):
            target = workdir / "rootfs"
            target.mkdir(exist_ok=True)
            mounted = afsd_command("mount", "--socket", str(node_b.socket_path), image.reference, str(target))
            _say(mounted.stdout + mounted.stderr)
            if mounted.returncode != 0:
                return 1
            listing = subprocess.run(["chroot", str(target), "/bin/sh", "-c", "cat /etc/motd; ls /"],
                                     capture_output=True, text=True, timeout=60)
            _say(listing.stdout + listing.stderr)
            _say(afsd_command("mounts", "--socket", str(node_b.socket_path)).stdout)

        with steps.step("node-b has read the whole image: discovery lists it as a provider too"):
            digests = [layer.digest for layer in pulled.layers]
            deadline = time.monotonic() + 60
            providers = asyncio.run(_providers(discovery, digests, operator))
            while time.monotonic() < deadline and not all("node-b" in p for p in providers.values()):
                time.sleep(1)
                providers = asyncio.run(_providers(discovery, digests, operator))
            for digest, nodes in providers.items():
                print(f"    {digest[:19]}  held by {', '.join(nodes)}")

        if keep:
            print(f"    everything is running; rootfs at {target}; press Ctrl-C to stop")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    print(f"afsd demo: finished in {time.monotonic() - steps.started:.1f}s; everything stopped and unmounted")
    if own_workdir and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0

