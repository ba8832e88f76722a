"""The Debian lab image: a real root filesystem from debootstrap, split into layers and cached.

Where it sits: a catalogue entry that is too slow to build per run. `debian_layout` debootstraps
a minimal Debian once, turns it into three layers (`debian_layers`: the root filesystem, then
deletions and changes, then a script), writes them as an OCI layout with `oci_layout`, and keeps
the layout under ~/.cache/afsd/images keyed by what went into it. Builds are atomic (a partial
directory renamed into place), so an interrupted or concurrent build never leaves a half entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from afsd.errors import MissingToolError
from afsd.lab.catalogue import busybox_rootfs
from afsd.lab.facts import ImageFacts, apply_layers, facts_from_layers
from afsd.lab.layers import Entry, LayerSpec, entries_from_directory, entry_for_path
from afsd.lab.oci_layout import ImageBuildError, ImageSpec, LayoutImage, read_layout, write_oci_layout
from afsd.oci.platform import Platform

# Bump when the layer plan below changes: it is part of the cache key.
DEBIAN_BUILDER_VERSION = 1
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_TAG = "debian"


def image_cache_root() -> Path:
    """`$XDG_CACHE_HOME/afsd/images`, by default `~/.cache/afsd/images`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "afsd" / "images"


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].encode().decode("unicode_escape") for line in mounts]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """`rm -rf path`, after unmounting anything a crashed debootstrap left mounted inside it."""
    for mount_point in _mounts_under(path):
        subprocess.run(["umount", "-l", mount_point], check=False)
    if _mounts_under(path):
        raise ImageBuildError(f"cannot remove {path}: mounts inside it remain; unmount them first")
    shutil.rmtree(path, ignore_errors=True)


def debootstrap(rootfs: Path, suite: str, variant: str, mirror: str, include: tuple[str, ...] = ()) -> None:
    """`debootstrap --variant=VARIANT [--include=PKG,...] SUITE ROOTFS MIRROR`; ImageBuildError naming the mirror."""
    binary = shutil.which("debootstrap")
    if binary is None:
        raise MissingToolError("debootstrap is not installed; run scripts/setup.sh (Debian package debootstrap)")
    packages = [f"--include={','.join(include)}"] if include else []
    result = subprocess.run([binary, f"--variant={variant}", *packages, suite, str(rootfs), mirror],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        tail = result.stdout.decode(errors="replace").strip().splitlines()[-3:]
        raise ImageBuildError(f"debootstrap {suite} from {mirror} failed: {' / '.join(tail)}")


def debian_layers(rootfs: Path) -> tuple[tuple[LayerSpec, ...], ImageFacts]:
    """Three layers from a root filesystem on disk: all of it (gzip); a layer (zstd) that deletes
    /usr/share/doc and one member of a hardlink group, makes /var/log opaque, drops the setuid bit
    of one program and rewrites /etc/hostname; and a small uncompressed layer that adds a script.
    Parent directories in the upper layers carry the root filesystem's own metadata, as a layer
    diffed by docker would."""
    base = LayerSpec(tuple(entries_from_directory(rootfs)), "gzip", created_by="debian: root filesystem")
    changes: list[Entry] = []
    top: list[Entry] = []

    def add_with_parents(relative: str, *entries: Entry, layer: list[Entry] = changes) -> None:
        parts = PurePosixPath(relative).parts[:-1]
        listed = {e.name for e in layer}
        for i in range(len(parts)):
            parent = "/".join(parts[:i + 1])
            if parent not in listed and (rootfs / parent).is_dir():
                listed.add(parent)
                layer.append(entry_for_path(rootfs, parent))
        layer.extend(entries)

    hardlink_groups: dict[str, list[str]] = {}
    setuid: list[str] = []
    for entry in base.entries:
        if entry.kind == "hardlink" and entry.name.startswith("usr/bin/"):
            hardlink_groups.setdefault(entry.linkname, [entry.linkname]).append(entry.name)
        if entry.kind == "file" and entry.name.startswith("usr/bin/") and entry.mode & stat.S_ISUID:
            setuid.append(entry.name)
    interesting = {"/bin", "/etc/passwd", "/etc/hostname", "/etc/afsd-release", "/etc/motd", "/var/log",
                   "/var/log/afsd.log", "/opt/afsd/hello.sh", "/usr/local/bin/hello"}
    absent = {"/var/log/.wh..wh..opq"} | {f"/var/log/{name}" for name in os.listdir(rootfs / "var/log")}
    if (rootfs / "usr/share/doc").is_dir():
        add_with_parents("usr/share/doc", Entry.whiteout("usr/share/doc"))
        absent.add("/usr/share/doc")
    if hardlink_groups:
        group = sorted(hardlink_groups.values())[0]
        add_with_parents(group[-1], Entry.whiteout(group[-1]))
        absent.add(f"/{group[-1]}")
        interesting.update(f"/{p}" for p in group[:-1])
    if setuid:
        program = entry_for_path(rootfs, sorted(setuid)[0])
        add_with_parents(program.name, replace(program, mode=program.mode & ~stat.S_ISUID))
        interesting.add(f"/{program.name}")
    add_with_parents("var/log/afsd.log", Entry.opaque("var/log"),
                     Entry.file("var/log/afsd.log", b"the only log left\n", mode=0o640))
    add_with_parents("etc/hostname", Entry.file("etc/hostname", b"afsd-debian\n"),
                     Entry.file("etc/afsd-release", b"afsd test image, layer 2\n"))
    add_with_parents("opt/afsd/hello.sh",
                     Entry.file("opt/afsd/hello.sh", b"#!/bin/sh\necho hello from the top layer\n", mode=0o755),
                     layer=top)
    add_with_parents("usr/local/bin/hello", Entry.symlink("usr/local/bin/hello", "/opt/afsd/hello.sh"),
                     layer=top)
    add_with_parents("etc/motd", Entry.file("etc/motd", b"layer 3 was here\n"), layer=top)
    layers = (base, LayerSpec(tuple(changes), "zstd", created_by="debian: deletions and changes"),
              LayerSpec(tuple(top), "none", created_by="debian: a script"))
    state, _ = apply_layers(layers)
    return layers, facts_from_layers(layers, paths=interesting & set(state), absent=absent)


@dataclass(frozen=True)
class CachedImage:
    """An image layout kept in the image cache, with what is known about it."""

    layout: LayoutImage
    facts: ImageFacts
    source: str  # "debootstrap" or "busybox-static"
    fallback_reason: str = ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def debian_layout(cache_root: Path | None = None, *, suite: str = "bookworm", variant: str = "minbase",
                  mirror: str = DEBIAN_MIRROR, allow_fallback: bool = True,
                  include: tuple[str, ...] = ()) -> CachedImage:
    """The Debian test image as an OCI layout, built on first use and cached (see `build_cached`).

    `include`: extra packages debootstrap installs (e.g. `("python3",)` for a realistic task image);
    each set of packages is a cache entry of its own, and is never replaced by the busybox fallback.
    If debootstrap cannot reach the mirror and `allow_fallback` is set, a busybox-static root
    filesystem stands in (`CachedImage.source` says which).
    """
    def build(rootfs: Path) -> tuple[ImageSpec, ImageFacts, str, str]:
        source, reason = "debootstrap", ""
        try:
            debootstrap(rootfs, suite, variant, mirror, tuple(sorted(include)))
        except ImageBuildError as error:
            if not allow_fallback or include:
                raise
            source, reason = "busybox-static", str(error)
            remove_tree(rootfs)
            rootfs.mkdir()
            busybox_rootfs(rootfs)
        layers, facts = debian_layers(rootfs)
        spec = ImageSpec(layers, Platform("linux", "amd64"), cmd=("/bin/bash",) if source == "debootstrap"
                         else ("/bin/sh",), labels={"org.afsd.test-image": f"{source}/{suite}"})
        return spec, facts, source, reason

    key_doc: dict[str, object] = {"suite": suite, "variant": variant, "mirror": mirror,
                                  "builder": DEBIAN_BUILDER_VERSION}
    if include:
        key_doc["include"] = sorted(include)   # absent otherwise: the plain image keeps its cache key
    return build_cached(cache_root or image_cache_root(), key_doc, build)


def build_cached(cache_root: Path, key_doc: dict[str, object],
                 build: Callable[[Path], tuple[ImageSpec, ImageFacts, str, str]]) -> CachedImage:
    """The image `build(rootfs)` makes (spec, facts, source, fallback reason), as an OCI layout kept in
    `<cache_root>/<key>`, the key a hash of `key_doc`; built only when absent.

    It is built in a `.partial-<key>-<pid>` directory and renamed into place, so an interrupted build
    never leaves a half entry (partial directories of dead builders are removed on the next call).
    """
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:32]
    final = cache_root / key
    if (final / "image.json").exists():
        return _load_cached(final)
    cache_root.mkdir(parents=True, exist_ok=True)
    for stale in cache_root.glob(f".partial-{key}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            remove_tree(stale)

    if final.exists():
        remove_tree(final)  # damaged by hand: entries only ever appear complete
    work = cache_root / f".partial-{key}-{os.getpid()}"
    remove_tree(work)
    work.mkdir()
    try:
        rootfs = work / "rootfs"
        spec, facts, source, reason = build(rootfs)
        write_oci_layout(work / "layout", DEBIAN_TAG, spec)
        remove_tree(rootfs)
        (work / "image.json").write_text(json.dumps({
            "key": key_doc, "source": source, "fallback_reason": reason, "tag": DEBIAN_TAG,
            "facts": facts.to_json()}, indent=2))
        try:
            os.rename(work, final)
        except OSError:
            if not (final / "image.json").exists():
                raise
            remove_tree(work)  # another process finished the same build first
    except BaseException:
        remove_tree(work)
        raise
    return _load_cached(final)


def _load_cached(entry: Path) -> CachedImage:
    doc = json.loads((entry / "image.json").read_text())
    return CachedImage(read_layout(entry / "layout", doc["tag"]), ImageFacts.from_json(doc["facts"]),
                       doc["source"], doc["fallback_reason"])
