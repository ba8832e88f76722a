"""Lab images written as, and read back from, OCI image layouts (`oci-layout`, `index.json`, `blobs/`).

Where it sits: after `layers` and before `skopeo`. An `ImageSpec` (layers bottom first, platform,
runtime config) becomes layer blobs, a config and a manifest under `blobs/sha256`, and an
`index.json` entry naming it by tag; several specs become an index of per-platform manifests.
`LayoutImage` describes what was written (or, via `read_layout`, what a layout already holds),
which is what `skopeo.push_layout` sends to a registry and what tests compare against.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from afsd.errors import AfsdError
from afsd.lab.layers import LayerBlob, LayerSpec, sha256_digest, write_layer_blob
from afsd.oci import mediatypes
from afsd.oci.platform import Platform

CREATED = "2024-01-01T00:00:00Z"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"


class ImageBuildError(AfsdError):
    """Building, caching or pushing a lab image failed."""


@dataclass(frozen=True)
class ImageSpec:
    """One single-platform image: its layers (bottom first), platform and runtime config.

    `entrypoint`, `working_dir` and `user` go into the config only when set.
    """

    layers: tuple[LayerSpec, ...]
    platform: Platform = Platform("linux", "amd64")
    cmd: tuple[str, ...] = ("/bin/sh",)
    env: tuple[str, ...] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    labels: Mapping[str, str] = field(default_factory=dict)
    entrypoint: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""

    def runtime_config(self) -> dict[str, object]:
        """The `config` section of the image config (OCI image-spec config.md)."""
        config: dict[str, object] = {"Env": list(self.env), "Cmd": list(self.cmd), "Labels": dict(self.labels)}
        if self.entrypoint:
            config["Entrypoint"] = list(self.entrypoint)
        if self.working_dir:
            config["WorkingDir"] = self.working_dir
        if self.user:
            config["User"] = self.user
        return config


@dataclass(frozen=True)
class ManifestRecord:
    """A single-platform manifest written into a layout."""

    platform: Platform
    digest: str
    size: int
    media_type: str
    config_digest: str
    layers: tuple[LayerBlob, ...]


def find_manifest(records: Sequence[ManifestRecord], platform: Platform, image: str) -> ManifestRecord:
    """The record of `platform` among `records`, the manifests of `image` (which a KeyError names)."""
    for record in records:
        if record.platform == platform:
            return record
    raise KeyError(f"{image} has no manifest for {platform}")


def blob_path(layout_dir: Path, digest: str) -> Path:
    """Where the blob `sha256:<hex>` lives in the layout at `layout_dir`."""
    return layout_dir / "blobs" / "sha256" / digest.split(":", 1)[1]


@dataclass(frozen=True)
class LayoutImage:
    """What `write_oci_layout` wrote under `tag`: a manifest, or an index of several."""

    layout_dir: Path
    tag: str
    digest: str  # of the manifest, or of the index
    media_type: str
    manifests: tuple[ManifestRecord, ...]

    @property
    def is_index(self) -> bool:
        return self.media_type in mediatypes.INDEX_TYPES

    @property
    def oci_ref(self) -> str:
        """The skopeo/umoci name of this image: `<layout dir>:<tag>`."""
        return f"{self.layout_dir}:{self.tag}"

    def manifest_for(self, platform: Platform) -> ManifestRecord:
        return find_manifest(self.manifests, platform, self.oci_ref)

    def read_blob(self, digest: str) -> bytes:
        """The bytes of a blob of this layout (a layer, config, manifest or index)."""
        return blob_path(self.layout_dir, digest).read_bytes()


def _store_blob(blobs_dir: Path, data: bytes) -> tuple[str, int]:
    digest = sha256_digest(data)
    path = blobs_dir / digest.split(":", 1)[1]
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        os.replace(partial, path)
    return digest, len(data)


def _json_bytes(document: object) -> bytes:
    return json.dumps(document, indent=2, sort_keys=False).encode() + b"\n"


def _platform_json(platform: Platform) -> dict[str, str]:
    doc = {"architecture": platform.architecture, "os": platform.os}
    if platform.variant:
        doc["variant"] = platform.variant
    return doc


def _write_image(blobs_dir: Path, spec: ImageSpec) -> ManifestRecord:
    layers = tuple(write_layer_blob(blobs_dir, layer) for layer in spec.layers)
    config = {
        "created": CREATED,
        **_platform_json(spec.platform),
        "config": spec.runtime_config(),
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": CREATED, "created_by": layer.created_by or f"afsd lab layer {i}"}
                    for i, layer in enumerate(spec.layers)],
    }
    config_digest, config_size = _store_blob(blobs_dir, _json_bytes(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "config": {"mediaType": mediatypes.OCI_CONFIG, "digest": config_digest,
                   "size": config_size},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
                   for layer in layers],
    }
    digest, size = _store_blob(blobs_dir, _json_bytes(manifest))
    return ManifestRecord(spec.platform, digest, size, mediatypes.OCI_MANIFEST, config_digest,
                          layers)


def _is_tagged(descriptor: Mapping, tag: str) -> bool:
    return descriptor.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag


def write_oci_layout(layout_dir: Path, tag: str, images: ImageSpec | Sequence[ImageSpec]) -> LayoutImage:
    """Write an image (or, given a sequence, an index of images) into an OCI layout under `tag`.

    The layout is created if needed; other tags already in it are kept, so several images can share
    one layout and its blobs. A layout always holds OCI media types (skopeo ignores index.json
    entries of other types); `push_layout` converts to Docker schema 2 on the way to a registry.
    """
    layout_dir.mkdir(parents=True, exist_ok=True)
    (layout_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}) + "\n")
    blobs_dir = layout_dir / "blobs" / "sha256"
    specs = [images] if isinstance(images, ImageSpec) else list(images)
    if not specs:
        raise ValueError("write_oci_layout needs at least one image")
    records = tuple(_write_image(blobs_dir, spec) for spec in specs)
    if isinstance(images, ImageSpec):
        top_digest, top_size, top_type = records[0].digest, records[0].size, records[0].media_type
    else:
        index = {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_INDEX,
            "manifests": [{"mediaType": r.media_type, "digest": r.digest, "size": r.size,
                           "platform": _platform_json(r.platform)} for r in records],
        }
        top_digest, top_size = _store_blob(blobs_dir, _json_bytes(index))
        top_type = mediatypes.OCI_INDEX

    index_path = layout_dir / "index.json"
    layout_index = (json.loads(index_path.read_text()) if index_path.exists()
                    else {"schemaVersion": 2, "manifests": []})
    layout_index["manifests"] = [d for d in layout_index["manifests"] if not _is_tagged(d, tag)]
    layout_index["manifests"].append({"mediaType": top_type, "digest": top_digest, "size": top_size,
                                      "annotations": {REF_NAME_ANNOTATION: tag}})
    partial = index_path.with_name("index.json.partial")
    partial.write_bytes(_json_bytes(layout_index))
    os.replace(partial, index_path)
    return LayoutImage(layout_dir, tag, top_digest, top_type, records)


def tagged_descriptor(layout_dir: Path, tag: str) -> dict:
    """The `index.json` descriptor of the image tagged `tag` in the layout at `layout_dir`."""
    index = json.loads((layout_dir / "index.json").read_text())
    for descriptor in index["manifests"]:
        if _is_tagged(descriptor, tag):
            return descriptor
    raise ImageBuildError(f"OCI layout {layout_dir} has no image tagged {tag!r}")


def read_layout(layout_dir: Path, tag: str) -> LayoutImage:
    """Describe an image (manifest or index) already written into an OCI layout under `tag`."""

    def blob(digest: str) -> bytes:
        return blob_path(layout_dir, digest).read_bytes()

    def record(descriptor: dict, platform: Platform | None) -> ManifestRecord:
        manifest = json.loads(blob(descriptor["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        if platform is None:
            platform = Platform(config.get("os", ""), config.get("architecture", ""), config.get("variant", ""))
        layers = tuple(LayerBlob(layer["digest"], diff_id, layer["size"], layer["mediaType"],
                                 mediatypes.layer_compression(layer["mediaType"]))
                       for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"]))
        return ManifestRecord(platform, descriptor["digest"], descriptor["size"], manifest["mediaType"],
                              manifest["config"]["digest"], layers)

    top = tagged_descriptor(layout_dir, tag)
    if top["mediaType"] in mediatypes.INDEX_TYPES:
        entries = json.loads(blob(top["digest"]))["manifests"]
        records = tuple(record(d, Platform(d["platform"]["os"], d["platform"]["architecture"],
                                           d["platform"].get("variant", ""))) for d in entries)
    else:
        records = (record(top, None),)
    return LayoutImage(layout_dir, tag, top["digest"], top["mediaType"], records)
