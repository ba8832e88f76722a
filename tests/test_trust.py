"""The checks on peer answers and the signed blob descriptors, without daemons: what is accepted, what is
refused and with which words; and `afsd certs` as a user runs it."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from afsd.api import layerstore_pb2 as lpb
from afsd.cluster.peer_answers import PeerAnswerError, check_stat, endpoint_is_valid, implicit_dir_problem
from afsd.lab.pki import LabPki
from afsd.ondemand.metadata import MetadataHasher, metadata_ranges
from afsd.trust.descriptors import BlobDescriptor, BlobTrust
from afsd.trust.identity import identity_of_certificate
from afsd.trust.tls import TlsConfig

LAYER = "sha256:" + "1" * 64


def genuine_stat(size: int = 3 << 20, chunk: int = 1 << 20) -> lpb.StatLayerResponse:
    data = bytes(range(256)) * (size // 256)
    metadata = MetadataHasher(metadata_ranges(size, [(chunk, chunk)]))
    metadata.update(0, data)
    return lpb.StatLayerResponse(
        digest=LAYER, afs_size=size, blob_digest="sha256:" + hashlib.sha256(data).hexdigest(), chunk_size=chunk,
        chunk_digests=[hashlib.sha256(data[i:i + chunk]).digest() for i in range(0, size, chunk)],
        data_map=[lpb.ByteRange(offset=chunk, length=chunk)], converter="afsd-erofs/3 erofs-utils/1.5",
        diff_id="sha256:" + "2" * 64, implicit_dirs=["/", "/srv/app", "/caf%C3%A9"],
        metadata_digest=metadata.hexdigest())


@pytest.mark.parametrize("text, ok", [
    ("127.0.0.1:80", True), ("[::1]:60051", True), ("node-a.example:1", True), ("unix:/run/afsd/node.sock", False),
    ("127.0.0.1:0", False), ("127.0.0.1:65536", False), ("127.0.0.1:08", False), ("[::1]", False),
    ("-bad.example:1", False), ("a b:1", False), ("::1:80", False), ("x" * 300 + ":1", False),
])
def test_an_endpoint_is_a_host_and_port_this_node_may_dial(text: str, ok: bool) -> None:
    assert endpoint_is_valid(text) is ok


@pytest.mark.parametrize("path, problem", [
    ("/", None), ("/srv/app", None), ("/caf%C3%A9", None), ("srv", "is not an absolute path"),
    ("/srv/../etc", "has a '.', '..' or NUL component"), ("/srv/%2E%2E/etc", "has a '.', '..' or NUL component"),
    ("/a/%00b", "has a '.', '..' or NUL component"), ("/a//b", "is not in canonical form"),
    ("/a/%2Fb", "is not in canonical form"),
])
def test_implicit_dirs_must_be_clean_canonical_paths(path: str, problem: str | None) -> None:
    found = implicit_dir_problem(path)
    assert (found is None) if problem is None else (problem in found), found


def test_a_stat_answer_is_checked_for_its_layer_bounds_and_table() -> None:
    check_stat(genuine_stat(), LAYER, peer="p", diff_id="sha256:" + "2" * 64)
    cases = {
        "answered StatLayer for layer": lambda s: setattr(s, "digest", "sha256:" + "3" * 64),
        "blob size": lambda s: setattr(s, "afs_size", 1 << 50),
        "chunk size 1099511627776": lambda s: setattr(s, "chunk_size", 1 << 40),
        "chunk size 1000000": lambda s: setattr(s, "chunk_size", 1000000),
        "chunk table of 2 entries": lambda s: s.chunk_digests.pop(),
        "data map has ranges outside": lambda s: s.data_map.add(offset=3 << 20, length=1),
        "but the image config says": lambda s: setattr(s, "diff_id", ""),
        "metadata digest 'sha256:abc' is not": lambda s: setattr(s, "metadata_digest", "sha256:abc"),
    }
    for phrase, forge in cases.items():
        stat = genuine_stat()
        forge(stat)
        with pytest.raises(PeerAnswerError) as refused:
            check_stat(stat, LAYER, peer="layerstore 10.0.0.9:1", diff_id="sha256:" + "2" * 64)
        assert phrase in str(refused.value) and str(refused.value).startswith("layerstore 10.0.0.9:1: "), phrase


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return LabPki(tmp_path_factory.mktemp("pki"))


def signed(tls: TlsConfig, stat: lpb.StatLayerResponse) -> lpb.StatLayerResponse:
    from afsd.cluster.peers import stat_to_peer_layer

    stat.descriptor.CopyFrom(BlobTrust(tls).sign(stat_to_peer_layer(stat).blob))
    return stat


def test_a_signed_descriptor_roots_every_field_of_the_answer(pki: LabPki) -> None:
    converter = TlsConfig.from_dir(pki.node("converter"))
    reader = BlobTrust(TlsConfig.from_dir(pki.node("reader")))
    stat = signed(converter, genuine_stat())
    descriptor = reader.verified_descriptor(stat, LAYER, peer="p", diff_id=stat.diff_id)
    assert descriptor is not None and descriptor.signer == "converter" and descriptor.blob_digest == stat.blob_digest
    tampered = {
        "its blob digest differs": lambda s: setattr(s, "blob_digest", "sha256:" + "9" * 64),
        "its chunk table differs": lambda s: s.chunk_digests.__setitem__(0, b"\0" * 32),
        "its data map differs": lambda s: s.data_map.add(offset=0, length=1),
        "its implicit dir list differs": lambda s: s.implicit_dirs.append("/etc"),
        "its metadata digest differs": lambda s: setattr(s, "metadata_digest", "sha256:" + "7" * 64),
        "its metadata digest differs from the signed one (sha256:": lambda s: s.ClearField("metadata_digest"),
        "its size differs": lambda s: setattr(s, "afs_size", 2 << 20),
        "its signed descriptor is for layer": lambda s: setattr(s, "digest", "sha256:" + "4" * 64),
        "does not verify: bad signature": lambda s: setattr(s.descriptor, "signature", s.descriptor.signature[:-2] + b"xx"),
        "not in canonical form": lambda s: setattr(s.descriptor, "payload", s.descriptor.payload.replace(b",", b", ", 1)),
    }
    for phrase, forge in tampered.items():
        copy = lpb.StatLayerResponse()
        copy.CopyFrom(stat)
        forge(copy)
        with pytest.raises(PeerAnswerError) as refused:
            reader.verified_descriptor(copy, copy.digest, peer="p")
        assert phrase in str(refused.value), (phrase, str(refused.value))
    with pytest.raises(PeerAnswerError, match="has diff_id"):
        reader.verified_descriptor(stat, LAYER, peer="p", diff_id="sha256:" + "5" * 64)


def test_a_descriptor_from_before_metadata_digests_still_verifies_and_attests_none(pki: LabPki) -> None:
    """Version-1 descriptors (converters before afsd-erofs/3) have no metadata digest: they verify as they
    did, and an answer under one must carry none (a reader then checks metadata by whole chunks)."""
    converter = TlsConfig.from_dir(pki.node("converter"))
    reader = BlobTrust(TlsConfig.from_dir(pki.node("reader")))
    old = genuine_stat()
    old.ClearField("metadata_digest")
    old = signed(converter, old)
    assert b'"v":1' in old.descriptor.payload and b"metadata_digest" not in old.descriptor.payload
    descriptor = reader.verified_descriptor(old, LAYER, peer="p", diff_id=old.diff_id)
    assert descriptor is not None and descriptor.metadata_digest == ""
    added = lpb.StatLayerResponse()
    added.CopyFrom(old)
    added.metadata_digest = genuine_stat().metadata_digest
    with pytest.raises(PeerAnswerError, match="its metadata digest differs from the signed one"):
        reader.verified_descriptor(added, LAYER, peer="p")
    new = signed(converter, genuine_stat())
    assert b'"v":2' in new.descriptor.payload
    assert reader.verified_descriptor(new, LAYER, peer="p").metadata_digest == new.metadata_digest


def test_only_a_node_of_the_cluster_ca_may_sign(pki: LabPki, tmp_path: Path) -> None:
    reader = BlobTrust(TlsConfig.from_dir(pki.node("reader")))
    for signer, phrase in ((TlsConfig.from_dir(pki.user("converter")), "is not a node"),
                           (TlsConfig.from_dir(LabPki(tmp_path / "other").node("converter")),
                            "does not lead to the cluster CA")):
        with pytest.raises(PeerAnswerError, match=phrase):
            reader.verified_descriptor(signed(signer, genuine_stat()), LAYER, peer="p")
    with pytest.raises(PeerAnswerError, match="sent no signed blob descriptor"):
        reader.verified_descriptor(genuine_stat(), LAYER, peer="p")
    assert BlobTrust(None).verified_descriptor(genuine_stat(), LAYER, peer="p") is None  # dev mode: nothing to check


def test_a_descriptor_must_be_canonical_json_of_known_fields() -> None:
    descriptor = BlobDescriptor(LAYER, "d", "c", "b", 1, 2, "t", "m", "i", "s", 3, "sha256:" + "8" * 64)
    undigested = BlobDescriptor(LAYER, "d", "c", "b", 1, 2, "t", "m", "i", "s", 3)
    assert BlobDescriptor.parse(descriptor.payload()) == descriptor
    assert BlobDescriptor.parse(undigested.payload()) == undigested
    for payload in (b"[]", b'{"v": 2}', descriptor.payload().replace(b'"size":1', b'"size":true'),
                    descriptor.payload()[:-1] + b',"extra":1}', descriptor.payload().replace(b'"v":2', b'"v":1'),
                    undigested.payload().replace(b'"v":1', b'"v":2'),
                    descriptor.payload().replace(b'"sha256:' + b"8" * 64 + b'"', b'""')):
        with pytest.raises(ValueError):
            BlobDescriptor.parse(payload)


def afsd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "afsd", *args], capture_output=True, text=True, timeout=60)


def test_afsd_certs_makes_a_ca_and_node_and_user_certificates(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert afsd("certs", "init", "--dir", str(pki)).returncode == 0
    assert (pki / "ca.key").stat().st_mode & 0o777 == 0o600
    again = afsd("certs", "init", "--dir", str(pki))
    assert again.returncode != 0 and "already holds a CA" in again.stderr
    assert afsd("certs", "issue", "node-a", "--dir", str(pki), "--host", "10.0.0.1", "--host", "node-a.lan").returncode == 0
    assert afsd("certs", "issue", "alice", "--user", "--dir", str(pki)).returncode == 0
    missing = afsd("certs", "issue", "node-b", "--dir", str(pki))
    assert missing.returncode != 0 and "--host" in missing.stderr and len(missing.stderr.splitlines()) == 1
    node, user = TlsConfig.from_dir(pki / "node-a").check(), TlsConfig.from_dir(pki / "alice").check()
    assert node.identity.is_node and node.identity.name == "node-a"
    assert node.identity.covers_host("10.0.0.1") and node.identity.covers_host("NODE-A.lan")
    assert not node.identity.covers_host("10.0.0.2")
    assert identity_of_certificate(user.chain[0]).roles == {"afsd:users"}
    assert (pki / "node-a" / "tls.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("mode, refused", [(0o600, False), (0o400, False), (0o640, False), (0o440, False),
                                           (0o660, True), (0o644, True), (0o604, True), (0o650, True)])
def test_a_token_file_may_be_group_readable_as_a_kubernetes_secret_gives_it(tmp_path: Path, mode: int,
                                                                            refused: bool) -> None:
    """A Secret volume with the pod's fsGroup gives a non-root proxy its token file as root:fsGroup 0440."""
    from afsd.errors import UsageError
    from afsd.trust.tokens import BearerTokens

    tokens = tmp_path / "tokens"
    tokens.write_text("alice 0123456789abcdef0123\n")
    tokens.chmod(mode)
    if refused:
        with pytest.raises(UsageError, match="is open to others"):
            BearerTokens.load(tokens)
    else:
        assert BearerTokens.load(tokens).holder([("authorization", "Bearer 0123456789abcdef0123")]) == "alice"
