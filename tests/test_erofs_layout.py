"""The erofs layout reader: data map vs dump.erofs and real mounts, metadata completeness, xattr order."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from afsd.erofs.convert import convert_layer
from afsd.erofs.layout import (
    FLAT_INLINE,
    SUPERBLOCK_OFFSET,
    ErofsImage,
    crc32c,
    data_map,
    merge_ranges,
)
from afsd.erofs.mkfs import build_image, fsck_erofs
from afsd.erofs.mount import mount_erofs, unmount
from afsd.errors import ConversionError
from tests.support.tars import Layer

MiB = 1 << 20
FILE_SIZES = [0, 1, 100, 4095, 4096, 4097, 8192, 3 * 4096 + 5, MiB + 3]


def varied_layer() -> Layer:
    layer = Layer()
    for size in FILE_SIZES:
        layer.file(f"sizes/f{size}", os.urandom(size), xattrs={"user.size": str(size).encode()})
    for i in range(400):  # a directory spanning several blocks of dirents
        layer.file(f"many/{i:04d}-{'n' * 56}", f"{i}".encode() * (i % 7))
    return (layer.symlink("link", "sizes/f100").hardlink("sizes/hard", f"sizes/f{MiB + 3}")
            .fifo("fifo").chardev("null", 1, 3).file("deep/a/b/c/d/e", b"e" * 5000))


@pytest.fixture
def mount(tmp_path: Path) -> Iterator:
    """mount(image) -> a mount point of the image (file-backed erofs), unmounted at teardown."""
    with contextlib.ExitStack() as stack:
        def do_mount(image: Path) -> Path:
            target = Path(tempfile.mkdtemp(prefix="mnt-", dir=tmp_path))
            mount_erofs(image, target)
            stack.callback(unmount, target)
            return target
        yield do_mount


@pytest.fixture
def converted(tmp_path: Path) -> Path:
    layer = varied_layer().write(tmp_path / "layer.tar", "none")
    out = tmp_path / "blob.erofs"
    convert_layer(layer.path, "none", layer.digest, out)
    return out


def regular_files(image: Path) -> dict[bytes, object]:
    with ErofsImage(image) as img:
        return {path: inode for path, inode in img.walk() if inode.is_regular}


def test_walk_and_placement_agree_with_dump_erofs(converted: Path) -> None:
    files = regular_files(converted)
    checked = 0
    for size in (1, 4096, 4097, MiB + 3):
        path = f"/sizes/f{size}".encode()
        inode = files[path]
        out = subprocess.run(["dump.erofs", "-e", f"--path={path.decode()}", str(converted)],
                             capture_output=True, text=True, check=True).stdout
        assert int(re.search(r"NID: (\d+)", out).group(1)) == inode.nid
        assert int(re.search(r"Size: (\d+)", out).group(1)) == inode.size == size
        extents = re.findall(r"^\s*\d+:\s*\d+\.\.\s*\d+\s*\|\s*\d+\s*:\s*(\d+)\.\.\s*(\d+)\s*\|", out, re.M)
        start, end = int(extents[0][0]), int(extents[-1][1])
        with ErofsImage(converted) as img:
            blocks = img.placement(inode).blocks
        assert blocks is not None and blocks[0] == start
        # dump.erofs prints the physical range of the file's bytes; ours is rounded to whole blocks.
        assert start + size <= blocks[0] + blocks[1] and blocks[1] == -(-(end - start) // 4096) * 4096
        checked += 1
    assert checked == 4


def test_every_file_is_read_from_its_mapped_bytes(converted: Path, mount) -> None:  # noqa: ANN001
    root = mount(converted)
    ranges = data_map(converted)
    image_bytes = converted.read_bytes()
    files = regular_files(converted)
    assert len(files) == len(FILE_SIZES) + 400 + 2  # + the hardlink path + deep/a/b/c/d/e
    with ErofsImage(converted) as img:
        for path, inode in files.items():
            through_mount = (root / os.fsdecode(path.lstrip(b"/"))).read_bytes()
            assert img.read_data(inode) == through_mount, path
            placement = img.placement(inode)
            assert placement.tail is None  # -Enoinline_data: whole-block file data only
            if inode.size:
                start, length = placement.blocks
                assert image_bytes[start : start + inode.size] == through_mount
                assert any(s <= start and start + length <= s + n for s, n in ranges), path


def test_image_without_its_data_ranges_still_mounts_with_all_metadata(
    converted: Path, mount, tmp_path: Path  # noqa: ANN001
) -> None:
    ranges = data_map(converted)
    size = converted.stat().st_size
    assert sum(n for _, n in ranges) > 0.9 * size  # -Enoinline_data: almost everything is data
    holes = tmp_path / "metadata-only.erofs"
    with open(converted, "rb") as src, open(holes, "wb") as dst:
        dst.truncate(size)
        position = 0
        for start, length in [*ranges, (size, 0)]:
            src.seek(position)
            dst.seek(position)
            dst.write(src.read(start - position))  # copy only what lies outside the data map
            position = start + length

    def describe(root: Path) -> dict[str, tuple]:
        result = {}
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                st = path.lstat()
                xattrs = {k: os.getxattr(path, k, follow_symlinks=False)
                          for k in os.listxattr(path, follow_symlinks=False)}
                target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
                result[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_nlink, st.st_mtime_ns,
                                                        st.st_rdev, target, xattrs)
        return result

    full_root, hollow_root = mount(converted), mount(holes)
    assert describe(hollow_root) == describe(full_root)
    assert (hollow_root / "sizes/f4097").read_bytes() == bytes(4097)  # data really came from holes


def test_inline_tails_are_located(tmp_path: Path, mount) -> None:  # noqa: ANN001
    # Default mkfs.erofs options (no -Enoinline_data) store file tails inside the metadata.
    source = tmp_path / "src"
    source.mkdir()
    for size in FILE_SIZES:
        (source / f"f{size}").write_bytes(os.urandom(size))
    image = tmp_path / "inline.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(source)], check=True, capture_output=True)
    root = mount(image)
    image_bytes = image.read_bytes()
    ranges = data_map(image)
    tails = 0
    with ErofsImage(image) as img:
        for path, inode in img.walk():
            if not inode.is_regular:
                continue
            expected = (root / os.fsdecode(path.lstrip(b"/"))).read_bytes()
            assert img.read_data(inode) == expected
            placement = img.placement(inode)
            if inode.layout == FLAT_INLINE and placement.tail:
                tails += 1
                start, length = placement.tail
                assert image_bytes[start : start + length] == expected[-length:]
                # The tail is metadata: outside every data range.
                assert not any(s < start + length and start < s + n for s, n in ranges)
    assert tails >= 3


def test_compressed_images_are_rejected(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "text").write_bytes(b"compress me " * 10000)
    image = tmp_path / "lz4.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", "-zlz4", str(image), str(source)], check=True, capture_output=True)
    with pytest.raises(ConversionError, match=f"erofs image {image} has a compressed .*inode"):
        data_map(image)


def test_non_erofs_files_are_rejected(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(8192))
    with pytest.raises(ConversionError, match="bad magic"):
        data_map(junk)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ConversionError, match="is empty"):
        data_map(tmp_path / "empty")


def test_merge_ranges_sorts_and_joins_touching_ranges() -> None:
    assert merge_ranges([(8192, 4096), (0, 4096), (4096, 4096), (20480, 4096), (20480, 8192)]) == [
        (0, 12288), (20480, 8192)]
    assert merge_ranges([]) == []


def test_crc32c_matches_the_superblock_checksum_mkfs_writes(converted: Path) -> None:
    with ErofsImage(converted) as img:
        block = bytearray(img.read(SUPERBLOCK_OFFSET, img.block_size - SUPERBLOCK_OFFSET))
        stored = int.from_bytes(block[4:8], "little")
        block[4:8] = bytes(4)
        assert crc32c(bytes(block)) == stored


def test_xattr_order_does_not_depend_on_the_staging_filesystem(tmp_path: Path, mount) -> None:  # noqa: ANN001
    names = ["user.zz", "user.aa", "trusted.t", "security.capability", "user.mm"]
    values = {name: name.encode() * 3 for name in names}
    values["security.capability"] = bytes([1, 0, 0, 2]) + bytes(16)
    images = []
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        for base, order in ((tmp_path, names), (Path(shm), names[::-1])):
            source = base / "src"
            source.mkdir()
            for file_name in ("b", "a", "c"):
                (source / file_name).write_bytes(b"x")
                for name in order:
                    os.setxattr(source / file_name, name, values[name])
                os.utime(source / file_name, (1, 1))
            os.utime(source, (1, 1))
            image = tmp_path / f"{len(images)}.erofs"
            build_image(source, image, fs_uuid=uuid.UUID(int=7), layer="sha256:test")
            images.append(image)
        listed = [os.listxattr(Path(shm) / "src/a"), os.listxattr(tmp_path / "src/a")]
    assert listed[0] != listed[1]  # the two file systems really list them differently
    assert images[0].read_bytes() == images[1].read_bytes()
    fsck_erofs(images[0])
    root = mount(images[0])  # the kernel checks the rewritten superblock checksum
    assert {n: os.getxattr(root / "a", n) for n in os.listxattr(root / "a")} == values
    assert (root / "a").stat().st_mtime == 1
