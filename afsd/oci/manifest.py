"""Manifests, image indexes and image configs: from registry JSON to typed, validated values.

The registry client fetches raw bytes and checks their digest; this module turns them into
`Manifest` / `ImageIndex` / `ImageConfig`, picks one platform out of an index, and rejects what afsd
cannot run (schema 1, unknown media types, non-image artifacts) with a message that says so.
Everything a manifest says is untrusted input: digests are validated before they can reach a URL
or a file name, sizes must be non-negative integers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from afsd.errors import InvalidReferenceError, ManifestFormatError, PlatformNotFoundError, UnsupportedMediaTypeError
from afsd.oci import mediatypes
from afsd.oci.digest import parse_digest
from afsd.oci.platform import Platform

# A hostile registry must not be able to make us buffer arbitrary amounts of JSON.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MAX_CONFIG_SIZE = 8 * 1024 * 1024

SCHEMA1_TYPES = ("application/vnd.docker.distribution.manifest.v1+json",
                 "application/vnd.docker.distribution.manifest.v1+prettyjws")
# Content types that say nothing about which manifest kind the body is.
_GENERIC_TYPES = ("", "application/json", "text/plain", "application/octet-stream")
_CONFIG_TYPES = (mediatypes.OCI_CONFIG, mediatypes.DOCKER_CONFIG)


@dataclass(frozen=True)
class Descriptor:
    """A pointer to content: what it is, its digest and its size (OCI image-spec descriptor)."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    # Excluded from the hash so descriptors stay usable as dict keys / in sets.
    annotations: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Manifest:
    """One platform's image: its config blob and its layers, bottom to top."""

    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ImageIndex:
    """A multi-platform image (OCI index or Docker manifest list)."""

    media_type: str
    manifests: list[Descriptor]


@dataclass(frozen=True)
class ImageConfig:
    """What a container runtime needs from the image config, plus the uncompressed layer digests."""

    entrypoint: list[str]
    cmd: list[str]
    env: list[str]
    working_dir: str
    user: str
    diff_ids: list[str]
    os: str
    architecture: str
    variant: str = ""

    @property
    def platform(self) -> Platform:
        return Platform(self.os, self.architecture, self.variant)


def _media_type_of(document: dict[str, Any], content_type: str, source: str) -> str:
    header_type = content_type.split(";", 1)[0].strip().lower()
    body_type = document.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise ManifestFormatError(f"{source}: 'mediaType' must be a string")
    if document.get("schemaVersion") == 1 or header_type in SCHEMA1_TYPES or body_type in SCHEMA1_TYPES:
        raise UnsupportedMediaTypeError(
            f"{source} is a Docker schema 1 manifest, which afsd does not support: "
            "re-push the image with a current docker, buildah or skopeo (schema 2 or OCI)")
    # The body's mediaType is covered by the digest, the Content-Type header is not: prefer it.
    media_type = body_type or header_type
    if media_type in _GENERIC_TYPES:
        if "manifests" in document:
            media_type = mediatypes.OCI_INDEX
        elif "config" in document and "layers" in document:
            media_type = mediatypes.OCI_MANIFEST
    if media_type not in mediatypes.MANIFEST_TYPES + mediatypes.INDEX_TYPES:
        raise UnsupportedMediaTypeError(
            f"{source} has unsupported media type {media_type or '(none)'!r}: afsd handles OCI and "
            "Docker schema 2 image manifests and indexes")
    if document.get("schemaVersion") != 2:
        raise ManifestFormatError(f"{source}: schemaVersion must be 2, not {document.get('schemaVersion')!r}")
    return media_type


def _load_json_object(raw: bytes, source: str) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestFormatError(f"{source} is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ManifestFormatError(f"{source} is not a JSON object")
    return document


def _string_map(value: Any, source: str, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ManifestFormatError(f"{source}: {what} must map strings to strings")
    return dict(value)


def _parse_platform(value: Any, source: str) -> Platform | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ManifestFormatError(f"{source}: 'platform' must be an object")
    fields = [value.get(name) or "" for name in ("os", "architecture", "variant")]
    if not all(isinstance(f, str) for f in fields):
        raise ManifestFormatError(f"{source}: platform os/architecture/variant must be strings")
    return Platform(*(f.strip().lower() for f in fields))


def parse_descriptor(value: Any, source: str) -> Descriptor:
    if not isinstance(value, dict):
        raise ManifestFormatError(f"{source}: a descriptor must be an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestFormatError(f"{source}: a descriptor has no mediaType")
    if not isinstance(digest, str):
        raise ManifestFormatError(f"{source}: a descriptor has no digest")
    try:
        digest = parse_digest(digest)
    except InvalidReferenceError as exc:
        raise ManifestFormatError(f"{source}: {exc}") from None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestFormatError(f"{source}: descriptor {digest} has no valid size")
    return Descriptor(media_type, digest, size, _parse_platform(value.get("platform"), source),
                      _string_map(value.get("annotations"), source, "annotations"))


def _descriptor_list(document: dict[str, Any], key: str, source: str) -> list[Descriptor]:
    items = document.get(key)
    if not isinstance(items, list):
        raise ManifestFormatError(f"{source}: {key!r} must be a list")
    return [parse_descriptor(item, source) for item in items]


def parse_manifest(raw: bytes, media_type: str, *, source: str = "manifest") -> Manifest | ImageIndex:
    """Parse a manifest or index; `media_type` is the response's Content-Type (may be empty).

    `source` names the document in error messages (e.g. `manifest of host/repo:tag`).
    """
    if len(raw) > MAX_MANIFEST_SIZE:
        raise ManifestFormatError(f"{source} is larger than {MAX_MANIFEST_SIZE} bytes")
    document = _load_json_object(raw, source)
    kind = _media_type_of(document, media_type, source)
    if kind in mediatypes.INDEX_TYPES:
        return ImageIndex(kind, _descriptor_list(document, "manifests", source))
    config = parse_descriptor(document.get("config"), source)
    if config.media_type not in _CONFIG_TYPES:
        raise UnsupportedMediaTypeError(
            f"{source} is not a container image: its config has media type {config.media_type!r} "
            f"(expected {mediatypes.OCI_CONFIG} or {mediatypes.DOCKER_CONFIG})")
    return Manifest(kind, config, _descriptor_list(document, "layers", source),
                    _string_map(document.get("annotations"), source, "annotations"))


def select_platform(index: ImageIndex, platform: Platform, *, image: str = "the image") -> Descriptor:
    """The first entry of `index` for `platform` (an empty requested variant matches any variant).

    Raises PlatformNotFoundError listing the platforms the index does have.
    """
    for descriptor in index.manifests:
        if descriptor.platform is not None and platform.matches(descriptor.platform):
            return descriptor
    # Attestation manifests (unknown/unknown) and entries without a platform are not choices.
    available = sorted({str(d.platform) for d in index.manifests
                        if d.platform is not None and d.platform.os not in ("", "unknown")})
    raise PlatformNotFoundError(
        f"{image} has no manifest for platform {platform}; it has: {', '.join(available) or 'none'} "
        "(choose one with --platform)")


def _string_list(value: Any, source: str, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestFormatError(f"{source}: {what} must be a list of strings")
    return list(value)


def _string(value: Any, source: str, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ManifestFormatError(f"{source}: {what} must be a string")
    return value


def parse_image_config(raw: bytes, *, source: str = "image config") -> ImageConfig:
    """Parse an OCI / Docker image config blob."""
    if len(raw) > MAX_CONFIG_SIZE:
        raise ManifestFormatError(f"{source} is larger than {MAX_CONFIG_SIZE} bytes")
    document = _load_json_object(raw, source)
    runtime = document.get("config")
    runtime = {} if runtime is None else runtime
    rootfs = document.get("rootfs")
    rootfs = {} if rootfs is None else rootfs
    if not isinstance(runtime, dict) or not isinstance(rootfs, dict):
        raise ManifestFormatError(f"{source}: 'config' and 'rootfs' must be objects")
    diff_ids = _string_list(rootfs.get("diff_ids"), source, "rootfs.diff_ids")
    try:
        diff_ids = [parse_digest(d) for d in diff_ids]
    except InvalidReferenceError as exc:
        raise ManifestFormatError(f"{source}: {exc}") from None
    return ImageConfig(
        entrypoint=_string_list(runtime.get("Entrypoint"), source, "Entrypoint"),
        cmd=_string_list(runtime.get("Cmd"), source, "Cmd"),
        env=_string_list(runtime.get("Env"), source, "Env"),
        working_dir=_string(runtime.get("WorkingDir"), source, "WorkingDir"),
        user=_string(runtime.get("User"), source, "User"),
        diff_ids=diff_ids,
        os=_string(document.get("os"), source, "os").lower(),
        architecture=_string(document.get("architecture"), source, "architecture").lower(),
        variant=_string(document.get("variant"), source, "variant").lower(),
    )
