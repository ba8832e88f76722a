"""Pull an image from its registry and convert every layer into an erofs blob.

The data flow: resolve the reference to a platform manifest (registry client) → download each layer
blob to disk, verified against its digest → convert it (afsd.erofs.convert), checking the uncompressed
tar against the config's diff_id → `<out_dir>/<blob hex>.erofs` plus `<out_dir>/image.json`, which
describes the image (reference, manifest digest, runtime config) and each blob (size, digest, data map,
chunk digests). Blobs already present in `out_dir` are reused, so re-running is cheap.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from afsd.erofs.convert import BlobInfo, blob_id_for, convert_layer_async
from afsd.errors import AfsdError
from afsd.fsutil import write_json_atomically
from afsd.oci.client import RegistryClient, ResolvedImage
from afsd.oci.manifest import Descriptor
from afsd.oci.mediatypes import layer_compression
from afsd.oci.platform import Platform
from afsd.oci.reference import ImageReference

IMAGE_DESCRIPTION = "image.json"



class LayerProgress(Protocol):
    """Told how each layer is getting on (from the event loop and from converting threads)."""

    def update(self, descriptor: Descriptor, stage: str, done: int, total: int) -> None:
        """`stage` ("downloading", "unpacking", "building erofs", "hashing"): `done` of `total` bytes."""

    def finished(self, descriptor: Descriptor, blob: BlobInfo, cached: bool) -> None:
        """The layer's blob is there (`cached`: from an earlier run)."""


@dataclass(frozen=True)
class ConvertedLayer:
    descriptor: Descriptor
    blob: BlobInfo
    path: Path


@dataclass(frozen=True)
class ConvertedImage:
    image: ResolvedImage
    layers: list[ConvertedLayer]  # bottom to top

    def to_json(self) -> dict:
        image = self.image
        config = image.config
        return {
            "reference": str(image.reference),
            "key": image.reference.key,
            "platform": str(image.platform),
            "manifest_digest": image.manifest_digest,
            "manifest_media_type": image.manifest_media_type,
            "index_digest": image.index_digest,
            "config_digest": image.config_digest,
            "config": {
                "entrypoint": config.entrypoint, "cmd": config.cmd, "env": config.env,
                "working_dir": config.working_dir, "user": config.user,
            },
            "layers": [
                {"digest": layer.descriptor.digest, "media_type": layer.descriptor.media_type,
                 "compressed_size": layer.descriptor.size, "file": layer.path.name,
                 "blob": layer.blob.to_json()}
                for layer in self.layers
            ],
        }


def blob_file_name(blob_id: str) -> str:
    return blob_id.split(":", 1)[1] + ".erofs"


def _load_existing(path: Path, meta: Path, layer_digest: str) -> BlobInfo | None:
    """A blob left by an earlier run, if both it and its description are complete."""
    try:
        info = BlobInfo.from_json(json.loads(meta.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info.layer_digest != layer_digest or not path.is_file() or path.stat().st_size != info.size:
        return None
    return info


async def _convert_one(client: RegistryClient, image: ResolvedImage, descriptor: Descriptor,
                       diff_id: str | None, out_dir: Path,
                       progress: LayerProgress | None) -> ConvertedLayer:
    compression = layer_compression(descriptor.media_type)
    path = out_dir / blob_file_name(blob_id_for(descriptor.digest))
    meta = path.with_suffix(".json")
    existing = await asyncio.to_thread(_load_existing, path, meta, descriptor.digest)
    if existing is not None:
        if progress:
            progress.finished(descriptor, existing, cached=True)
        return ConvertedLayer(descriptor, existing, path)

    download = out_dir / ".downloads" / descriptor.digest.replace(":", "-")
    await asyncio.to_thread(download.parent.mkdir, parents=True, exist_ok=True)
    try:
        if progress:
            progress.update(descriptor, "downloading", 0, descriptor.size)
        await client.fetch_blob(image.reference, descriptor, download, progress=None if progress is None else
                                lambda done: progress.update(descriptor, "downloading", done, descriptor.size))
        info = await convert_layer_async(download, compression, descriptor.digest, path,
                                         expected_diff_id=diff_id, work_dir=out_dir,
                                         progress=None if progress is None else
                                         lambda stage, done, total: progress.update(descriptor, stage, done, total))
    finally:
        await asyncio.to_thread(download.unlink, missing_ok=True)
    await asyncio.to_thread(write_json_atomically, meta, info.to_json(), indent=2)
    if progress:
        progress.finished(descriptor, info, cached=False)
    return ConvertedLayer(descriptor, info, path)


async def pull_and_convert(ref: ImageReference, platform: Platform, out_dir: Path, *,
                           client: RegistryClient, concurrency: int = 2,
                           progress: LayerProgress | None = None) -> ConvertedImage:
    """Resolve `ref` for `platform`, convert all its layers into `out_dir`, describe the image.

    Layers are downloaded and converted `concurrency` at a time; a layer that appears twice in the
    manifest is converted once.
    """
    image = await client.resolve(ref, platform)
    diff_ids = image.config.diff_ids
    if diff_ids and len(diff_ids) != len(image.layers):
        raise AfsdError(
            f"image {ref}: config lists {len(diff_ids)} diff_ids for {len(image.layers)} layers"
        )
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    semaphore = asyncio.Semaphore(max(1, concurrency))
    tasks: dict[str, asyncio.Task[ConvertedLayer]] = {}

    async def bounded(descriptor: Descriptor, diff_id: str | None) -> ConvertedLayer:
        async with semaphore:
            return await _convert_one(client, image, descriptor, diff_id, out_dir, progress)

    try:
        async with asyncio.TaskGroup() as group:
            for index, descriptor in enumerate(image.layers):
                if descriptor.digest not in tasks:
                    diff_id = diff_ids[index] if diff_ids else None
                    tasks[descriptor.digest] = group.create_task(bounded(descriptor, diff_id))
    except BaseExceptionGroup as group_error:
        # The first layer's failure is the one to report; the others were cancelled because of it.
        raise group_error.exceptions[0] from None
    converted = ConvertedImage(image, [tasks[d.digest].result() for d in image.layers])
    await asyncio.to_thread(write_json_atomically, out_dir / IMAGE_DESCRIPTION, converted.to_json(), indent=2)
    await asyncio.to_thread(_remove_empty_dir, out_dir / ".downloads")
    return converted


def _remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
