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
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from afsd.convert_image import ConvertedImage, pull_and_convert
from afsd.erofs.stack import StackLayer, mount_image_stack
from afsd.lab.catalogue import FEATURES_FLAVOURS, MULTIARCH_PLATFORMS
from afsd.lab.debian import remove_tree
from afsd.lab.skopeo import PushedImage
from afsd.oci.client import RegistryClient
from afsd.oci.platform import Platform
from afsd.oci.reference import parse_reference
from tests.support.registries import LabRegistry
from tests.support.treecompare import compare_trees, format_differences, snapshot
from tests.support.umoci import umoci_rootfs

AMD64 = Platform("linux", "amd64")

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
    reference_root = umoci_rootfs(image, platform, workdir)
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
