"""OCI and Docker media types, and which compression a layer media type implies."""

from __future__ import annotations

from typing import Literal

from afsd.errors import UnsupportedMediaTypeError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
# What we send as Accept on manifest GETs: without it registries fall back to schema 1.
MANIFEST_ACCEPT = ", ".join(MANIFEST_TYPES + INDEX_TYPES)

Compression = Literal["gzip", "zstd", "none"]

LAYER_COMPRESSION: dict[str, Compression] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}


def layer_compression(media_type: str) -> Compression:
    """The compression of a layer blob, from its media type; unknown types are an error."""
    try:
        return LAYER_COMPRESSION[media_type]
    except KeyError:
        raise UnsupportedMediaTypeError(
            f"unsupported layer media type {media_type!r}: afsd handles tar layers "
            "(uncompressed, gzip or zstd; OCI or Docker names)"
        ) from None
