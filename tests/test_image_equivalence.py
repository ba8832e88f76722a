"""Acceptance: the root filesystem afsd builds from its erofs blobs is the one the image describes.

For every catalogue image (the features image in each compression/media-type flavour, each platform
of the multi-arch index, a layer set with implicit parent directories, the Debian image), two root
filesystems are built from the same registry bytes:

- afsd's: `pull_and_convert` (registry client + erofs converter), every blob checked by
  `fsck.erofs`, mounted file-backed as erofs and stacked as overlayfs lower layers, top first;
- the reference: `skopeo copy` of the same manifest back into an OCI layout, unpacked by
  `umoci raw unpack` (an independent OCI implementation).

They must be identical by `tests.support.treecompare` (kinds, modes with special bits, owners,
contents, symlink targets, device numbers, xattrs, hardlink groups, non-directory mtimes), and both
must satisfy the facts the image was built with (`ImageFacts`, derived from the layer specs by the
OCI layer rules): a third opinion, so that afsd and umoci cannot agree on a wrong tree.

Where the reference needs help, and why (nothing is excluded from the comparison itself):
- umoci 0.4.7 predates zstd layers ("blob is not correct mediatype: ...tar+zstd"). For its copy
  only, zstd layers are decompressed with the `zstd` CLI into plain-tar layers whose digest must
  equal the config's diff_id: umoci reads the very same tar stream, in a wrapping it understands.
- skopeo converts a Docker schema 2 manifest to OCI when writing an OCI layout (umoci reads only
  OCI); `pull_to_layout` checks that the layer blobs are the ones the registry serves.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from afsd.convert_image import ConvertedImage, pull_and_convert
from afsd.erofs.stack import StackLayer, mount_image_stack
from afsd.lab.catalogue import FEATURES_FLAVOURS, MULTIARCH_PLATFORMS
from afsd.lab.debian import remove_tree
from afsd.lab.oci_layout import REF_NAME_ANNOTATION
from afsd.lab.skopeo import PushedImage, pull_to_layout
from afsd.oci import mediatypes
from afsd.oci.client import RegistryClient
from afsd.oci.platform import Platform
from afsd.oci.reference import parse_reference
from tests.support.registries import LabRegistry
from tests.support.treecompare import compare_trees, format_differences, snapshot

AMD64 = Platform("linux", "amd64")
PULLED_TAG = "image"

CASES = [
    *(pytest.param("features_images", flavour, AMD64, id=f"features-{flavour}") for flavour in FEATURES_FLAVOURS),
    *(pytest.param("multiarch_image", None, platform, id=f"multiarch-{platform}".replace("/", "-"))
      for platform in MULTIARCH_PLATFORMS),
    pytest.param("implicit_parents_image", None, AMD64, id="implicit-parents"),
    pytest.param("debian_image", None, AMD64, id="debian", marks=pytest.mark.slow),
]


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory removed after the test (the Debian case leaves ~0.5 GB otherwise)."""
    yield tmp_path
    remove_tree(tmp_path)


async def _convert(image: PushedImage, platform: Platform, out_dir: Path, registry: LabRegistry) -> ConvertedImage:
    async with RegistryClient(registry.config()) as client:
        return await pull_and_convert(parse_reference(image.reference), platform, out_dir, client=client)


def _fsck(blob: Path) -> None:
    # --extract without a target reads and checks every file's data, not only the metadata.
    result = subprocess.run(["fsck.erofs", "--extract", str(blob)], capture_output=True, text=True)
    assert result.returncode == 0, f"fsck.erofs rejects {blob.name}:\n{result.stdout}{result.stderr}"


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


def _umoci_rootfs(image: PushedImage, platform: Platform, workdir: Path) -> Path:
    """The image's root filesystem as umoci unpacks it from the registry's bytes."""
    layout, rootfs = workdir / "pulled", workdir / "umoci-rootfs"
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


@pytest.mark.parametrize(("fixture", "key", "platform"), CASES)
def test_overlay_of_erofs_blobs_matches_umoci(fixture: str, key: str | None, platform: Platform,
                                              request: pytest.FixtureRequest, open_registry: LabRegistry,
                                              workdir: Path) -> None:
    image = request.getfixturevalue(fixture)
    if key is not None:
        image = image[key]

    converted = asyncio.run(_convert(image, platform, workdir / "blobs", open_registry))
    assert [layer.descriptor.digest for layer in converted.layers] == \
        [layer.digest for layer in image.manifest_for(platform).layers]
    blobs = [layer.path for layer in converted.layers]
    for blob in blobs:
        _fsck(blob)

    facts = image.facts[platform]
    reference_root = _umoci_rootfs(image, platform, workdir)
    # The yardstick itself must agree with how the image was built.
    assert facts.check(reference_root) == []
    theirs = snapshot(reference_root)

    merged = workdir / "merged"
    merged.mkdir()
    layers = [StackLayer(layer.path, layer.blob.implicit_dirs) for layer in converted.layers]
    with mount_image_stack(layers, merged, scratch=workdir / "layers"):
        ours = snapshot(merged)
        fact_problems = facts.check(merged)

    differences = compare_trees(ours, theirs, labels=("afsd", "umoci"))
    assert differences == [], format_differences(differences, ("afsd (erofs+overlayfs)", "umoci"))
    assert fact_problems == []
