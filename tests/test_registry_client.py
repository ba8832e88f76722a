"""The registry client against a real docker-registry: manifests (OCI, Docker schema 2, indexes),
platform selection, image configs, verified blob downloads, and what users see when things are wrong."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from afsd.errors import (
    DigestMismatchError,
    ManifestFormatError,
    NotFoundError,
    PlatformNotFoundError,
    RegistryUnreachableError,
    UnsupportedMediaTypeError,
)
from afsd.lab.layers import LayerBlob
from afsd.lab.oci_layout import write_oci_layout
from afsd.oci import mediatypes
from afsd.oci.client import RegistryClient, ResolvedImage
from afsd.oci.config import RegistryConfig
from afsd.oci.manifest import Descriptor
from afsd.oci.platform import Platform
from afsd.oci.reference import parse_reference
from tests.support.faultproxy import FaultProxy
from tests.support.registries import (
    Blob,
    LabRegistry,
    PushedImage,
    image_of_files,
    layer_blobs,
    push_image,
    put_image_raw,
)

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64", "v8")
ARMV7 = Platform("linux", "arm", "v7")
TWO_LAYERS = image_of_files([{"bin/hello": b"#!/bin/sh\necho hello\n"}, {"etc/motd": b"welcome\n" * 1000}])
PER_PLATFORM = [
    image_of_files([{"bin/hello": b"amd64 binary"}], AMD64),
    image_of_files([{"bin/hello": b"arm64 binary"}, {"lib/extra": b"arm64 lib"}], ARM64),
    image_of_files([{"bin/hello": b"armv7 binary"}], ARMV7, entrypoint=["/bin/hello-arm"]),
]


@pytest.fixture(scope="module")
def images(open_registry: LabRegistry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PushedImage]:
    workdir = tmp_path_factory.mktemp("client-images")
    return {
        "single": push_image(open_registry, "client/single", TWO_LAYERS, workdir, tag="v1"),
        "docker-single": push_image(open_registry, "client/docker-single", TWO_LAYERS, workdir, tag="v1",
                                    media_types="docker"),
        "multi": push_image(open_registry, "client/multi", PER_PLATFORM, workdir, tag="v1"),
        "docker-multi": push_image(open_registry, "client/docker-multi", PER_PLATFORM, workdir, tag="v1",
                                   media_types="docker"),
    }


async def resolve(config: RegistryConfig, reference: str, platform: Platform = AMD64) -> ResolvedImage:
    async with RegistryClient(config) as client:
        return await client.resolve(parse_reference(reference), platform)


def assert_layers(resolved: ResolvedImage, expected: Sequence[LayerBlob]) -> None:
    assert [(d.digest, d.size) for d in resolved.layers] == [(b.digest, b.size) for b in expected]


# -- manifests and configs ---------------------------------------------------------------------------


async def test_resolve_oci_image_gives_manifest_config_and_layers(open_registry: LabRegistry,
                                                                   images: dict[str, PushedImage]) -> None:
    pushed = images["single"]
    (record,) = pushed.manifests
    resolved = await resolve(open_registry.config(), pushed.reference)

    assert resolved.reference == parse_reference(pushed.reference)
    assert resolved.manifest_digest == pushed.digest
    assert resolved.manifest_media_type == mediatypes.OCI_MANIFEST
    assert resolved.index_digest is None
    assert resolved.platform == AMD64
    assert resolved.config_digest == record.config_digest
    assert_layers(resolved, record.layers)
    assert all(d.media_type == "application/vnd.oci.image.layer.v1.tar+gzip" for d in resolved.layers)
    config = resolved.config
    assert config.entrypoint == ["/bin/hello"]
    assert config.cmd == ["--greet", "world"]
    assert config.env == ["PATH=/usr/bin:/bin", "GREETING=hi"]
    assert (config.working_dir, config.user) == ("/srv", "1000:1000")
    assert config.diff_ids == [layer.diff_id for layer in record.layers]
    assert (config.os, config.architecture) == ("linux", "amd64")


async def test_resolve_docker_schema2_image(open_registry: LabRegistry, images: dict[str, PushedImage]) -> None:
    pushed = images["docker-single"]
    resolved = await resolve(open_registry.config(), pushed.reference)
    assert resolved.manifest_media_type == mediatypes.DOCKER_MANIFEST
    assert resolved.manifest_digest == pushed.digest
    (record,) = pushed.manifests
    assert_layers(resolved, record.layers)
    assert {d.media_type for d in resolved.layers} == {"application/vnd.docker.image.rootfs.diff.tar.gzip"}
    assert resolved.config.diff_ids == [layer.diff_id for layer in record.layers]
    assert resolved.config.entrypoint == ["/bin/hello"]


@pytest.mark.parametrize("image", ["multi", "docker-multi"])
@pytest.mark.parametrize("requested, chosen", [
    (AMD64, 0), (ARM64, 1), (Platform("linux", "arm64"), 1), (ARMV7, 2), (Platform("linux", "arm"), 2),
])
async def test_index_picks_the_requested_platform(open_registry: LabRegistry, images: dict[str, PushedImage],
                                                  image: str, requested: Platform, chosen: int) -> None:
    pushed = images[image]
    spec, record = PER_PLATFORM[chosen], pushed.manifests[chosen]
    resolved = await resolve(open_registry.config(), pushed.reference, requested)
    assert resolved.index_digest == pushed.digest
    assert resolved.platform == spec.platform
    assert resolved.config.architecture == spec.platform.architecture
    assert resolved.config.entrypoint == list(spec.entrypoint)
    assert_layers(resolved, record.layers)
    expected_type = mediatypes.OCI_MANIFEST if image == "multi" else mediatypes.DOCKER_MANIFEST
    assert resolved.manifest_media_type == expected_type
    if image == "multi":  # pushed unchanged, so the registry serves our own manifest bytes
        assert resolved.manifest_digest == record.digest


@pytest.mark.parametrize("requested", [Platform("linux", "s390x"), Platform("linux", "arm", "v6"),
                                       Platform("windows", "amd64")])
async def test_platform_missing_from_index_lists_what_it_has(open_registry: LabRegistry,
                                                             images: dict[str, PushedImage],
                                                             requested: Platform) -> None:
    pushed = images["multi"]
    with pytest.raises(PlatformNotFoundError) as caught:
        await resolve(open_registry.config(), pushed.reference, requested)
    message = str(caught.value)
    assert f"no manifest for platform {requested}" in message
    assert "linux/amd64, linux/arm/v7, linux/arm64/v8" in message
    assert "client/multi:v1" in message


async def test_single_platform_image_for_another_platform_is_refused(open_registry: LabRegistry,
                                                                      images: dict[str, PushedImage]) -> None:
    with pytest.raises(PlatformNotFoundError, match="only available for linux/amd64, not linux/arm64"):
        await resolve(open_registry.config(), images["single"].reference, Platform("linux", "arm64"))


async def test_resolve_by_digest_and_by_tag_plus_digest(open_registry: LabRegistry,
                                                        images: dict[str, PushedImage]) -> None:
    pushed = images["multi"]
    name = pushed.reference.rsplit(":", 1)[0]
    by_tag = await resolve(open_registry.config(), pushed.reference, ARM64)
    by_digest = await resolve(open_registry.config(), f"{name}@{pushed.digest}", ARM64)
    tagged_digest = await resolve(open_registry.config(), f"{name}:some-other-tag@{pushed.digest}", ARM64)
    assert by_digest.manifest_digest == by_tag.manifest_digest == tagged_digest.manifest_digest
    assert by_digest.index_digest == pushed.digest
    # Pinning the platform's own manifest skips the index.
    child = await resolve(open_registry.config(), f"{name}@{by_tag.manifest_digest}", ARM64)
    assert child.index_digest is None
    assert child.layers == by_tag.layers


@pytest.mark.parametrize("reference, named", [
    ("client/single:nope", "client/single:nope"),
    ("client/never-pushed:v1", "client/never-pushed:v1"),
    ("client/single@sha256:" + "0" * 64, "client/single@sha256:" + "0" * 64),
])
async def test_unknown_repository_tag_or_digest_is_not_found(open_registry: LabRegistry,
                                                             images: dict[str, PushedImage],
                                                             reference: str, named: str) -> None:
    with pytest.raises(NotFoundError) as caught:
        await resolve(open_registry.config(), f"{open_registry.address}/{reference}")
    assert f"{open_registry.address}/{named}" in str(caught.value)
    assert "not found" in str(caught.value)


async def test_artifact_that_is_not_a_container_image_is_refused(open_registry: LabRegistry) -> None:
    config = Blob("application/vnd.cncf.helm.config.v1+json", b'{"name": "chart"}')
    layer = Blob("application/vnd.cncf.helm.chart.content.v1.tar+gzip", b"chart bytes")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST,
                           "config": config.descriptor(), "layers": [layer.descriptor()]}).encode()
    put_image_raw(open_registry, "client/chart", "v1", [config, layer], manifest, mediatypes.OCI_MANIFEST)
    with pytest.raises(UnsupportedMediaTypeError, match="not a container image.*helm.config"):
        await resolve(open_registry.config(), f"{open_registry.address}/client/chart:v1")


async def test_config_with_wrong_number_of_diff_ids_is_refused(open_registry: LabRegistry, tmp_path: Path) -> None:
    layout = write_oci_layout(tmp_path, "inconsistent", image_of_files([{"a": b"1"}]))
    (record,) = layout.manifests
    manifest = json.loads(layout.read_blob(record.digest))
    manifest["layers"].append(manifest["layers"][0])  # two layers, one diff_id
    raw = json.dumps(manifest).encode()
    blobs = [Blob(mediatypes.OCI_CONFIG, layout.read_blob(record.config_digest)),
             *(Blob(layer.media_type, layout.read_blob(layer.digest)) for layer in record.layers)]
    put_image_raw(open_registry, "client/inconsistent", "v1", blobs, raw, mediatypes.OCI_MANIFEST)
    with pytest.raises(ManifestFormatError, match="lists 2 layers but its config 1 diff_ids"):
        await resolve(open_registry.config(), f"{open_registry.address}/client/inconsistent:v1")


# -- blobs -------------------------------------------------------------------------------------------------


async def test_fetch_blob_writes_verified_layers(open_registry: LabRegistry, images: dict[str, PushedImage],
                                                 tmp_path: Path) -> None:
    pushed = images["single"]
    async with RegistryClient(open_registry.config()) as client:
        resolved = await client.resolve(parse_reference(pushed.reference), AMD64)
        for index, descriptor in enumerate(resolved.layers):
            await client.fetch_blob(resolved.reference, descriptor, tmp_path / "layers" / f"{index}.tar.gz")
    assert [(tmp_path / "layers" / f"{i}.tar.gz").read_bytes() for i in range(2)] == \
        [b.data for b in layer_blobs(pushed)]
    assert sorted(p.name for p in (tmp_path / "layers").iterdir()) == ["0.tar.gz", "1.tar.gz"]


async def test_missing_blob_is_not_found_and_leaves_nothing(open_registry: LabRegistry,
                                                            images: dict[str, PushedImage], tmp_path: Path) -> None:
    missing = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", "sha256:" + "1" * 64, 10)
    async with RegistryClient(open_registry.config()) as client:
        with pytest.raises(NotFoundError, match=f"blob {missing.digest} of .*client/single not found"):
            await client.fetch_blob(parse_reference(images["single"].reference), missing, tmp_path / "blob")
    assert list(tmp_path.iterdir()) == []


async def test_corrupted_blob_is_rejected_and_deleted(open_registry: LabRegistry, images: dict[str, PushedImage],
                                                      fault_proxy: Callable[..., FaultProxy], tmp_path: Path) -> None:
    proxy = fault_proxy(open_registry.address)
    layer = images["single"].manifests[0].layers[1]
    proxy.corrupt(f"/blobs/{layer.digest}")
    config = open_registry.config(insecure_hosts=frozenset({proxy.address}))
    descriptor = Descriptor(layer.media_type, layer.digest, layer.size)
    async with RegistryClient(config) as client:
        with pytest.raises(DigestMismatchError) as caught:
            await client.fetch_blob(parse_reference(f"{proxy.address}/client/single:v1"), descriptor,
                                    tmp_path / "layer")
    message = str(caught.value)
    assert layer.digest in message and proxy.address in message and "does not match its digest" in message
    assert list(tmp_path.iterdir()) == []


async def test_blob_longer_than_its_descriptor_is_cut_off(open_registry: LabRegistry,
                                                          images: dict[str, PushedImage],
                                                          fault_proxy: Callable[..., FaultProxy],
                                                          tmp_path: Path) -> None:
    proxy = fault_proxy(open_registry.address)
    layer = layer_blobs(images["single"])[0]
    proxy.serve(f"/blobs/{layer.digest}", layer.data + b"\0" * 10_000_000)
    config = open_registry.config(insecure_hosts=frozenset({proxy.address}))
    async with RegistryClient(config) as client:
        with pytest.raises(DigestMismatchError, match=f"larger than the {layer.size} bytes"):
            await client.fetch_blob(parse_reference(f"{proxy.address}/client/single:v1"),
                                    Descriptor(layer.media_type, layer.digest, layer.size), tmp_path / "layer")
    assert list(tmp_path.iterdir()) == []


# -- manifests the client must not trust ----------------------------------------------------------------


async def test_manifest_by_tag_is_checked_against_docker_content_digest(
        open_registry: LabRegistry, images: dict[str, PushedImage], fault_proxy: Callable[..., FaultProxy]) -> None:
    proxy = fault_proxy(open_registry.address)
    proxy.corrupt("/manifests/v1")
    config = open_registry.config(insecure_hosts=frozenset({proxy.address}))
    with pytest.raises(DigestMismatchError, match=f"client/single:v1 from {proxy.address} does not match"):
        await resolve(config, f"{proxy.address}/client/single:v1")


async def test_manifest_by_digest_must_hash_to_that_digest(
        open_registry: LabRegistry, images: dict[str, PushedImage], fault_proxy: Callable[..., FaultProxy]) -> None:
    proxy = fault_proxy(open_registry.address)
    pinned = images["single"].digest
    # A registry that answers a pinned digest with other (valid) content, and no digest header.
    other = images["multi"]
    proxy.serve(f"/manifests/{pinned}", other.layout.read_blob(other.manifests[1].digest),
                headers={"Content-Type": mediatypes.OCI_MANIFEST})
    config = open_registry.config(insecure_hosts=frozenset({proxy.address}))
    with pytest.raises(DigestMismatchError, match=f"does not match its digest {pinned}"):
        await resolve(config, f"{proxy.address}/client/single@{pinned}")


SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
ODD_TYPE = "application/vnd.example.thing+json"


@pytest.mark.parametrize("body, media_type, error, message", [
    pytest.param(json.dumps({"schemaVersion": 1, "name": "client/old", "tag": "v1", "fsLayers": [],
                             "history": [], "signatures": []}).encode(), SCHEMA1,
                 UnsupportedMediaTypeError, "schema 1 manifest.*re-push", id="schema1-refused-with-advice"),
    pytest.param(json.dumps({"schemaVersion": 2, "mediaType": ODD_TYPE}).encode(), ODD_TYPE,
                 UnsupportedMediaTypeError, "unsupported media type 'application/vnd.example.thing",
                 id="unknown-media-type"),
    pytest.param(b"{" + b" " * (5 * 1024 * 1024) + b"}", mediatypes.OCI_MANIFEST,
                 ManifestFormatError, "5242882 bytes, more than the 4194304", id="oversized"),
])
async def test_manifest_the_client_cannot_use_is_refused(open_registry: LabRegistry,
                                                         fault_proxy: Callable[..., FaultProxy], body: bytes,
                                                         media_type: str, error: type[Exception],
                                                         message: str) -> None:
    proxy = fault_proxy(open_registry.address)
    proxy.serve("/manifests/v1", body, headers={"Content-Type": media_type})
    config = open_registry.config(insecure_hosts=frozenset({proxy.address}))
    with pytest.raises(error, match=message):
        await resolve(config, f"{proxy.address}/client/refused:v1")


async def test_manifest_requests_accept_oci_and_docker_types(open_registry: LabRegistry,
                                                             images: dict[str, PushedImage],
                                                             fault_proxy: Callable[..., FaultProxy]) -> None:
    proxy = fault_proxy(open_registry.address)
    config = open_registry.config(insecure_hosts=frozenset({proxy.address}))
    await resolve(config, f"{proxy.address}/client/multi:v1")
    manifest_requests = proxy.requests_to("/manifests/")
    assert len(manifest_requests) == 2  # the index, then the amd64 manifest
    for request in manifest_requests:
        accepted = {t.strip() for t in request.headers["accept"].split(",")}
        assert {mediatypes.OCI_MANIFEST, mediatypes.OCI_INDEX, mediatypes.DOCKER_MANIFEST,
                mediatypes.DOCKER_MANIFEST_LIST} <= accepted


# -- reaching the registry --------------------------------------------------------------------------------


async def test_unreachable_registry_names_host_and_port(down_address: str) -> None:
    address = down_address
    config = RegistryConfig(insecure_hosts=frozenset({address}))
    with pytest.raises(RegistryUnreachableError, match=f"cannot connect to registry {address}"):
        await resolve(config, f"{address}/app:v1")


async def test_registry_not_listed_insecure_is_only_tried_over_https(open_registry: LabRegistry,
                                                                     images: dict[str, PushedImage]) -> None:
    served_before = len(open_registry.process.access_log())
    with pytest.raises(RegistryUnreachableError) as caught:
        await resolve(RegistryConfig(), images["single"].reference)
    message = str(caught.value)
    assert f"TLS connection to registry {open_registry.address}" in message
    assert f"--insecure-registry {open_registry.address}" in message
    assert len(open_registry.process.access_log()) == served_before  # no plain-HTTP request reached it
