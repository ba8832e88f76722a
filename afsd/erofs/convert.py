"""Convert a registry layer blob into an erofs blob, once, reproducibly.

Data flow: layer blob (tar, gzip/zstd/none) -> `decompress.open_layer` -> `unpack.unpack_layer` into a
staging directory -> `mkfs.build_image` -> `layout.data_map` + chunk digests + metadata digest
(afsd/ondemand/metadata.py) -> `BlobInfo`, and the erofs blob renamed into place. Nodes exchange blobs by `blob_id`,
which any node derives from the layer digest alone (`blob_id_for`): the conversion is byte-for-byte
reproducible, so every node that converts the same layer with the same converter identity gets the same
bytes and the same `digest`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afsd.erofs.decompress import open_layer
from afsd.erofs.layout import data_map as compute_data_map
from afsd.erofs.mkfs import build_image, erofs_utils_version, max_name_bytes
from afsd.erofs.unpack import unpack_layer
from afsd.errors import ConversionError, LayerFormatError
from afsd.fsutil import fsync_directory
from afsd.oci.mediatypes import Compression
from afsd.ondemand.metadata import MetadataHasher, metadata_ranges

# Bump whenever the bytes a conversion produces change (unpack rules, mkfs options, post-processing).
# 2: mtimes after 2096 and before 1970 kept (mkfs.SOURCE_DATE_EPOCH); BlobInfo.implicit_dirs.
# 3: BlobInfo.metadata_digest (the bytes are 2's; a new identity keeps blobs described without it apart).
CONVERTER_VERSION = "3"
CHUNK_SIZE = 1 << 20
# `(stage, bytes done, bytes total)`, called from the converting thread: "unpacking" counts the layer
# blob read so far, "building erofs" has no byte count (mkfs.erofs runs), "hashing" counts the blob.
ConvertProgress = Callable[[str, int, int], None]
# Fixed namespace for the erofs UUID, so the UUID (stored in the superblock) follows from the blob id.
_UUID_NAMESPACE = uuid.UUID("7d1f1f4e-3b8a-4c55-9a0e-5f0c2b6a1e01")


@dataclass(frozen=True)
class BlobInfo:
    """What is known about a converted erofs blob; stored next to it and sent between nodes."""

    blob_id: str  # "sha256:<hex>" of f"{converter}\n{layer_digest}"
    layer_digest: str
    diff_id: str  # sha256 of the uncompressed tar
    size: int
    digest: str  # "sha256:<hex>" of the blob bytes
    data_map: list[tuple[int, int]]  # regular-file data ranges; everything else is metadata
    chunk_size: int
    chunk_digests: list[bytes]  # raw sha256 per chunk_size chunk; the last may be short
    converter: str
    # Directories the layer's tar does not list (`unpack.encode_dir_path` form, "/" for the root): the
    # blob holds them as 0755 root:root, but in the image they keep the metadata of the layers below
    # (`stack.mount_image_stack` restores it).
    implicit_dirs: list[str]
    # sha256 of the metadata bytes (afsd/ondemand/metadata.py): a reader checks them without whole chunks.
    # Empty for blobs described before converter 3.
    metadata_digest: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "blob_id": self.blob_id,
            "layer_digest": self.layer_digest,
            "diff_id": self.diff_id,
            "size": self.size,
            "digest": self.digest,
            "data_map": [[offset, length] for offset, length in self.data_map],
            "chunk_size": self.chunk_size,
            "chunk_digests": [d.hex() for d in self.chunk_digests],
            "converter": self.converter,
            "implicit_dirs": list(self.implicit_dirs),
            "metadata_digest": self.metadata_digest,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BlobInfo:
        return cls(
            blob_id=data["blob_id"],
            layer_digest=data["layer_digest"],
            diff_id=data["diff_id"],
            size=int(data["size"]),
            digest=data["digest"],
            data_map=[(int(offset), int(length)) for offset, length in data["data_map"]],
            chunk_size=int(data["chunk_size"]),
            chunk_digests=[bytes.fromhex(d) for d in data["chunk_digests"]],
            converter=data["converter"],
            implicit_dirs=[str(path) for path in data["implicit_dirs"]],
            metadata_digest=str(data.get("metadata_digest", "")),
        )


def converter_identity() -> str:
    """Names everything that determines a blob's bytes: this converter's version and erofs-utils'."""
    return f"afsd-erofs/{CONVERTER_VERSION} erofs-utils/{erofs_utils_version()}"


def blob_id_for(layer_digest: str) -> str:
    """The id of the erofs blob that converting `layer_digest` gives, without converting it."""
    text = f"{converter_identity()}\n{layer_digest}".encode()
    return "sha256:" + hashlib.sha256(text).hexdigest()


def convert_layer(layer_path: Path, compression: Compression, layer_digest: str, out_path: Path, *,
                  expected_diff_id: str | None = None, work_dir: Path | None = None,
                  progress: ConvertProgress | None = None) -> BlobInfo:
    """Convert the layer blob at `layer_path` into an erofs blob at `out_path` (blocking).

    The layer is unpacked into a temporary staging directory under `work_dir` (default: `out_path`'s
    directory), which is removed afterwards. `out_path` appears only complete (written to a `.partial`
    file, fsynced, renamed); on any error nothing is left behind. Raises `LayerFormatError` for a
    corrupt, truncated or unsafe layer or a diff_id other than `expected_diff_id`, `ConversionError`
    when mkfs.erofs or the disk fails. `progress` hears how far each stage is.
    """
    report_progress: ConvertProgress = progress or (lambda stage, done, total: None)
    converter = converter_identity()
    blob_id = blob_id_for(layer_digest)
    work_dir = work_dir if work_dir is not None else out_path.parent
    # A unique name: two conversions of the same layer may race; the rename makes one of them win.
    partial = out_path.with_name(f"{out_path.name}.{uuid.uuid4().hex[:12]}.partial")
    staging: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(prefix="afsd-staging-", dir=work_dir))
        layer_size = layer_path.stat().st_size
        with open_layer(layer_path, compression, layer_digest,
                        on_read=lambda done: report_progress("unpacking", done, layer_size)) as stream:
            report = unpack_layer(stream, staging, layer=layer_digest)
            stream.drain()  # the diff_id covers the padding after the tar's end marker too
            diff_id = stream.diff_id
        if expected_diff_id is not None and diff_id != expected_diff_id:
            raise LayerFormatError(
                f"layer {layer_digest} unpacks to diff_id {diff_id}, but the image config expects "
                f"{expected_diff_id}: the blob does not belong to this image"
            )
        if len(report.longest_name) > max_name_bytes():
            raise ConversionError(
                f"layer {layer_digest} has a {len(report.longest_name)}-byte file name "
                f"({report.longest_name_entry!r}), longer than mkfs.erofs {erofs_utils_version()} "
                f"can store ({max_name_bytes()} bytes): upgrade erofs-utils"
            )
        report_progress("building erofs", 0, 0)
        build_image(staging, partial, fs_uuid=uuid.uuid5(_UUID_NAMESPACE, blob_id), layer=layer_digest)
        shutil.rmtree(staging)
        staging = None
        ranges = compute_data_map(partial)
        total = partial.stat().st_size
        metadata = MetadataHasher(metadata_ranges(total, ranges))
        size, digest, chunk_digests = _digest_chunks(partial, metadata, report_progress)
        os.replace(partial, out_path)
        fsync_directory(out_path.parent)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise ConversionError(
            f"converting layer {layer_digest} to {out_path} failed: {e.strerror or e}"
            + (f" ({e.filename})" if e.filename else "")
        ) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return BlobInfo(blob_id=blob_id, layer_digest=layer_digest, diff_id=diff_id, size=size,
                    digest=digest, data_map=ranges, chunk_size=CHUNK_SIZE,
                    chunk_digests=chunk_digests, converter=converter, implicit_dirs=report.implicit_dirs,
                    metadata_digest=metadata.hexdigest())


async def convert_layer_async(layer_path: Path, compression: Compression, layer_digest: str,
                              out_path: Path, *, expected_diff_id: str | None = None,
                              work_dir: Path | None = None, progress: ConvertProgress | None = None) -> BlobInfo:
    """`convert_layer` in a worker thread, off the event loop.

    Cancelling the awaiting task does not stop the thread: it finishes (or fails) and cleans up.
    """
    return await asyncio.to_thread(convert_layer, layer_path, compression, layer_digest, out_path,
                                   expected_diff_id=expected_diff_id, work_dir=work_dir, progress=progress)


def _digest_chunks(path: Path, metadata: MetadataHasher, progress: ConvertProgress) -> tuple[int, str, list[bytes]]:
    """Size, whole-file sha256 and per-chunk sha256 of `path`, its metadata handed to `metadata` on the
    way; fsyncs it, as the last pass over it."""
    total = path.stat().st_size
    whole = hashlib.sha256()
    chunks = []
    size = 0
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            filled = 0
            while filled < CHUNK_SIZE:
                n = f.readinto(view[filled:])
                if not n:
                    break
                filled += n
            if not filled:
                break
            whole.update(view[:filled])
            metadata.update(size, view[:filled])
            chunks.append(hashlib.sha256(view[:filled]).digest())
            size += filled
            progress("hashing", size, total)
            if filled < CHUNK_SIZE:
                break
        os.fsync(f.fileno())
    return size, "sha256:" + whole.hexdigest(), chunks

