"""The burst benchmark's image: Debian with Python and a small application, in three layers, the way
a real task image is built (a base, a language runtime, the application), about 250 MB unpacked.

One debootstrap (minbase plus python3), split by dpkg's own file lists: the files of the Python
packages form the runtime layer, everything else the base; the application layer adds a script that
imports a slice of the standard library (what a task reads at start) and some data files. Built once
and cached like the Debian lab image (`afsd.lab.debian.build_cached`).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from afsd.lab.catalogue import seeded_bytes
from afsd.lab.debian import DEBIAN_MIRROR, CachedImage, build_cached, debootstrap, image_cache_root
from afsd.lab.facts import ImageFacts, facts_from_layers
from afsd.lab.layers import Entry, LayerSpec, entries_from_directory, entry_for_path
from afsd.lab.oci_layout import ImageSpec
from afsd.oci.platform import Platform

PYTHON_IMAGE_VERSION = 1
PYTHON_PACKAGE_PREFIXES = ("python3", "libpython3")
APP_SCRIPT = b'''import email.parser, http.client, json, pathlib, sqlite3, subprocess, urllib.request, xml.dom.minidom
data = pathlib.Path("/app/data")
print(json.dumps({"files": len(list(data.iterdir())), "first": (data / "part-0.bin").read_bytes()[:8].hex()}))
'''
APP_DATA_FILES = 8
APP_DATA_SIZE = 2 << 20

# What a task from this image reads first, and how it starts (afsd.sim.burst.ImageTask).
FIRST_FILE = "usr/bin/python3"
START_COMMAND = ("/usr/bin/python3", "/app/main.py")


def _python_paths(rootfs: Path) -> set[str]:
    """Paths (relative, no leading slash) that dpkg lists for the Python packages, directories excluded."""
    paths: set[str] = set()
    info = rootfs / "var/lib/dpkg/info"
    for listing in info.glob("*.list"):
        if not listing.name.startswith(PYTHON_PACKAGE_PREFIXES):
            continue
        for line in listing.read_text(errors="replace").splitlines():
            relative = line.strip().lstrip("/")
            if relative and os.path.lexists(rootfs / relative) and not (rootfs / relative).is_dir():
                paths.add(relative)
    return paths


def python_layers(rootfs: Path) -> tuple[tuple[LayerSpec, ...], ImageFacts]:
    """Base (gzip), Python runtime (zstd), application (gzip) from a debootstrapped root filesystem.
    A hardlink goes into the layer of the file it links to; parent directories of runtime files are
    repeated in the runtime layer with the base's metadata."""
    python = _python_paths(rootfs)
    entries = entries_from_directory(rootfs)
    in_runtime = {e.name for e in entries if e.name in python or (e.kind == "hardlink" and e.linkname in python)}
    base = [e for e in entries if e.name not in in_runtime]
    runtime: list[Entry] = []
    listed: set[str] = set()
    for entry in entries:
        if entry.name not in in_runtime:
            continue
        parts = PurePosixPath(entry.name).parts[:-1]
        for i in range(len(parts)):
            parent = "/".join(parts[:i + 1])
            if parent not in listed:
                listed.add(parent)
                runtime.append(entry_for_path(rootfs, parent))
        runtime.append(entry)
    app = [Entry.dir("app"), Entry.file("app/main.py", APP_SCRIPT), Entry.dir("app/data"),
           *(Entry.file(f"app/data/part-{i}.bin", seeded_bytes(f"app-{i}", APP_DATA_SIZE))
             for i in range(APP_DATA_FILES))]
    layers = (LayerSpec(tuple(base), "gzip", created_by="debian: root filesystem"),
              LayerSpec(tuple(runtime), "zstd", created_by="python3 runtime"),
              LayerSpec(tuple(app), "gzip", created_by="application"))
    return layers, facts_from_layers(layers, paths={"/app/main.py", "/" + FIRST_FILE})


def python_image_layout(cache_root: Path | None = None, *, suite: str = "bookworm",
                        mirror: str = DEBIAN_MIRROR) -> CachedImage:
    """The image as an OCI layout, built on first use (debootstrap: a minute or two) and cached."""
    def build(rootfs: Path) -> tuple[ImageSpec, ImageFacts, str, str]:
        debootstrap(rootfs, suite, "minbase", mirror, include=("python3",))
        layers, facts = python_layers(rootfs)
        spec = ImageSpec(layers, Platform("linux", "amd64"), cmd=START_COMMAND,
                         labels={"org.afsd.test-image": f"python/{suite}"})
        return spec, facts, "debootstrap", ""

    key_doc = {"image": "debian-python", "suite": suite, "mirror": mirror, "builder": PYTHON_IMAGE_VERSION}
    return build_cached(cache_root or image_cache_root(), key_doc, build)
