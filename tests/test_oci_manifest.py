"""Parsing manifests, indexes and image configs, and choosing a platform: what registries actually send,
and the malformed or hostile documents they might."""

from __future__ import annotations

import json

import pytest

from afsd.errors import PlatformNotFoundError, UnsupportedMediaTypeError
from afsd.oci import mediatypes
from afsd.oci.manifest import (
    Descriptor,
    ImageIndex,
    Manifest,
    ManifestFormatError,
    parse_image_config,
    parse_manifest,
    select_platform,
)
from afsd.oci.platform import Platform

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def manifest_json(**extra: object) -> dict:
    return {"schemaVersion": 2, "config": {"mediaType": mediatypes.OCI_CONFIG, "digest": D1, "size": 7},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D2, "size": 9,
                        "annotations": {"note": "x"}}], **extra}


def index_json(*platforms: dict | None) -> dict:
    entries = []
    for number, platform in enumerate(platforms):
        entry = {"mediaType": mediatypes.OCI_MANIFEST, "digest": "sha256:" + f"{number:x}" * 64, "size": 100}
        if platform is not None:
            entry["platform"] = platform
        entries.append(entry)
    return {"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": entries}


def encode(document: dict) -> bytes:
    return json.dumps(document).encode()


def test_oci_manifest_without_media_type_field_uses_the_header() -> None:
    parsed = parse_manifest(encode(manifest_json()), mediatypes.OCI_MANIFEST + "; charset=utf-8")
    assert isinstance(parsed, Manifest)
    assert parsed.media_type == mediatypes.OCI_MANIFEST
    assert parsed.config == Descriptor(mediatypes.OCI_CONFIG, D1, 7)
    assert parsed.layers == [Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", D2, 9,
                                        annotations={"note": "x"})]


def test_body_media_type_wins_over_a_generic_or_wrong_header() -> None:
    raw = encode(manifest_json(mediaType=mediatypes.DOCKER_MANIFEST))
    assert parse_manifest(raw, "application/json").media_type == mediatypes.DOCKER_MANIFEST
    assert parse_manifest(raw, mediatypes.OCI_INDEX).media_type == mediatypes.DOCKER_MANIFEST


@pytest.mark.parametrize("header", ["", "application/json", "text/plain"])
def test_shape_decides_when_nothing_names_the_type(header: str) -> None:
    assert isinstance(parse_manifest(encode(manifest_json()), header), Manifest)
    index = index_json({"os": "linux", "architecture": "amd64"})
    del index["mediaType"]
    assert isinstance(parse_manifest(encode(index), header), ImageIndex)


def test_descriptors_are_hashable_despite_annotations() -> None:
    parsed = parse_manifest(encode(manifest_json()), mediatypes.OCI_MANIFEST)
    assert len({*parsed.layers, *parsed.layers}) == 1


@pytest.mark.parametrize("mutate, complaint", [
    (lambda m: m["layers"][0].update(digest="sha256:../../etc/passwd"), "invalid digest"),
    (lambda m: m["layers"][0].update(digest="md5:abc"), "invalid digest"),
    (lambda m: m["layers"][0].update(size=-1), "no valid size"),
    (lambda m: m["layers"][0].update(size="9"), "no valid size"),
    (lambda m: m["layers"][0].update(size=True), "no valid size"),
    (lambda m: m["layers"][0].pop("mediaType"), "no mediaType"),
    (lambda m: m.update(layers={"not": "a list"}), "'layers' must be a list"),
    (lambda m: m.update(schemaVersion=3), "schemaVersion must be 2"),
    (lambda m: m["layers"][0].update(annotations={"a": 1}), "annotations must map strings"),
])
def test_malformed_manifests_are_rejected(mutate, complaint: str) -> None:
    document = manifest_json()
    mutate(document)
    with pytest.raises(ManifestFormatError, match=complaint):
        parse_manifest(encode(document), mediatypes.OCI_MANIFEST, source="manifest of x")


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b"\xff\xfe"])
def test_non_json_is_rejected(raw: bytes) -> None:
    with pytest.raises(ManifestFormatError, match="^manifest of x"):
        parse_manifest(raw, mediatypes.OCI_MANIFEST, source="manifest of x")


@pytest.mark.parametrize("document, header", [
    ({"schemaVersion": 1, "fsLayers": []}, "application/json"),
    ({"schemaVersion": 2}, "application/vnd.docker.distribution.manifest.v1+prettyjws"),
    ({"schemaVersion": 1}, "application/vnd.docker.distribution.manifest.v1+json"),
])
def test_schema1_is_refused(document: dict, header: str) -> None:
    with pytest.raises(UnsupportedMediaTypeError, match="schema 1"):
        parse_manifest(encode(document), header)


def test_non_image_config_is_refused() -> None:
    document = manifest_json()
    document["config"]["mediaType"] = "application/vnd.cncf.helm.config.v1+json"
    with pytest.raises(UnsupportedMediaTypeError, match="not a container image"):
        parse_manifest(encode(document), mediatypes.OCI_MANIFEST)


MULTI = index_json(
    {"os": "linux", "architecture": "amd64"},
    {"os": "linux", "architecture": "arm", "variant": "v6"},
    {"os": "linux", "architecture": "arm", "variant": "v7"},
    {"os": "Linux", "architecture": "ARM64"},  # no variant: arm64 means v8
    {"os": "unknown", "architecture": "unknown"},  # a build attestation
    None,
)


@pytest.mark.parametrize("requested, entry", [
    (Platform("linux", "amd64"), 0),
    (Platform("linux", "arm"), 1),  # no variant asked: the first arm entry
    (Platform("linux", "arm", "v7"), 2),
    (Platform("linux", "arm64"), 3),
    (Platform("linux", "arm64", "v8"), 3),
])
def test_select_platform(requested: Platform, entry: int) -> None:
    index = parse_manifest(encode(MULTI), mediatypes.OCI_INDEX)
    assert isinstance(index, ImageIndex)
    assert select_platform(index, requested) == index.manifests[entry]


def test_missing_platform_lists_the_real_choices() -> None:
    index = parse_manifest(encode(MULTI), mediatypes.OCI_INDEX)
    with pytest.raises(PlatformNotFoundError) as caught:
        select_platform(index, Platform("linux", "riscv64"), image="image r/x:1")
    assert str(caught.value) == ("image r/x:1 has no manifest for platform linux/riscv64; it has: linux/amd64, "
                                 "linux/arm/v6, linux/arm/v7, linux/arm64 (choose one with --platform)")


def test_image_config_fields() -> None:
    config = parse_image_config(encode({
        "architecture": "arm", "os": "linux", "variant": "v7",
        "config": {"Entrypoint": ["/init"], "Cmd": None, "Env": ["A=1"], "WorkingDir": "/w", "User": "app",
                   "Labels": {"x": "y"}},
        "rootfs": {"type": "layers", "diff_ids": [D1, D2.upper().replace("SHA256", "sha256")]},
    }))
    assert (config.entrypoint, config.cmd, config.env, config.working_dir, config.user) == (
        ["/init"], [], ["A=1"], "/w", "app")
    assert config.diff_ids == [D1, D2]
    assert config.platform == Platform("linux", "arm", "v7")


def test_image_config_with_no_runtime_section() -> None:
    config = parse_image_config(encode({"architecture": "amd64", "os": "linux", "rootfs": {"diff_ids": []}}))
    assert (config.entrypoint, config.cmd, config.env, config.working_dir, config.user, config.diff_ids) == (
        [], [], [], "", "", [])


@pytest.mark.parametrize("document, complaint", [
    ({"config": {"Env": "A=1"}}, "Env must be a list of strings"),
    ({"config": {"Cmd": [1]}}, "Cmd must be a list of strings"),
    ({"rootfs": {"diff_ids": ["sha256:short"]}}, "invalid digest"),
    ({"config": []}, "must be objects"),
])
def test_malformed_image_configs(document: dict, complaint: str) -> None:
    with pytest.raises(ManifestFormatError, match=complaint):
        parse_image_config(encode(document))
