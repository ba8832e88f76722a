"""Registry layers -> reproducible erofs blobs, their layout, and mounting them.

The pipeline, one module per step: `decompress` (layer blob -> tar stream + diff_id) -> `unpack`
(tar -> staging directory, OCI whiteouts -> overlayfs whiteouts) -> `mkfs` (staging -> erofs image)
-> `layout` (which byte ranges are file data) -> `convert` (the whole conversion, `BlobInfo`).
`mount` holds the mount(2) primitives (file-backed erofs, overlayfs); `stack` stacks an image's blobs
into its root file system, restoring the metadata of directories a layer does not list.
"""

from afsd.erofs.convert import (
    CHUNK_SIZE,
    CONVERTER_VERSION,
    BlobInfo,
    blob_id_for,
    convert_layer,
    convert_layer_async,
    converter_identity,
)

__all__ = [
    "CHUNK_SIZE",
    "CONVERTER_VERSION",
    "BlobInfo",
    "blob_id_for",
    "convert_layer",
    "convert_layer_async",
    "converter_identity",
]
