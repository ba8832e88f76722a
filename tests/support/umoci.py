"""The reference side of rootfs comparisons: an image as `umoci raw unpack` (an independent OCI
implementation) builds it from the registry's bytes.

Where the reference needs help: umoci 0.4.7 predates zstd layers, so for its copy only, zstd layers are
decompressed with the `zstd` CLI into plain-tar layers whose digest must equal the config's diff_id
(umoci reads the very same tar stream); skopeo converts a Docker schema 2 manifest to OCI when writing
an OCI layout, and `pull_to_layout` checks that the layer blobs are the ones the registry serves.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from afsd.lab.oci_layout import REF_NAME_ANNOTATION
from afsd.lab.skopeo import PushedImage, pull_to_layout
from afsd.oci import mediatypes
from afsd.oci.platform import Platform

PULLED_TAG = "image"


def _decompress_zstd_layers(layout: Path, tag: str) -> None:
    """Rewrite the layout's zstd layers as plain tar layers (umoci 0.4.7 cannot read zstd).

    The plain layer's digest must be the config's diff_id, i.e. umoci gets the exact tar stream
    the registry's zstd blob holds.
    """
    blobs = layout / "blobs" / "sha256"
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    (top,) = [d for d in index["manifests"] if d.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag]
    manifest = json.loads((blobs / top["digest"].split(":")[1]).read_bytes())
    diff_ids = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_bytes())["rootfs"]["diff_ids"]
    changed = False
    for layer, diff_id in zip(manifest["layers"], diff_ids):
        if mediatypes.layer_compression(layer["mediaType"]) != "zstd":
            continue
        plain = blobs / diff_id.split(":")[1]
        with open(plain, "wb") as out:
            subprocess.run(["zstd", "-dcq", str(blobs / layer["digest"].split(":")[1])], stdout=out, check=True)
        with open(plain, "rb") as check:
            assert f"sha256:{hashlib.file_digest(check, 'sha256').hexdigest()}" == diff_id
        layer.update(mediaType="application/vnd.oci.image.layer.v1.tar", digest=diff_id, size=plain.stat().st_size)
        changed = True
    if changed:
        data = json.dumps(manifest).encode()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        top.update(digest=f"sha256:{digest}", size=len(data))
        index_path.write_text(json.dumps(index))


def umoci_rootfs(image: PushedImage, platform: Platform, workdir: Path) -> Path:
    """The image's root filesystem as umoci unpacks it from the registry's bytes."""
    layout, rootfs = workdir / "pulled", workdir / "umoci-rootfs"
    workdir.mkdir(parents=True, exist_ok=True)
    reference = image.pinned_reference(platform) if image.layout.is_index else image.reference
    pull_to_layout(reference, layout, PULLED_TAG)
    _decompress_zstd_layers(layout, PULLED_TAG)
    # `raw unpack` is `unpack`'s layer extraction without the runtime bundle around it (config.json
    # and an mtree manifest that hashes every file: a third of the time on the Debian image).
    result = subprocess.run(["umoci", "raw", "unpack", "--image", f"{layout}:{PULLED_TAG}", str(rootfs)],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"umoci raw unpack failed: {result.stderr}"
    shutil.rmtree(layout)
    return rootfs


