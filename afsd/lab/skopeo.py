"""Lab images moved between OCI layouts and registries with skopeo, each move checked by digest.

Where it sits: after `oci_layout`, at the registry's door. `push_layout` sends a layout's image (or
index) to a registry and checks that the registry now serves what was written: with OCI media types
skopeo preserves digests, so the manifest must come back byte for byte; with Docker media types it
rewrites manifests, so every layer blob must keep its digest (a layer is never recompressed behind
our back). `pull_to_layout` copies an image from a registry into a layout, layers unchanged, for an
independent unpacker such as umoci.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from afsd.errors import MissingToolError
from afsd.lab.facts import ImageFacts
from afsd.lab.layers import sha256_digest
from afsd.lab.oci_layout import (
    ImageBuildError,
    LayoutImage,
    ManifestRecord,
    blob_path,
    find_manifest,
    tagged_descriptor,
)
from afsd.oci import mediatypes
from afsd.oci.platform import Platform

MediaTypes = Literal["oci", "docker"]


@dataclass(frozen=True)
class PushedImage:
    """An image in a registry: where it is, what the registry serves, and what must be true of it.

    `digest`, `media_type` and `manifests` describe what the registry serves (for a Docker-typed
    push they differ from the OCI `layout` it came from; the layer blobs never do), one record per
    platform in the layout's order. `facts` holds, per platform, what the unpacked root filesystem
    must contain.
    """

    registry: str  # host:port
    repository: str
    tag: str
    digest: str
    media_type: str
    manifests: tuple[ManifestRecord, ...]
    layout: LayoutImage
    facts: Mapping[Platform, ImageFacts] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        """`host:port/repository:tag`, ready for `parse_reference`."""
        return f"{self.registry}/{self.repository}:{self.tag}"

    @property
    def platforms(self) -> tuple[Platform, ...]:
        return tuple(record.platform for record in self.manifests)

    def manifest_for(self, platform: Platform) -> ManifestRecord:
        return find_manifest(self.manifests, platform, self.reference)

    def pinned_reference(self, platform: Platform) -> str:
        """`host:port/repository@sha256:...` of one platform's manifest."""
        return f"{self.registry}/{self.repository}@{self.manifest_for(platform).digest}"


def _skopeo() -> str:
    binary = shutil.which("skopeo")
    if binary is None:
        raise MissingToolError("skopeo is not installed; run scripts/setup.sh (Debian package skopeo)")
    return binary


def _run(argv: list[str], what: str) -> bytes:
    result = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        # A Go panic ends in a goroutine dump: its first line says what happened, the last says nothing.
        cause = next((line for line in lines if line.startswith(("panic:", "fatal error:"))), None)
        raise ImageBuildError(f"{what} failed: {cause or (lines[-1] if lines else f'exit code {result.returncode}')}")
    return result.stdout


def _served_manifest(reference: str, creds: str | None) -> bytes:
    argv = [_skopeo(), "inspect", "--raw", "--tls-verify=false"]
    if creds:
        argv += ["--creds", creds]
    return _run(argv + [f"docker://{reference}"], f"skopeo inspect of {reference}")


def push_layout(layout: LayoutImage, registry: str, repository: str, tag: str | None = None, *,
                media_types: MediaTypes = "oci", creds: str | None = None,
                facts: Mapping[Platform, ImageFacts] | None = None) -> PushedImage:
    """Push `layout` to `registry` (`host:port`, plain HTTP) as `repository:tag` with skopeo.

    With OCI media types skopeo runs with `--preserve-digests` and the registry must then serve the
    manifest (or index, pushed with all its manifests) byte for byte as written. With Docker media
    types (`--format v2s2`: a schema 2 manifest, or a manifest list for an index; gzip layers only)
    skopeo rewrites the manifests, so the check is that every layer blob kept its digest: layers are
    never recompressed either way. `creds` is `user:password` for registries with auth.
    """
    tag = tag or layout.tag
    target = f"{registry}/{repository}:{tag}"
    argv = [_skopeo(), "copy", "--quiet", "--dest-tls-verify=false"]
    if media_types == "docker":
        if any(layer.compression != "gzip" for record in layout.manifests for layer in record.layers):
            raise ValueError("push_layout: Docker schema 2 images here carry gzip layers only")
        argv += ["--format", "v2s2"]
    else:
        argv.append("--preserve-digests")
    if layout.is_index:
        argv.append("--all")
    if creds:
        argv += ["--dest-creds", creds]
    _run(argv + [f"oci:{layout.oci_ref}", f"docker://{target}"],
         f"skopeo push of {layout.oci_ref} to {target}")

    raw = _served_manifest(target, creds)
    served = sha256_digest(raw)
    if media_types == "oci":
        if served != layout.digest:
            raise ImageBuildError(f"registry {registry} serves {repository}:{tag} as {served}, not the "
                                  f"{layout.digest} that was pushed (skopeo rewrote the manifest)")
        manifests = layout.manifests
    elif layout.is_index:
        manifests = _docker_list_records(layout, raw, f"{registry}/{repository}", creds, target)
    else:
        manifests = (_docker_record(layout.manifests[0], raw, target),)
    return PushedImage(registry, repository, tag, served, json.loads(raw)["mediaType"], manifests,
                       layout, dict(facts or {}))


def _docker_record(source: ManifestRecord, raw: bytes, target: str) -> ManifestRecord:
    manifest = json.loads(raw)
    if manifest.get("mediaType") != mediatypes.DOCKER_MANIFEST:
        raise ImageBuildError(f"{target}: skopeo pushed {manifest.get('mediaType')}, not a Docker manifest")
    served_layers = [(layer["digest"], layer["mediaType"]) for layer in manifest["layers"]]
    if [digest for digest, _ in served_layers] != [layer.digest for layer in source.layers]:
        raise ImageBuildError(f"{target}: skopeo changed the layer blobs while converting to Docker schema 2")
    layers = tuple(replace(layer, media_type=media_type)
                   for layer, (_, media_type) in zip(source.layers, served_layers))
    return ManifestRecord(source.platform, sha256_digest(raw), len(raw), mediatypes.DOCKER_MANIFEST,
                          manifest["config"]["digest"], layers)


def _docker_list_records(layout: LayoutImage, raw: bytes, name: str, creds: str | None,
                         target: str) -> tuple[ManifestRecord, ...]:
    """The records of a served Docker manifest list, in the layout's platform order."""
    listing = json.loads(raw)
    if listing.get("mediaType") != mediatypes.DOCKER_MANIFEST_LIST:
        raise ImageBuildError(f"{target}: skopeo pushed {listing.get('mediaType')}, not a Docker manifest list")
    by_platform = {Platform(d["platform"]["os"], d["platform"]["architecture"], d["platform"].get("variant", "")):
                   d["digest"] for d in listing["manifests"]}
    records = []
    for source in layout.manifests:
        if source.platform not in by_platform:
            raise ImageBuildError(f"{target}: skopeo left {source.platform} out of the Docker manifest list")
        child = _served_manifest(f"{name}@{by_platform[source.platform]}", creds)
        records.append(_docker_record(source, child, target))
    return tuple(records)


def pull_to_layout(reference: str, layout_dir: Path, tag: str, *, creds: str | None = None) -> None:
    """Copy one image manifest from a registry into an OCI layout with skopeo, layers unchanged.

    `reference` is `host:port/repo:tag`, or `host:port/repo@sha256:...` to pick one platform of an
    index. A Docker manifest is converted to OCI (the layout format requires it) but the layer blobs
    are kept as served, uncompressed ones included (skopeo would otherwise gzip them for an `oci:`
    destination); this is checked against the manifest the registry serves.
    """
    argv = [_skopeo(), "copy", "--quiet", "--src-tls-verify=false", "--dest-oci-accept-uncompressed-layers"]
    if creds:
        argv += ["--src-creds", creds]
    _run(argv + [f"docker://{reference}", f"oci:{layout_dir}:{tag}"],
         f"skopeo pull of {reference} into {layout_dir}")
    served = json.loads(_served_manifest(reference, creds))
    if "layers" not in served:
        raise ImageBuildError(f"pull_to_layout: {reference} is an index; pin one platform's manifest digest")
    pulled = json.loads(blob_path(layout_dir, tagged_descriptor(layout_dir, tag)["digest"]).read_bytes())
    if [layer["digest"] for layer in pulled["layers"]] != [layer["digest"] for layer in served["layers"]]:
        raise ImageBuildError(f"skopeo changed the layer blobs of {reference} while copying it to {layout_dir}")
