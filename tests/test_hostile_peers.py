"""Hostile peers against a real node daemon: forged StatLayer, ReadLayer and FindProvider answers.

A fake layerstore (tests/support/hostile.py, real protos) relays a real layerstore that nobody else
knows, forges its answers, and heartbeats to a real discovery replica as a holder of the image. For
every forgery, `afsd mount` on a real `afsd node` either fails with one line naming the fake (when it
is the only holder) or fails over to an honest holder and reads true bytes; nothing is written outside
the node's state directory.

Without TLS (dev mode) a forged chunk table with matching forged bytes cannot be told from the truth:
those forgeries run with mutual TLS, where the fake is a cluster member with a node certificate of its
own, and the blob description must be what the converting layerstore signed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from afsd.api import discovery_pb2 as dpb
from afsd.api import discovery_pb2_grpc as dgrpc
from afsd.api import layerstore_pb2 as lpb
from afsd.cluster.peers import blob_spec_from_stat, stat_to_peer_layer
from afsd.lab.catalogue import seeded_bytes
from afsd.lab.pki import LabPki
from afsd.node.records import mounted_paths
from afsd.rpc import open_channel
from afsd.trust.descriptors import BlobTrust
from afsd.trust.tls import TlsConfig
from tests.support.cluster import LocalCluster, one_line, small_image
from tests.support.hostile import ForgingDiscovery, ForgingLayerStore, fake_holder, serving

pytestmark = pytest.mark.slow

StatForgery = Callable[[lpb.StatLayerResponse], lpb.StatLayerResponse]


def forgeries(token: str) -> dict[str, tuple[StatForgery, str]]:
    """Forged StatLayer answers: name -> (forgery, a phrase the refusal must contain)."""
    def traversal(stat: lpb.StatLayerResponse) -> lpb.StatLayerResponse:
        stat.digest = f"sha256:../../../../../../../../../../tmp/afsd-pwned-{token}-{stat.digest[7:19]}"
        return stat

    def other_layer(stat: lpb.StatLayerResponse) -> lpb.StatLayerResponse:
        stat.digest = "sha256:" + "0" * 64
        return stat

    def tib_chunks(stat: lpb.StatLayerResponse) -> lpb.StatLayerResponse:
        stat.chunk_size = 1 << 40
        del stat.chunk_digests[1:]
        return stat

    def dotdot_dirs(stat: lpb.StatLayerResponse) -> lpb.StatLayerResponse:
        stat.implicit_dirs.append("/srv/../../etc")
        return stat

    def escaped_dotdot_dirs(stat: lpb.StatLayerResponse) -> lpb.StatLayerResponse:
        stat.implicit_dirs.append("/srv/%2E%2E/%2E%2E/etc")
        return stat

    def other_diff_id(stat: lpb.StatLayerResponse) -> lpb.StatLayerResponse:
        stat.diff_id = ""
        return stat

    return {
        "traversal digest": (traversal, "not the sha256:"),
        "mismatched digest": (other_layer, "not the sha256:"),
        "1 TiB chunk size": (tib_chunks, "chunk size 1099511627776"),
        "'..' implicit dir": (dotdot_dirs, "has a '.', '..' or NUL component"),
        "escaped '..' implicit dir": (escaped_dotdot_dirs, "has a '.', '..' or NUL component"),
        "missing diff_id": (other_diff_id, "but the image config says"),
    }


def host_tree(workdir: Path, own: list[Path]) -> set[tuple[str, str, int]]:
    """What a hostile answer could have written to: the entries of / and /etc, and everything under the
    test's work dir except the daemons' own directories and logs (which change as they run). (/tmp and
    /var/tmp change under other work on the machine: `pwned` looks there for this test's token.)"""
    entries: set[tuple[str, str, int]] = set()
    for directory in ("/", "/etc"):
        entries |= {(os.path.join(directory, name), "", 0) for name in os.listdir(directory)}
    skip = {str(p) for p in own}
    for root, dirs, files in os.walk(workdir):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
        for name in dirs + files:
            path = os.path.join(root, name)
            if not name.endswith(".log"):
                info = os.lstat(path)
                entries.add((path, oct(info.st_mode), info.st_size if not os.path.isdir(path) else 0))
    return entries


def pwned(token: str) -> list[str]:
    return [os.path.join(d, n) for d in ("/", "/tmp", "/etc", "/var/tmp") for n in os.listdir(d) if token in n]


async def _stats(cluster: LocalCluster, store, digests: list[str]) -> list[lpb.StatLayerResponse]:
    return [await cluster.layerstore(store).StatLayer(lpb.StatLayerRequest(digest=d)) for d in digests]


async def test_a_lone_hostile_holder_fails_the_mount_with_one_line_naming_it(cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1)
    (origin,) = await cluster.start_layerstores(1, discovery_endpoints=[])  # known to nobody but the fake
    image = await cluster.push("lone", small_image("lone", 2 << 20))
    pulled = await cluster.pull(origin, image)
    stats = await _stats(cluster, origin, [layer.digest for layer in pulled.layers])
    node = await cluster.start_node(None)
    token = secrets.token_hex(6)
    fake = ForgingLayerStore(cluster.layerstore(origin))
    async with fake_holder(fake, cluster.discovery(discovery), "evil", stats) as address:
        await cluster.wait_until(lambda: cluster.nodes_for_layer(discovery, stats[0].digest), 20, "the fake listed")
        own = [node.socket_path.parent, origin.log_path.with_suffix(""), cluster.workdir / "registry",
               cluster.workdir / discovery.name]
        target = cluster.workdir / "rootfs"
        target.mkdir()
        before = await asyncio.to_thread(host_tree, cluster.workdir, own)
        for name, (forgery, phrase) in forgeries(token).items():
            fake.forge_stat, fake.calls[:] = forgery, []
            line = one_line(await cluster.afsd(node, "mount", image.reference, str(target)))
            assert address in line and phrase in line, f"{name}: {line}"
            assert ("StatLayer", stats[0].digest) in fake.calls, f"{name}: the fake was never asked"
            assert not any(True for _ in target.iterdir()), name
            assert pwned(token) == [], name
            assert [p for p in mounted_paths() if p.startswith(str(cluster.workdir))] == [], name
            state = node.socket_path.parent / "state"
            assert sorted(p.name for p in (state / "blobs").iterdir()) == [], name
        after = await asyncio.to_thread(host_tree, cluster.workdir, own)
        assert sorted(after ^ before) == []
        assert "not using the StatLayer answer of layerstore " + address in node.log()


async def test_a_hostile_holder_beside_an_honest_one_is_skipped_and_the_mount_reads_true_bytes(
        cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1)
    origin, = await cluster.start_layerstores(1, discovery_endpoints=[])
    (honest,) = await cluster.start_layerstores(1)
    image = await cluster.push("beside", small_image("beside", 2 << 20))
    pulled = await cluster.pull(origin, image)
    await cluster.pull(honest, image)
    digests = [layer.digest for layer in pulled.layers]
    stats = await _stats(cluster, origin, digests)
    node = await cluster.start_node(None)   # no local layerstore: every mount asks the holders again
    token = secrets.token_hex(6)
    fake = ForgingLayerStore(cluster.layerstore(origin))
    # "aaa-" sorts first in discovery's answers: the node asks the fake before the honest holder.
    async with fake_holder(fake, cluster.discovery(discovery), "aaa-evil", stats) as address:
        await cluster.wait_until(
            lambda: _listed(cluster, discovery, digests[0], {"aaa-evil", honest.name}), 20, "both holders listed")
        target = cluster.workdir / "rootfs"
        target.mkdir()
        for name, (forgery, _) in forgeries(token).items():
            fake.forge_stat, fake.calls[:] = forgery, []
            mounted = await cluster.afsd(node, "mount", image.reference, str(target))
            assert mounted.returncode == 0, f"{name}: {mounted.stderr}"
            assert ("StatLayer", digests[0]) in fake.calls, f"{name}: the fake was never asked"
            for index in range(2):
                data = (target / f"data/beside-{index}.bin").read_bytes()
                assert data == seeded_bytes(f"beside{index}", (2 << 20) // 2), name
            assert (await cluster.afsd(node, "umount", str(target))).returncode == 0
            assert pwned(token) == [], name
        assert node.log().count("not using the StatLayer answer of layerstore " + address) >= len(forgeries(token))


async def _listed(cluster: LocalCluster, discovery, digest: str, names: set[str]) -> bool:
    return names <= await cluster.nodes_for_layer(discovery, digest)


async def test_an_oversized_find_provider_answer_is_refused_and_the_next_replica_asked(cluster: LocalCluster) -> None:
    (discovery,) = await cluster.start_discovery(1)
    (honest,) = await cluster.start_layerstores(1)
    image = await cluster.push("oversized", small_image("oversized", 1 << 20))
    await cluster.pull(honest, image)

    def flood(answer: dpb.FindProviderResponse) -> dpb.FindProviderResponse:
        for index in range(5000):
            answer.services.add(node_id=f"ghost{index}", endpoint=f"10.{index // 250}.{index % 250}.1:1")
        return answer

    fake = ForgingDiscovery(cluster.discovery(discovery), forge_find_provider=flood)
    async with serving(lambda server: dgrpc.add_ServiceDiscoveryServicer_to_server(fake, server)) as address:
        node = await cluster.start_node(None, discovery_endpoints=[address, discovery.address])
        target = cluster.workdir / "rootfs"
        target.mkdir()
        mounted = await cluster.afsd(node, "mount", image.reference, str(target))
        assert mounted.returncode == 0, mounted.stderr
        assert (target / "etc/oversized-0.txt").read_text() == "oversized layer 0\n"
        assert f"discovery {address}: listed 5001 nodes (at most 4096)" in node.log()
        assert (await cluster.afsd(node, "umount", str(target))).returncode == 0


async def test_discovery_refuses_malformed_heartbeats_and_claims_on_a_live_nodes_endpoint(
        cluster: LocalCluster) -> None:
    import grpc

    (discovery,) = await cluster.start_discovery(1)
    stub = cluster.discovery(discovery)
    good = dpb.HeartbeatRequest(node_id="n1", endpoint="127.0.0.1:1",
                                layer_stats=[dpb.LayerStat(digest="sha256:" + "a" * 64, afs_size=1,
                                                           blob_digest="sha256:" + "b" * 64)])
    await stub.Heartbeat(good)
    for field, value, phrase in (("endpoint", "unix:/run/afsd/node.sock", "is not HOST:PORT"),
                                 ("endpoint", "127.0.0.1:99999", "is not HOST:PORT"),
                                 ("layer_digests", ["sha256:../../etc"], "is not sha256:")):
        bad = dpb.HeartbeatRequest()
        bad.CopyFrom(good)
        if isinstance(value, list):
            getattr(bad, field).extend(value)
        else:
            setattr(bad, field, value)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Heartbeat(bad)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and phrase in refused.value.details()
    # Without TLS a node id is only a claim, but a live node's endpoint stays its own: nobody can overwrite
    # or shadow its record under another name (with TLS, tests/test_tls.py: only its certificate can).
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Heartbeat(dpb.HeartbeatRequest(node_id="aaa-evil", endpoint="127.0.0.1:1"))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "belongs to live node 'n1'" in refused.value.details()
    services = (await stub.FindProvider(dpb.FindProviderRequest())).services
    assert [(s.node_id, s.endpoint) for s in services] == [("n1", "127.0.0.1:1")]


# -- with mutual TLS: blob descriptors signed by the converter -------------------------------------------


@dataclass
class ForgedBlob:
    """Layer `digest`'s blob with a few bytes of a file changed, and a chunk table that matches them."""

    digest: str
    data: bytes
    chunk_digests: list[bytes]
    blob_digest: str

    def stat(self, stat: lpb.StatLayerResponse) -> lpb.StatLayerResponse:
        stat.blob_digest = self.blob_digest
        del stat.chunk_digests[:]
        stat.chunk_digests.extend(self.chunk_digests)
        return stat

    def bytes(self, digest: str, offset: int, data: bytes) -> bytes:
        return self.data[offset:offset + len(data)] if digest == self.digest else data


async def _forge(cluster: LocalCluster, origin, stat: lpb.StatLayerResponse, genuine_file: bytes) -> ForgedBlob:
    blob = await cluster.read_all(origin, stat.digest)
    at = blob.index(genuine_file[:4096])
    data = blob[:at] + b"FORGED BY A HOSTILE PEER" + blob[at + 24:]
    digests = [hashlib.sha256(data[i:i + stat.chunk_size]).digest() for i in range(0, len(data), stat.chunk_size)]
    return ForgedBlob(stat.digest, data, digests, "sha256:" + hashlib.sha256(data).hexdigest())


def signed_by(tls: TlsConfig, stat: lpb.StatLayerResponse) -> lpb.SignedBlobDescriptor:
    """A descriptor of exactly what `stat` says, signed with `tls`'s key (which may be anyone's)."""
    return BlobTrust(tls).sign(stat_to_peer_layer(stat).blob)


def tls_forgeries(cluster: LocalCluster, forged: ForgedBlob, other_layer: lpb.StatLayerResponse,
                  origin_name: str) -> dict[str, tuple[StatForgery, str]]:
    stranger = TlsConfig.from_dir(LabPki(cluster.workdir / "stranger-ca").node(origin_name))
    user = TlsConfig.from_dir(cluster.pki.user(origin_name))

    def genuine_descriptor(stat: lpb.StatLayerResponse) -> lpb.StatLayerResponse:
        return forged.stat(stat)

    def no_descriptor(stat: lpb.StatLayerResponse) -> lpb.StatLayerResponse:
        stat.ClearField("descriptor")
        return forged.stat(stat)

    def resigned_by(tls: TlsConfig) -> StatForgery:
        def forge(stat: lpb.StatLayerResponse) -> lpb.StatLayerResponse:
            forged.stat(stat)
            stat.descriptor.CopyFrom(signed_by(tls, stat))
            return stat
        return forge

    def other_layers_descriptor(stat: lpb.StatLayerResponse) -> lpb.StatLayerResponse:
        stat.descriptor.CopyFrom(other_layer.descriptor)
        return stat

    return {
        "forged chunk table and bytes, the converter's descriptor": (genuine_descriptor, f"is not what {origin_name} signed"),
        "forged chunk table and bytes, no descriptor": (no_descriptor, "sent no signed blob descriptor"),
        "forged, signed by another CA": (resigned_by(stranger), "does not lead to the cluster CA"),
        "forged, signed by a user of the cluster CA": (resigned_by(user), "is not a node"),
        "another layer's descriptor": (other_layers_descriptor, "signed descriptor is for layer"),
    }


async def _tls_setup(cluster: LocalCluster, name: str):
    (discovery,) = await cluster.start_discovery(1)
    (origin,) = await cluster.start_layerstores(1, discovery_endpoints=[])  # known to nobody but the fake
    image = await cluster.push(name, small_image(name, 2 << 20))
    pulled = await cluster.pull(origin, image)
    stats = await _stats(cluster, origin, [layer.digest for layer in pulled.layers])
    genuine = seeded_bytes(f"{name}0", (2 << 20) // 2)
    forged = await _forge(cluster, origin, stats[0], genuine)
    return discovery, origin, image, stats, forged


async def test_with_tls_a_lone_holder_forging_blob_metadata_fails_the_mount_with_one_line_naming_it(
        mtls_cluster: LocalCluster) -> None:
    cluster = mtls_cluster
    discovery, origin, image, stats, forged = await _tls_setup(cluster, "signed")
    node = await cluster.start_node(None)
    evil = TlsConfig.from_dir(cluster.pki.node("evil", "127.0.0.5"))
    fake = ForgingLayerStore(cluster.layerstore(origin), forge_bytes=forged.bytes)
    async with fake_holder(fake, dgrpc.ServiceDiscoveryStub(open_channel(discovery.address, evil)), "evil", stats,
                           host="127.0.0.5", credentials=evil.server_credentials()) as address:
        await cluster.wait_until(lambda: cluster.nodes_for_layer(discovery, stats[0].digest), 20, "the fake listed")
        target = cluster.workdir / "rootfs"
        target.mkdir()
        own = [node.socket_path.parent, origin.log_path.with_suffix(""), cluster.workdir / "registry",
               cluster.workdir / discovery.name, cluster.workdir / "pki", cluster.workdir / "stranger-ca"]
        before = await asyncio.to_thread(host_tree, cluster.workdir, own)
        for name, (forgery, phrase) in tls_forgeries(cluster, forged, stats[1], origin.name).items():
            fake.forge_stat, fake.calls[:] = forgery, []
            line = one_line(await cluster.afsd(node, "mount", image.reference, str(target)))
            assert address in line and phrase in line, f"{name}: {line}"
            assert ("StatLayer", stats[0].digest) in fake.calls, f"{name}: the fake was never asked"
            assert not any(True for _ in target.iterdir()), name
            assert sorted((node.socket_path.parent / "state" / "blobs").iterdir()) == [], name
        assert sorted((await asyncio.to_thread(host_tree, cluster.workdir, own)) ^ before) == []


async def test_with_tls_forged_bytes_from_the_nodes_own_layerstore_never_reach_a_reader_nor_spread(
        mtls_cluster: LocalCluster) -> None:
    """The fake is the node's own layerstore (--layerstore: asked first, read from first) and forges the
    chunk table and the bytes; the node takes the blob description of an honest holder, its reads from
    the fake fail verification and go to the honest holder, and the complete blob it hands to its
    real local layerstore is the converter's."""
    cluster = mtls_cluster
    discovery, origin, image, stats, forged = await _tls_setup(cluster, "spread")
    (honest,) = await cluster.start_layerstores(1)
    await cluster.pull(honest, image)
    (mine,) = await cluster.start_layerstores(1)   # empty: it gets the layers only from the node's import
    evil = TlsConfig.from_dir(cluster.pki.node("evil", "127.0.0.5"))
    metadata = blob_spec_from_stat(stats[0]).metadata_ranges()

    def forged_bytes_and_metadata(digest: str, offset: int, data: bytes) -> bytes:
        data = bytearray(forged.bytes(digest, offset, data))
        for start, length in metadata if digest == forged.digest else ():
            for at in range(max(start, offset), min(start + length, offset + len(data))):
                data[at - offset] ^= 0xFF
        return bytes(data)

    fake = ForgingLayerStore(cluster.layerstore(origin), forge_stat=tls_forgeries(cluster, forged, stats[1],
                                                                                  origin.name)[
        "forged chunk table and bytes, the converter's descriptor"][0], forge_bytes=forged_bytes_and_metadata)
    async with fake_holder(fake, dgrpc.ServiceDiscoveryStub(open_channel(discovery.address, evil)), "evil", stats,
                           host="127.0.0.5", credentials=evil.server_credentials()) as address:
        mine_socket = mine.args[mine.args.index("--admin-socket") + 1]
        node = await cluster.start_node(None, extra_args=["--layerstore", address,
                                                          "--layerstore-admin-socket", mine_socket])
        await cluster.wait_until(lambda: _listed(cluster, discovery, stats[0].digest, {"evil", honest.name}),
                                 20, "both holders listed")
        target = cluster.workdir / "rootfs"
        target.mkdir()
        mounted = await cluster.afsd(node, "mount", image.reference, str(target))
        assert mounted.returncode == 0, mounted.stderr
        for index in range(2):
            data = (target / f"data/spread-{index}.bin").read_bytes()
            assert data == seeded_bytes(f"spread{index}", (2 << 20) // 2)
        assert b"FORGED" not in (target / "data/spread-0.bin").read_bytes()
        assert ("ReadLayer", stats[0].digest) in fake.calls, "the node never read from the fake"
        log = node.log()
        assert f"not using the StatLayer answer of layerstore {address}" in log
        # The node read the layer's metadata from the fake first: by its digest, which the forgery fails.
        assert "does not match the blob's metadata digest" in log

        async def mine_provides_everything() -> bool:
            return all([mine.name in await cluster.nodes_for_layer(discovery, s.digest) for s in stats])
        await cluster.wait_until(mine_provides_everything, 60, "the node's own layerstore to hold the layers")
        trust = BlobTrust(cluster.operator_tls)
        for genuine in stats:
            held = await cluster.layerstore(mine).StatLayer(lpb.StatLayerRequest(digest=genuine.digest))
            assert held.blob_digest == genuine.blob_digest
            descriptor = trust.verified_descriptor(held, genuine.digest, peer=mine.name, diff_id=genuine.diff_id)
            assert descriptor is not None and descriptor.signer == honest.name
        assert forged.blob_digest != stats[0].blob_digest
        listed = (await cluster.discovery(discovery).FindProvider(
            dpb.FindProviderRequest(layer_digest=stats[0].digest))).services
        advertised = {s.blob_digest for service in listed for s in service.layer_stats if s.digest == stats[0].digest}
        assert advertised == {stats[0].blob_digest}
        assert (await cluster.afsd(node, "umount", str(target))).returncode == 0
