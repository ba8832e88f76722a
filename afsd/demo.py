"""`afsd demo`: the whole system on one machine, on loopback, with real parts.

A local registry (Debian's docker-registry) gets a small runnable image (busybox). Two nodes run:
node-a has only a layerstore; node-b has a layerstore, the node daemon (`afsd node`, kernel mounts)
and afslet, with the proxy in front. node-a pulls the image from the registry and converts its layers
to erofs; then a command runs through the proxy on node-b, whose mount reads the layers lazily from
node-a; `afsd mount` shows the same image as a plain rootfs; finally node-b, having read the image,
is listed by discovery as a provider of its layers. Each step prints what happened and how long it
took. Everything started is stopped and unmounted at the end, also when a step fails (one line says
which, with the failing daemon's log tail) and on Ctrl-C or SIGTERM.

With `tls`, a throwaway cluster CA issues a certificate to every daemon and to the demo's user, and
every call of the flow goes over mutual TLS (blob descriptors signed and verified).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc

from afsd.api import discovery_pb2 as dpb
from afsd.api import discovery_pb2_grpc as dgrpc
from afsd.api import layerstore_pb2 as lpb
from afsd.api import layerstore_pb2_grpc as lgrpc
from afsd.errors import AfsdError
from afsd.lab import deadlines
from afsd.lab.catalogue import busybox_layers
from afsd.lab.daemons import (
    Daemon,
    DaemonError,
    afsd_command,
    afslet_daemon,
    discovery_daemon,
    layerstore_daemon,
    log_tail,
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
    """Run the demo; 0 when every step worked. A step that fails is reported in one line (with the failing
    daemon's log tail), and everything started so far is stopped either way."""
    own_workdir = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="afsd-demo-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    steps = _Steps()
    print(f"afsd demo: working in {workdir}" + (" (mutual TLS)" if tls else ""), flush=True)
    failed = False
    with ExitStack() as cleanup:
        try:
            code = _run_steps(workdir, steps, cleanup, keep, LabPki(workdir / "pki") if tls else None)
        except DaemonError as error:
            _fail(str(error), error.log_tail)
            code = 1
        except (AfsdError, grpc.RpcError, subprocess.TimeoutExpired, OSError) as error:
            _fail(_one_line(error))
            code = 1
        failed = code != 0
        if failed or keep:
            print("afsd demo: stopping everything it started", flush=True)
    state = "failed" if failed else "finished"
    print(f"afsd demo: {state} in {time.monotonic() - steps.started:.1f}s; everything stopped and unmounted"
          f"{f'; logs in {workdir}' if failed or not own_workdir or keep else ''}", flush=True)
    if own_workdir and not keep and not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    return code


def _fail(message: str, log_tail: str = "") -> None:
    print(f"afsd demo: error: {message}", file=sys.stderr, flush=True)
    for line in log_tail.splitlines():
        print(f"    | {line}", file=sys.stderr, flush=True)


def _one_line(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        return f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _run_steps(workdir: Path, steps: _Steps, cleanup: ExitStack, keep: bool, pki: LabPki | None) -> int:
    def cert(name: str) -> Path | None:
        """`name`'s node certificate (--tls-dir) when the demo runs with TLS."""
        return pki.node(name) if pki is not None else None

    operator = TlsConfig.from_dir(pki.node("demo-operator")) if pki is not None else None
    user_args = ["--tls-dir", str(pki.user("demo-user"))] if pki is not None else []

    def started(daemon: Daemon) -> Daemon:
        # Registered before it starts: a daemon that fails half-way is stopped too, and ports given back.
        cleanup.callback(stop_daemon, daemon)
        return daemon

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
        discovery = started(discovery_daemon(workdir, "discovery", registry_args=registry_args,
                                             tls_dir=cert("discovery")))
        store_a = started(layerstore_daemon(workdir, "node-a", [discovery.address], heartbeat_period=1.0,
                                            registry_args=registry_args, tls_dir=cert("node-a")))
        start_all([discovery, store_a])
        for daemon in (discovery, store_a):
            print(f"    {daemon.name:<10} {daemon.address:<18} log {daemon.log_path}")

    with steps.step("node-a pulls the image from the registry and converts its layers to erofs"):
        before = _blob_gets(registry)
        pulled = asyncio.run(_pull(store_a, image.reference, operator))
        print(f"    {len(pulled.layers)} layers, {sum(l.afs_size for l in pulled.layers):,} bytes of erofs; "
              f"registry blob downloads (config + layers): {_blob_gets(registry) - before}")

    with steps.step("start node-b: layerstore, node daemon (kernel mounts), afslet; and the proxy"):
        store_b = started(layerstore_daemon(workdir, "node-b", [discovery.address], heartbeat_period=1.0,
                                            registry_args=registry_args, tls_dir=cert("node-b")))
        start_all([store_b])
        # Mounts, and the backend processes serving them, outlive the node daemon by design:
        # stopping it (stop_daemon) unmounts them explicitly.
        node_b = started(node_daemon(workdir, "node-b-mounts", [discovery.address], layerstore=store_b,
                                     tls_dir=cert("node-b-mounts")))
        start_all([node_b])
        afslet = started(afslet_daemon(workdir, "afslet-b", node_b, [discovery.address], tls_dir=cert("afslet-b")))
        proxy = started(proxy_daemon(workdir, "proxy", afslet.address, tls_dir=cert("proxy")))
        start_all([afslet, proxy])
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
            _fail(f"`afsd run` through the proxy exited with {ran.returncode}", log_tail(afslet.log_path))
            return 1

    with steps.step("mount the same image with `afsd mount` and look inside"):
        target = workdir / "rootfs"
        target.mkdir(exist_ok=True)
        mounted = afsd_command("mount", "--socket", str(node_b.socket_path), image.reference, str(target))
        _say(mounted.stdout + mounted.stderr)
        if mounted.returncode != 0:
            _fail(f"`afsd mount` exited with {mounted.returncode}", log_tail(node_b.log_path))
            return 1
        listing = subprocess.run(["chroot", str(target), "/bin/sh", "-c", "cat /etc/motd; ls /"],
                                 capture_output=True, text=True, timeout=60)
        _say(listing.stdout + listing.stderr)
        _say(afsd_command("mounts", "--socket", str(node_b.socket_path)).stdout)

    with steps.step("node-b has read the whole image: discovery lists it as a provider too"):
        digests = [layer.digest for layer in pulled.layers]
        deadline = time.monotonic() + deadlines.scaled(60)
        providers = asyncio.run(_providers(discovery, digests, operator))
        while time.monotonic() < deadline and not all("node-b" in p for p in providers.values()):
            time.sleep(1)
            providers = asyncio.run(_providers(discovery, digests, operator))
        for digest, nodes in providers.items():
            print(f"    {digest[:19]}  held by {', '.join(nodes)}")

    if keep:
        try:   # a signal right after the line below still ends the wait as planned, not as a failure
            print(f"    everything is running; rootfs at {target}; press Ctrl-C (or send SIGTERM) to stop", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0
