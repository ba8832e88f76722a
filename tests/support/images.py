"""Pytest fixtures: the catalogue of `afsd.lab` test images, pushed into the session's `open_registry`.

All fixtures are session-scoped (built and pushed once per run) and return
`afsd.lab.skopeo.PushedImage`s: `.reference` (`127.0.0.1:PORT/afsd-test/NAME:TAG`), `.registry`,
`.repository`, `.tag`, `.digest` and `.media_type` of what the registry serves, `.manifests`
(per platform: manifest digest, config digest, layers with digest, diff_id, media type and
compression), `.platforms`, `.pinned_reference(platform)`, `.layout` (the local OCI layout it was
pushed from) and `.facts[platform]` (an `ImageFacts`: what the unpacked root filesystem must hold;
`.facts[p].check(root)` lists contradictions).

- `features_images`: {flavour: PushedImage} for every `FEATURES_FLAVOURS` entry (`oci-gzip`,
  `oci-zstd`, `oci-uncompressed`, `oci-mixed`, `docker-gzip`), repository `afsd-test/features`,
  tag = flavour. `features_image` is the `oci-mixed` one (gzip, zstd and plain tar in one image).
- `multiarch_image`: an OCI index (`afsd-test/multiarch:latest`) for linux/amd64, linux/arm64/v8 and
  linux/riscv64; `/etc/platform` holds the platform's name.
- `implicit_parents_image`: an upper layer that writes into directories it does not list.
- `debian_image`: a debootstrap'd bookworm minbase split in three layers (`afsd-test/debian:bookworm`);
  built once into ~/.cache/afsd/images. `debian_cached_image` says how it was built (`.source`).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from afsd.lab import catalogue
from afsd.lab.debian import CachedImage, debian_layout
from afsd.lab.oci_layout import ImageSpec, write_oci_layout
from afsd.lab.skopeo import PushedImage
from tests.support.registries import LabRegistry

REPOSITORY_PREFIX = "afsd-test"


@pytest.fixture(scope="session")
def image_layouts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One OCI layout directory that all catalogue images are written into (blobs are shared)."""
    root = tmp_path_factory.mktemp("image-layouts")
    yield root / "layout"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def features_images(open_registry: LabRegistry, image_layouts: Path) -> dict[str, PushedImage]:
    pushed = {}
    for flavour in catalogue.FEATURES_FLAVOURS:
        spec, media_types, facts = catalogue.features_image(flavour)
        # A layout holds OCI media types only; push_layout converts `docker-*` flavours (skopeo v2s2).
        layout = write_oci_layout(image_layouts, f"features-{flavour}", spec)
        pushed[flavour] = open_registry.push(layout, f"{REPOSITORY_PREFIX}/features", flavour,
                                             media_types=media_types, facts={spec.platform: facts})
    return pushed


@pytest.fixture(scope="session")
def features_image(features_images: dict[str, PushedImage]) -> PushedImage:
    return features_images["oci-mixed"]


@pytest.fixture(scope="session")
def multiarch_image(open_registry: LabRegistry, image_layouts: Path) -> PushedImage:
    built = catalogue.multiarch_images()
    layout = write_oci_layout(image_layouts, "multiarch", [spec for spec, _ in built])
    return open_registry.push(layout, f"{REPOSITORY_PREFIX}/multiarch", "latest",
                              facts={spec.platform: facts for spec, facts in built})


@pytest.fixture(scope="session")
def implicit_parents_image(open_registry: LabRegistry, image_layouts: Path) -> PushedImage:
    layers, facts = catalogue.implicit_parents_layers()
    spec = ImageSpec(layers)
    layout = write_oci_layout(image_layouts, "implicit-parents", spec)
    return open_registry.push(layout, f"{REPOSITORY_PREFIX}/implicit-parents", "latest",
                              facts={spec.platform: facts})


@pytest.fixture(scope="session")
def debian_cached_image() -> CachedImage:
    cached = debian_layout()
    if cached.source != "debootstrap":
        warnings.warn(f"the Debian test image is a busybox-static stand-in: {cached.fallback_reason}",
                      stacklevel=1)
    return cached


@pytest.fixture(scope="session")
def debian_image(open_registry: LabRegistry, debian_cached_image: CachedImage) -> PushedImage:
    cached = debian_cached_image
    return open_registry.push(cached.layout, f"{REPOSITORY_PREFIX}/debian", "bookworm",
                              facts={m.platform: cached.facts for m in cached.layout.manifests})
