"""The catalogue of ready-made lab images, each with the `ImageFacts` its layers imply.

Where it sits: the input of the tests and of `afsd demo`. `features_image` holds every tar feature a
layer converter must get right (in each `FEATURES_FLAVOURS` compression/media-type mix),
`multiarch_images` one image per platform for an index, and `implicit_parents_layers` an upper layer
that writes into directories it does not list. `oci_layout` writes them, `skopeo` pushes them; the
Debian image, which needs a cache, lives in `debian`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

from afsd.errors import MissingToolError
from afsd.lab.facts import ImageFacts, facts_from_layers
from afsd.lab.layers import NS_PER_SECOND, Entry, LayerSpec, entries_from_directory
from afsd.lab.oci_layout import ImageSpec
from afsd.lab.skopeo import MediaTypes
from afsd.oci.mediatypes import Compression
from afsd.oci.platform import Platform

LARGE_FILE_SIZE = 48 << 20
LARGE_FILE_PATH = "/large/random.bin"
# security.capability, VFS_CAP_REVISION_2 with the effective flag: cap_net_bind_service (bit 10).
NET_BIND_CAPABILITY = struct.pack("<IIIII", 0x0200_0001, 1 << 10, 0, 0, 0)
DEEP_DIR = "deep/" + "/".join(f"level-{i:02d}" for i in range(40))
LONG_NAME = "names/" + "long-" + "x" * 230 + ".txt"


def seeded_bytes(seed: str, size: int) -> bytes:
    """`size` pseudo-random bytes, always the same for the same seed (incompressible test data)."""
    return hashlib.shake_256(seed.encode()).digest(size)


def _seconds(value: float) -> int:
    return int(value) * NS_PER_SECOND


def features_layers(compressions: Sequence[Compression] = ("gzip", "zstd", "none"), *,
                    large_file_size: int = LARGE_FILE_SIZE) -> tuple[tuple[LayerSpec, ...], ImageFacts]:
    """Three layers that exercise what a layer converter must get right, and the facts they imply.

    Layer 1 lays out files, directories, links, devices, special bits, xattrs, odd owners, times and
    names; layer 2 deletes (whiteouts of files and directories, an opaque directory, one member of a
    hardlink group), replaces paths by other types and changes metadata only; layer 3 holds one large
    file and re-creates paths that layer 2 deleted. `compressions` gives each layer's compression.
    """
    if len(compressions) != 3:
        raise ValueError("features_layers needs one compression per layer (3)")
    hello = b"hello, world\n"
    odd = {"uid": 1234, "gid": 5678}
    base = (
        Entry.dir("etc"),
        Entry.file("etc/hostname", b"features\n"),
        Entry.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nodd:x:1234:5678::/:/bin/false\n"),
        Entry.dir("data"),
        Entry.file("data/hello.txt", hello),
        Entry.file("data/empty"),
        Entry.dir("data/empty-dir", mode=0o700),
        Entry.file("data/block-4096", seeded_bytes("4096", 4096)),
        Entry.file("data/block-4097", seeded_bytes("4097", 4097)),
        Entry.file("data/zeros-1m", bytes(1 << 20)),
        Entry.file("data/to-delete.txt", b"deleted in layer 2\n"),
        Entry.dir("data/dir-to-delete"),
        Entry.file("data/dir-to-delete/a", b"a\n"),
        Entry.file("data/dir-to-delete/sub/b", b"b\n"),
        Entry.dir("data/opaque", mode=0o755),
        Entry.file("data/opaque/old-1", b"hidden by the opaque marker\n"),
        Entry.file("data/opaque/old-sub/old-2", b"hidden too\n"),
        Entry.dir("data/dir-becomes-file"),
        Entry.file("data/dir-becomes-file/inside", b"gone with its directory\n"),
        Entry.file("data/file-becomes-dir", b"replaced by a directory\n"),
        Entry.file("data/file-becomes-symlink", b"replaced by a symlink\n"),
        Entry.file("data/chmod-only", b"same content, new metadata\n", mode=0o644),
        Entry.dir("data/merged"),
        Entry.file("data/merged/lower.txt", b"from layer 1\n"),
        Entry.file("data/reborn.txt", b"first life\n"),
        # Hardlinks: a group of three, a group that loses a member in layer 2, a setuid pair.
        Entry.file("links/hard-a", b"one inode, three names\n", mode=0o640, **odd),
        Entry.hardlink("links/hard-b", "links/hard-a"),
        Entry.hardlink("links/sub/hard-c", "links/hard-a"),
        Entry.file("links/pair-a", b"a group that shrinks\n"),
        Entry.hardlink("links/pair-b", "links/pair-a"),
        Entry.hardlink("links/pair-c", "links/pair-a"),
        Entry.symlink("links/relative", "../data/hello.txt"),
        Entry.symlink("links/absolute", "/data/hello.txt"),
        Entry.symlink("links/dangling", "/does/not/exist"),
        Entry.symlink("links/to-dir", "../data"),
        Entry.symlink("links/to-dir-absolute", "/data/merged"),
        Entry.symlink("links/loop", "loop"),
        Entry.symlink("links/long-target", "/".join(["segment"] * 50)),
        Entry.symlink("links/owned", "hard-a", mtime_ns=_seconds(1_000_000_000), **odd),
        # Special bits.
        Entry.file("special/setuid", b"#!/bin/sh\n", mode=0o4755),
        Entry.hardlink("special/setuid-link", "special/setuid"),
        Entry.file("special/setgid", b"#!/bin/sh\n", mode=0o2755, gid=50),
        Entry.dir("special/sticky", mode=0o1777),
        Entry.dir("special/setgid-dir", mode=0o2775, gid=50),
        Entry.file("special/all-bits", b"", mode=0o7777),
        Entry.file("special/no-bits", b"unreadable\n", mode=0o000),
        # Devices and a FIFO (minor 65537 needs the kernel's wide dev_t encoding).
        Entry.char_device("dev/null", 1, 3),
        Entry.char_device("dev/tty-ish", 4, 64, mode=0o620, gid=5),
        Entry.block_device("dev/loop0", 7, 0),
        Entry.block_device("dev/wide-minor", 259, 65537),
        Entry.fifo("dev/fifo", mode=0o600),
        # Extended attributes, including a binary capability.
        Entry.dir("xattrs", xattrs={"user.on-dir": b"directory attribute"}),
        Entry.file("xattrs/user", b"has user xattrs\n",
                   xattrs={"user.comment": b"hello world", "user.binary": bytes(range(256)),
                           "user.long": seeded_bytes("xattr", 3000)}),
        Entry.file("xattrs/capability", b"#!/bin/sh\n", mode=0o755,
                   xattrs={"security.capability": NET_BIND_CAPABILITY}),
        # Owners: odd ids, ids too big for ustar, names that disagree with the ids.
        Entry.dir("owners", mode=0o750, **odd),
        Entry.file("owners/odd", b"1234:5678\n", **odd),
        Entry.file("owners/huge-ids", b"3000000:4000000\n", uid=3_000_000, gid=4_000_000),
        Entry.file("owners/name-mismatch", b"names say root\n", uid=4321, gid=8765, uname="root", gname="root"),
        Entry.fifo("owners/odd-fifo", **odd),
        # Times: early, around 2038, far future, with nanoseconds.
        Entry.file("times/epoch-plus-one", b"1970\n", mtime_ns=_seconds(1)),
        Entry.file("times/y1985", b"1985\n", mtime_ns=_seconds(489_024_000)),
        Entry.file("times/after-2038", b"2038\n", mtime_ns=_seconds(2**31 + 100)),
        Entry.file("times/y2100", b"2100\n", mtime_ns=_seconds(4_102_444_800)),
        Entry.file("times/y2242", b"2242\n", mtime_ns=_seconds(2**33)),
        Entry.file("times/nanoseconds", b"ns\n", mtime_ns=1_700_000_000_123_456_789),
        Entry.symlink("times/old-symlink", "epoch-plus-one", mtime_ns=_seconds(315_532_800)),
        Entry.fifo("times/old-fifo", mtime_ns=_seconds(86_400)),
        # Names.
        Entry.file("names/héllo wörld ✓.txt", b"unicode\n"),
        Entry.file("names/日本語のファイル", b"more unicode\n"),
        Entry.file("names/with space & 'quotes' $x", b"shell characters\n"),
        Entry.file("names/-leading-dash", b"dash\n"),
        Entry.file("names/.hidden", b"dot\n"),
        Entry.file("names/.whale", b"starts with .wh but is no whiteout\n"),
        Entry.file(LONG_NAME, b"a 240 character name\n"),
        Entry.file(f"{DEEP_DIR}/leaf.txt", b"deep\n"),
    )
    changes = (
        Entry.file("etc/hostname", b"features-layer-2\n"),
        Entry.whiteout("data/to-delete.txt"),
        Entry.whiteout("data/dir-to-delete"),
        Entry.whiteout("data/reborn.txt"),
        Entry.whiteout("data/never-existed"),
        Entry.dir("data/opaque", mode=0o750, **odd),
        Entry.opaque("data/opaque"),
        Entry.file("data/opaque/new.txt", b"the only child now\n"),
        Entry.file("data/dir-becomes-file", b"was a directory\n"),
        Entry.dir("data/file-becomes-dir"),
        Entry.file("data/file-becomes-dir/inside", b"was a file\n"),
        Entry.symlink("data/file-becomes-symlink", "hello.txt"),
        Entry.file("data/chmod-only", b"same content, new metadata\n", mode=0o600, **odd),
        Entry.file("data/merged/upper.txt", b"from layer 2\n"),
        Entry.whiteout("links/pair-c"),
        Entry.file("xattrs/user", b"has user xattrs\n", xattrs={"user.comment": b"changed in layer 2"}),
    )
    top = (
        Entry.file(LARGE_FILE_PATH, seeded_bytes("large", large_file_size)),
        Entry.file("data/reborn.txt", b"second life\n"),
        Entry.dir("data/dir-to-delete", mode=0o711),
        Entry.file("data/dir-to-delete/fresh", b"the old a and sub/b stay deleted\n"),
    )
    layers = (LayerSpec(base, compressions[0], created_by="features: base"),
              LayerSpec(changes, compressions[1], created_by="features: deletions and changes"),
              LayerSpec(top, compressions[2], created_by="features: large file and re-creations"))
    absent = {"/data/to-delete.txt", "/data/dir-to-delete/a", "/data/dir-to-delete/sub",
              "/data/opaque/old-1", "/data/opaque/old-sub", "/data/dir-becomes-file/inside",
              "/links/pair-c", "/data/never-existed", "/data/.wh.to-delete.txt",
              "/data/opaque/.wh..wh..opq"}
    return layers, facts_from_layers(layers, absent=absent)


# name -> (media types pushed, compression of each layer)
FEATURES_FLAVOURS: dict[str, tuple[MediaTypes, tuple[Compression, Compression, Compression]]] = {
    "oci-gzip": ("oci", ("gzip", "gzip", "gzip")),
    "oci-zstd": ("oci", ("zstd", "zstd", "zstd")),
    "oci-uncompressed": ("oci", ("none", "none", "none")),
    "oci-mixed": ("oci", ("gzip", "zstd", "none")),
    "docker-gzip": ("docker", ("gzip", "gzip", "gzip")),
}


def features_image(flavour: str = "oci-mixed", *, large_file_size: int = LARGE_FILE_SIZE
                   ) -> tuple[ImageSpec, MediaTypes, ImageFacts]:
    """The features image in one of `FEATURES_FLAVOURS`: its spec, media types and facts."""
    media_types, compressions = FEATURES_FLAVOURS[flavour]
    layers, facts = features_layers(compressions, large_file_size=large_file_size)
    spec = ImageSpec(layers, Platform("linux", "amd64"), cmd=("/bin/sh",),
                     labels={"org.afsd.test-image": f"features/{flavour}"})
    return spec, media_types, facts


MULTIARCH_PLATFORMS = (Platform("linux", "amd64"), Platform("linux", "arm64", "v8"),
                       Platform("linux", "riscv64"))
_MULTIARCH_COMPRESSION: dict[str, Compression] = {"amd64": "gzip", "arm64": "zstd", "riscv64": "none"}


def multiarch_images() -> tuple[tuple[ImageSpec, ImageFacts], ...]:
    """One image per `MULTIARCH_PLATFORMS` entry, for an index: a shared base layer (the same blob
    in every manifest) plus a platform layer with distinguishable content, which deletes the base's
    `/shared/gone-on-<arch>` and writes `/etc/platform` (the platform as text)."""
    base = LayerSpec((
        Entry.file("shared/common.txt", b"in every platform\n"),
        *(Entry.file(f"shared/gone-on-{p.architecture}", f"deleted on {p.architecture}\n".encode())
          for p in MULTIARCH_PLATFORMS),
    ), "gzip", created_by="multiarch: shared base")
    images = []
    for platform in MULTIARCH_PLATFORMS:
        arch = platform.architecture
        layer = LayerSpec((
            Entry.file("etc/platform", f"{platform}\n".encode()),
            Entry.file(f"opt/{arch}/payload.bin", seeded_bytes(str(platform), 200_000 + 1000 * len(arch)),
                       mode=0o755),
            Entry.symlink("opt/current", arch),
            Entry.whiteout(f"shared/gone-on-{arch}"),
        ), _MULTIARCH_COMPRESSION[arch], created_by=f"multiarch: {platform}")
        layers = (base, layer)
        facts = facts_from_layers(layers, absent={f"/shared/gone-on-{arch}"})
        images.append((ImageSpec(layers, platform, labels={"org.afsd.test-image": f"multiarch/{platform}"}),
                       facts))
    return tuple(images)


def implicit_parents_layers() -> tuple[tuple[LayerSpec, ...], ImageFacts]:
    """Two layers where the upper one adds files under directories it does not list itself.

    OCI layer.md: without whiteouts a changeset "is extracted like a regular tar archive", and tar
    extraction leaves existing parent directories alone (so do docker and containerd, which apply a
    layer on top of the ones below). So `/srv/app` keeps layer 1's mode 0700, owner 1234:5678 and
    xattr although layer 2 writes into it; the implicit `/srv/app/deeper` is new and gets defaults.
    """
    lower = LayerSpec((Entry.dir("srv", mode=0o755),
                       Entry.dir("srv/app", mode=0o700, uid=1234, gid=5678,
                                 xattrs={"user.from": b"layer 1"}),
                       Entry.file("srv/app/old.txt", b"layer 1\n")), "gzip")
    upper = LayerSpec((Entry.file("srv/app/new.txt", b"layer 2, no parent entries\n"),
                       Entry.file("srv/app/deeper/file.txt", b"and a parent created implicitly\n")),
                      "gzip", add_parents=False)
    layers = (lower, upper)
    return layers, facts_from_layers(layers, paths={"/srv", "/srv/app", "/srv/app/old.txt",
                                                    "/srv/app/new.txt", "/srv/app/deeper/file.txt"})


def busybox_rootfs(rootfs: Path) -> None:
    """A small root filesystem around busybox-static: the fallback when no Debian mirror answers."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise MissingToolError("busybox is not installed; run scripts/setup.sh (Debian package busybox-static)")
    for directory, mode in (("bin", 0o755), ("sbin", 0o755), ("usr/bin", 0o755), ("usr/sbin", 0o755),
                            ("etc", 0o755), ("root", 0o700), ("tmp", 0o1777), ("var/log", 0o755),
                            ("usr/share/doc/busybox", 0o755), ("proc", 0o555), ("sys", 0o555), ("dev", 0o755)):
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
        os.chmod(rootfs / directory, mode)
    shutil.copy2(busybox, rootfs / "bin/busybox")
    applets = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = rootfs / applet
        if not os.path.lexists(link):
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/bin/busybox", link)
    os.link(rootfs / "bin/busybox", rootfs / "usr/bin/busybox-hardlink")
    shutil.copy2(busybox, rootfs / "usr/bin/su-busybox")
    os.chmod(rootfs / "usr/bin/su-busybox", 0o4755)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    (rootfs / "etc/hostname").write_text("busybox\n")
    (rootfs / "var/log/boot.log").write_text("built by afsd.lab.images\n")
    (rootfs / "usr/share/doc/busybox/README").write_text("busybox-static fallback root filesystem\n")


def busybox_layers(scratch: Path) -> tuple[LayerSpec, ...]:
    """A small runnable image: a busybox-static root filesystem, then an application layer on top.

    `scratch` is an empty directory to build the root filesystem in (the caller removes it).
    """
    rootfs = scratch / "rootfs"
    rootfs.mkdir()
    busybox_rootfs(rootfs)
    app = (Entry("etc/motd", data=b"Hello from an afsd image: erofs layers, mounted by the kernel.\n"),
           Entry("srv/app/run.sh", mode=0o755,
                 data=b"#!/bin/sh\necho \"running on $(uname -s) as uid $(id -u), $(ls /bin | wc -l) tools in /bin\"\n"))
    return (LayerSpec(tuple(entries_from_directory(rootfs))), LayerSpec(app, compression="zstd"))
