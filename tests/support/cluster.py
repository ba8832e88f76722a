"""A real afsd cluster on loopback for tests: a registry, discovery replicas and layerstores, each a
separate process, plus typed gRPC clients to talk to them.

`LocalCluster` starts what a test asks for; everything is stopped at the end of the test (fixture
`cluster`; `mtls_cluster` for the same with mutual TLS: every daemon gets a node certificate from a test
CA, and the test's own clients use an `operator` node certificate). Images are small, built in Python and pushed with skopeo into the cluster's own registry,
so the registry's access log counts only this test's fetches.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from afsd.api import discovery_pb2 as dpb
from afsd.api import discovery_pb2_grpc as dgrpc
from afsd.api import layerstore_pb2 as lpb
from afsd.api import layerstore_pb2_grpc as lgrpc
from afsd.erofs.mount import unmount
from afsd.lab import catalogue
from afsd.lab.catalogue import seeded_bytes
from afsd.lab import deadlines
from afsd.lab.daemons import Daemon, discovery_daemon, layerstore_daemon, node_daemon, start_all, stop_daemon
from afsd.lab.layers import Entry, LayerSpec
from afsd.lab.oci_layout import ImageSpec, write_oci_layout
from afsd.lab.pki import LabPki
from afsd.lab.registry import RegistryProcess, start_registry
from afsd.lab.skopeo import PushedImage, push_layout
from afsd.node.records import mounted_paths
from afsd.rpc import open_channel
from afsd.trust.tls import TlsConfig


@dataclass
class LocalCluster:
    workdir: Path
    registry: RegistryProcess
    discoveries: list[Daemon] = field(default_factory=list)
    layerstores: list[Daemon] = field(default_factory=list)
    nodes: list[Daemon] = field(default_factory=list)
    pki: LabPki | None = None      # mutual TLS: every daemon gets a node certificate from this CA
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    @property
    def registry_args(self) -> list[str]:
        return ["--insecure-registry", self.registry.address]

    @property
    def operator_tls(self) -> TlsConfig | None:
        """The test's own client certificate (a node's), with TLS."""
        return TlsConfig.from_dir(self.pki.node("operator")) if self.pki is not None else None

    def _cert(self, name: str) -> Path | None:
        return self.pki.node(name) if self.pki is not None else None

    async def start_discovery(self, count: int = 1, *, ttl: float = 30.0) -> list[Daemon]:
        names = [f"discovery{len(self.discoveries) + i}" for i in range(count)]
        daemons = [discovery_daemon(self.workdir, name, ttl=ttl, registry_args=self.registry_args,
                                    tls_dir=self._cert(name)) for name in names]
        self.discoveries += daemons
        await asyncio.to_thread(start_all, daemons)
        return daemons

    async def start_layerstores(self, count: int = 1, *, cache_max_bytes: int = 0, heartbeat_period: float = 1.0,
                                discovery_endpoints: list[str] | None = None,
                                prefix: list[str] | None = None, extra_args: list[str] = ()) -> list[Daemon]:
        endpoints = discovery_endpoints if discovery_endpoints is not None else [d.address for d in self.discoveries]
        names = [f"node{len(self.layerstores) + i}" for i in range(count)]
        daemons = [layerstore_daemon(self.workdir, name, endpoints, cache_max_bytes=cache_max_bytes,
                                     heartbeat_period=heartbeat_period, registry_args=self.registry_args,
                                     tls_dir=self._cert(name), extra_args=list(extra_args)) for name in names]
        for daemon in daemons:
            daemon.prefix = list(prefix or [])
            daemon.args += list(extra_args)
        self.layerstores += daemons
        await asyncio.to_thread(start_all, daemons)
        return daemons

    async def start_node(self, layerstore: Daemon | None = None, *, extra_args: list[str] = (),
                         discovery_endpoints: list[str] | None = None) -> Daemon:
        """An `afsd node` daemon (mounts), paired with `layerstore` as its node's own layerstore."""
        endpoints = discovery_endpoints if discovery_endpoints is not None else [d.address for d in self.discoveries]
        name = f"mounter{len(self.nodes)}"
        daemon = node_daemon(self.workdir, name, endpoints, layerstore=layerstore, extra_args=list(extra_args),
                             tls_dir=self._cert(name))
        self.nodes.append(daemon)
        await asyncio.to_thread(daemon.start)
        return daemon

    async def afsd(self, node: Daemon | None, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run the `afsd` CLI as a user would (with `node`'s control socket for the mount verbs)."""
        socket_args = ["--socket", str(node.socket_path)] if node is not None else []
        command = [sys.executable, "-m", "afsd", *args[:1], *socket_args, *args[1:]]
        return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True,
                                       timeout=deadlines.scaled(timeout))

    async def restart(self, daemon: Daemon) -> None:
        await asyncio.to_thread(daemon.start)

    async def push(self, name: str, layers: tuple[LayerSpec, ...], tag: str = "v1") -> PushedImage:
        def build_and_push() -> PushedImage:
            layout = write_oci_layout(self.workdir / "layouts" / name, tag, ImageSpec(layers))
            return push_layout(layout, self.registry.address, f"test/{name}", tag)
        return await asyncio.to_thread(build_and_push)

    async def push_features(self, large_file_size: int = 8 << 20) -> PushedImage:
        """The catalogue's features image (every tar feature a converter must get right), with a large
        file of `large_file_size` bytes (smaller in the VM, where every MiB is slow)."""
        def build() -> PushedImage:
            spec, media_types, facts = catalogue.features_image("oci-mixed", large_file_size=large_file_size)
            layout = write_oci_layout(self.workdir / "layouts" / "features", "features", spec)
            return push_layout(layout, self.registry.address, "test/features", "v1", media_types=media_types,
                               facts={spec.platform: facts})
        return await asyncio.to_thread(build)

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self.operator_tls)
        return channel

    def layerstore(self, daemon: Daemon) -> lgrpc.LayerStoreStub:
        return lgrpc.LayerStoreStub(self.channel(daemon.address))

    def discovery(self, daemon: Daemon) -> dgrpc.ServiceDiscoveryStub:
        return dgrpc.ServiceDiscoveryStub(self.channel(daemon.address))

    async def wait_until(self, predicate: Callable[[], asyncio.Future[bool] | bool], timeout: float,
                         what: str) -> float:
        """Poll `predicate` (sync or async) until true; return the seconds it took. `timeout` is for an
        ordinary machine: it stretches on a slow one (afsd/lab/deadlines.py)."""
        timeout = deadlines.scaled(timeout)
        started = time.monotonic()
        while True:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.2)

    async def nodes_for_layer(self, discovery: Daemon, digest: str) -> set[str]:
        response = await self.discovery(discovery).FindProvider(dpb.FindProviderRequest(layer_digest=digest))
        return {s.node_id for s in response.services}

    async def nodes_for_image(self, discovery: Daemon, key: str) -> set[str]:
        response = await self.discovery(discovery).FindImageProvider(dpb.FindImageProviderRequest(image_key=key))
        return {s.node_id for s in response.services}

    async def wait_registered(self, count: int, timeout: float = 20.0) -> None:
        for discovery in self.discoveries:
            async def enough(d: Daemon = discovery) -> bool:
                response = await self.discovery(d).FindProvider(dpb.FindProviderRequest())
                return len(response.services) >= count
            await self.wait_until(enough, timeout, f"{count} layerstores registered at {discovery.name}")

    async def pull(self, daemon: Daemon, image: PushedImage | str, **fields: object) -> lpb.PullImageResponse:
        reference = image if isinstance(image, str) else image.reference
        return await self.layerstore(daemon).PullImage(lpb.PullImageRequest(image=reference, **fields))

    async def read_all(self, daemon: Daemon, digest: str, offset: int = 0, length: int = 1 << 40) -> bytes:
        parts = []
        async for message in self.layerstore(daemon).ReadLayer(
                lpb.ReadLayerRequest(digest=digest, offset=offset, length=length)):
            parts.append(message.data)
        return b"".join(parts)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    def stop(self) -> None:
        """Stop every daemon and the registry, then what outlives node daemons by design: their
        mounts and the supervisors serving them. Callable from any thread without a running loop."""
        for daemon in self.nodes + self.layerstores + self.discoveries:
            stop_daemon(daemon)
        self.registry.stop()
        unmount_everything_under(self.workdir)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    async for local in _local_cluster(tmp_path, None):
        yield local


@pytest.fixture
async def mtls_cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    async for local in _local_cluster(tmp_path, await asyncio.to_thread(LabPki, tmp_path / "pki")):
        yield local


async def _local_cluster(tmp_path: Path, pki: LabPki | None) -> AsyncIterator[LocalCluster]:
    registry = await asyncio.to_thread(start_registry, tmp_path / "registry")
    local = LocalCluster(tmp_path, registry, pki=pki)
    try:
        yield local
    finally:
        await local.close()
        await asyncio.to_thread(local.stop)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed on stderr (AssertionError unless it failed with exactly one)."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def unmount_everything_under(root: Path) -> list[str]:
    """Detach every mount below `root` (deepest first); return what was still mounted."""
    leftovers = sorted((p for p in mounted_paths() if p.startswith(str(root) + "/")), key=len, reverse=True)
    for point in leftovers:
        unmount(Path(point), detach=True)
    return leftovers


def small_image(seed: str, size: int, *, layers: int = 2, compression: str = "gzip") -> tuple[LayerSpec, ...]:
    """`layers` layers, each holding one incompressible file of about `size / layers` bytes."""
    return tuple(
        LayerSpec((Entry(f"data/{seed}-{index}.bin", data=seeded_bytes(f"{seed}{index}", size // layers)),
                   Entry(f"etc/{seed}-{index}.txt", data=f"{seed} layer {index}\n".encode())),
                  compression=compression)
        for index in range(layers))
