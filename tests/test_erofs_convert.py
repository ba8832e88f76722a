"""Layer -> erofs blob conversion, checked through real kernel mounts (erofs file-backed + overlayfs)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path

import pytest

from afsd.erofs.convert import (
    CHUNK_SIZE,
    BlobInfo,
    blob_id_for,
    convert_layer,
    convert_layer_async,
    converter_identity,
)
from afsd.erofs.layout import data_map
from afsd.erofs.mkfs import fsck_erofs
from afsd.erofs.mount import unmount
from afsd.erofs.stack import StackLayer, mount_image_stack
from afsd.errors import ConversionError, LayerFormatError, MissingToolError
from tests.support.tars import Layer, LayerFile, write_blob

MiB = 1 << 20


def convert(layer_file: LayerFile, out_dir: Path, **kw: object) -> tuple[BlobInfo, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "blob.erofs"
    info = convert_layer(layer_file.path, layer_file.compression, layer_file.digest, out,  # type: ignore[arg-type]
                         expected_diff_id=layer_file.diff_id, **kw)  # type: ignore[arg-type]
    fsck_erofs(out)
    return info, out


@pytest.fixture
def mount_stack(tmp_path: Path) -> Iterator:
    """mount_stack([(info, blob), ...] bottom first) -> the overlay's root; unmounted at teardown."""
    with contextlib.ExitStack() as stack:
        def mount(converted: Sequence[tuple[BlobInfo, Path]]) -> Path:
            root = Path(tempfile.mkdtemp(prefix="mnt-", dir=tmp_path))
            target = root / "rootfs"
            target.mkdir()
            layers = [StackLayer(blob, info.implicit_dirs) for info, blob in converted]
            stack.enter_context(mount_image_stack(layers, target, scratch=root / "layers"))
            return target
        yield mount


# -- round trip ------------------------------------------------------------------------------------

CAPABILITY = bytes([1, 0, 0, 2, 0x00, 0x20, 0, 0]) + bytes(12)  # cap_net_bind_service, permitted
LONG_NAME = "L" * 254  # mkfs.erofs 1.5 cannot store 255-byte names (see test below)
DEEP_DIR = "/".join(["deep"] * 30)


def everything_layer() -> Layer:
    return (
        Layer()
        .dir("./", mode=0o755, mtime=1_500_000_000)
        .dir("etc", mode=0o750, uid=1000, gid=1001, mtime=1_400_000_000, xattrs={"user.dir": b"d"})
        .file("etc/empty", b"")
        .file("etc/small", b"hello\n", mtime="1600000000.123456789")
        .file("etc/block", b"B" * 4096)
        .file("etc/block+1", b"C" * 4097)
        .file("usr/bin/su", b"\x7fELF-su", mode=0o4755)
        .file("usr/bin/wall", b"\x7fELF-wall", mode=0o2755, gid=5)
        .file("usr/bin/ping", b"\x7fELF-ping", mode=0o755,
              xattrs={"security.capability": CAPABILITY, "user.mime": b"app/x\x00\xff"})
        .dir("tmp", mode=0o1777)
        .hardlink("usr/bin/su-link", "usr/bin/su")
        .hardlink("usr/bin/su-link2", "usr/bin/su")
        .symlink("bin", "usr/bin")
        .symlink("etc/abs", "/etc/shadow", xattrs={"trusted.tag": b"on-a-symlink"})
        .symlink("dangling", "../../nowhere")
        .chardev("dev/null", 1, 3, mode=0o666)
        .blockdev("dev/sda1", 8, 1, mode=0o660, gid=6)
        .fifo("run/initctl", mode=0o600)
        .file(f"names/{LONG_NAME}", b"long")
        .file("names/ünïcødé-ファイル", b"unicode")
        .file("names/latin1-\udce9t\udce9", b"not utf-8")
        .file(f"{DEEP_DIR}/leaf", b"deep")
        .file("owners/big", b"x", uid=2**31 + 5, gid=70000)
    )


def test_every_entry_type_round_trips_through_a_mount(tmp_path: Path, mount_stack) -> None:  # noqa: ANN001
    info, blob = convert(everything_layer().write(tmp_path / "layer.tgz"), tmp_path / "out")
    root = mount_stack([(info, blob)])

    st = root.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns) == (0o755, 0, 1_500_000_000 * 10**9)
    st = (root / "etc").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 1000, 1001)
    assert st.st_mtime_ns == 1_400_000_000 * 10**9  # set after its contents were created
    assert os.getxattr(root / "etc", "user.dir") == b"d"

    assert (root / "etc/empty").read_bytes() == b""
    assert (root / "etc/small").read_bytes() == b"hello\n"
    assert (root / "etc/small").stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert (root / "etc/block").read_bytes() == b"B" * 4096
    assert (root / "etc/block+1").read_bytes() == b"C" * 4097

    assert stat.S_IMODE((root / "usr/bin/su").stat().st_mode) == 0o4755
    st = (root / "usr/bin/wall").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2755, 5)
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert os.getxattr(root / "usr/bin/ping", "security.capability") == CAPABILITY
    assert os.getxattr(root / "usr/bin/ping", "user.mime") == b"app/x\x00\xff"

    su = (root / "usr/bin/su").stat()
    for link in ("usr/bin/su-link", "usr/bin/su-link2"):
        assert (root / link).stat().st_ino == su.st_ino
    assert su.st_nlink == 3

    assert os.readlink(root / "bin") == "usr/bin"
    assert (root / "bin/su").read_bytes() == b"\x7fELF-su"  # the symlink resolves inside the mount
    assert os.readlink(root / "etc/abs") == "/etc/shadow"
    assert os.getxattr(root / "etc/abs", "trusted.tag", follow_symlinks=False) == b"on-a-symlink"
    assert os.readlink(root / "dangling") == "../../nowhere"

    st = (root / "dev/null").lstat()
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o666
    st = (root / "dev/sda1").lstat()
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev), st.st_gid) == (8, 1, 6)
    st = (root / "run/initctl").lstat()
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600

    assert (root / "names" / LONG_NAME).read_bytes() == b"long"
    assert (root / "names/ünïcødé-ファイル").read_bytes() == b"unicode"
    assert sorted(os.listdir(os.fsencode(root / "names"))) == sorted(
        [LONG_NAME.encode(), "ünïcødé-ファイル".encode(), b"latin1-\xe9t\xe9"])
    assert (root / DEEP_DIR / "leaf").read_bytes() == b"deep"
    st = (root / "owners/big").stat()
    assert (st.st_uid, st.st_gid) == (2**31 + 5, 70000)


def test_large_and_sparse_files_round_trip(tmp_path: Path, mount_stack) -> None:  # noqa: ANN001
    # A 40 MiB file with data scattered between long runs of zeros, written in full by tarfile ...
    big = bytearray(40 * MiB)
    for offset in (0, 7 * MiB + 3, 20 * MiB, 40 * MiB - 5):
        big[offset : offset + 5] = b"data!"
    # ... and a real GNU sparse member (pax sparse format 1.0), as `tar --sparse` writes it.
    source = tmp_path / "sparse-src"
    source.mkdir()
    with open(source / "sparse", "wb") as f:
        f.truncate(40 * MiB)
        for offset in (MiB, 33 * MiB):
            f.seek(offset)
            f.write(os.urandom(5000))
    subprocess.run(["tar", "--sparse", "--format=posix", "--numeric-owner", "-C", str(source),
                    "-cf", str(tmp_path / "sparse.tar"), "sparse"], check=True)
    tar = (tmp_path / "sparse.tar").read_bytes()
    assert len(tar) < MiB  # the archive really is sparse

    dense_info, dense_blob = convert(Layer().file("big", bytes(big)).write(tmp_path / "big.tar", "none"),
                                     tmp_path / "dense")
    sparse_info, sparse_blob = convert(write_blob(tmp_path / "sparse.tar.zst", tar, "zstd"), tmp_path / "sparse")
    assert (mount_stack([(dense_info, dense_blob)]) / "big").read_bytes() == big
    mounted = mount_stack([(sparse_info, sparse_blob)]) / "sparse"
    assert hashlib.sha256(mounted.read_bytes()).digest() == hashlib.sha256((source / "sparse").read_bytes()).digest()
    assert sum(length for _, length in dense_info.data_map) == 40 * MiB


def test_mtimes_before_1970_and_after_2096_survive_with_nanoseconds(tmp_path: Path, mount_stack) -> None:  # noqa: ANN001
    # mkfs.erofs clamps mtimes to SOURCE_DATE_EPOCH, as unsigned numbers (see afsd.erofs.mkfs).
    times = {"y1960": "-315619199.25", "epoch": "0", "y2038": "2147483748.5", "y2096": "4000000000.123456789",
             "y2100": "4102444800", "y2242": str(2**33), "y2262": "9223372036.854775807"}
    layer = Layer()
    for name, mtime in times.items():
        layer.file(f"files/{name}", name.encode(), mtime=mtime)
    layer.dir("dirs/y2242", mtime="8589934592.000000001").dir("dirs/y1901", mtime=str(-2**31))
    layer_file = layer.write(tmp_path / "times.tar")
    converted = convert(layer_file, tmp_path / "a")
    root = mount_stack([converted])
    for name, mtime in times.items():
        assert (root / "files" / name).lstat().st_mtime_ns == int(Decimal(mtime) * 10**9), name
    assert (root / "dirs/y2242").lstat().st_mtime_ns == 2**33 * 10**9 + 1
    assert (root / "dirs/y1901").lstat().st_mtime_ns == -2**31 * 10**9
    _, again = convert(layer_file, tmp_path / "b")
    assert again.read_bytes() == converted[1].read_bytes()


# -- layers stacked with overlayfs -----------------------------------------------------------------


def test_whiteouts_and_opaque_dirs_hide_lower_layers(tmp_path: Path, mount_stack) -> None:  # noqa: ANN001
    base = (Layer().file("etc/keep", b"k").file("etc/remove", b"r").file("top-file", b"t")
            .file("cache/a", b"a").file("cache/sub/b", b"b").file("tree/x/y", b"y"))
    change = (Layer().whiteout("etc/remove").whiteout("top-file").opaque("cache").file("cache/new", b"n")
              .whiteout("tree").file("added", b"+").file("mine", b"m").whiteout("mine"))
    lower = convert(base.write(tmp_path / "base.tgz"), tmp_path / "base")
    upper = convert(change.write(tmp_path / "change.tgz"), tmp_path / "change")
    root = mount_stack([lower, upper])
    assert sorted(os.listdir(root)) == ["added", "cache", "etc", "mine"]
    assert sorted(os.listdir(root / "etc")) == ["keep"]
    assert not (root / "etc/remove").exists() and not (root / "top-file").exists()
    assert sorted(os.listdir(root / "cache")) == ["new"]  # opaque: the lower a and sub/ are hidden
    assert not (root / "cache/sub/b").exists()
    assert not (root / "tree").exists()
    assert (root / "mine").read_bytes() == b"m"  # whited out by the layer that adds it: stays
    # The lower layer alone still has everything.
    assert sorted(os.listdir(mount_stack([lower]))) == ["cache", "etc", "top-file", "tree"]


# -- reproducibility and metadata ------------------------------------------------------------------


def reproducibility_layer() -> Layer:
    layer = Layer()
    # Names out of order and many xattrs per file: staging file systems list both differently.
    for name in ("zeta", "alpha", "mid", "Beta", "_x", "0"):
        layer.file(f"d/{name}", name.encode() * 100, xattrs={
            "user.zz": b"1", "user.aa": b"2", "trusted.t": b"3", "security.capability": CAPABILITY,
            f"user.{name}": b"own"})
    return (layer.dir("d", xattrs={"user.b": b"1", "user.a": b"2"}).hardlink("d/link", "d/mid")
            .symlink("s", "d/zeta").file("e/f", b"x"))


def test_conversion_is_byte_identical_across_work_filesystems(tmp_path: Path) -> None:
    layer = reproducibility_layer().write(tmp_path / "layer.tar.gz")
    on_disk, blob_a = convert(layer, tmp_path / "a")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        on_tmpfs, blob_b = convert(layer, tmp_path / "b", work_dir=Path(shm))
        assert os.listdir(shm) == []  # the staging dir is gone
    assert blob_a.read_bytes() == blob_b.read_bytes()
    assert on_disk == on_tmpfs


def test_blob_info_describes_the_blob(tmp_path: Path) -> None:
    layer = reproducibility_layer().file("big", os.urandom(3 * MiB + 17)).write(tmp_path / "l.tar.zst", "zstd")
    info, blob = convert(layer, tmp_path / "out")
    data = blob.read_bytes()
    assert info.size == len(data) and info.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert info.chunk_size == CHUNK_SIZE == MiB
    assert info.chunk_digests == [hashlib.sha256(data[i : i + MiB]).digest() for i in range(0, len(data), MiB)]
    assert info.diff_id == layer.diff_id and info.layer_digest == layer.digest
    assert info.blob_id == blob_id_for(layer.digest) and info.converter == converter_identity()
    assert "erofs-utils/1.5" in info.converter
    assert info.data_map == data_map(blob)
    assert BlobInfo.from_json(json.loads(json.dumps(info.to_json()))) == info
    assert sorted(os.listdir(tmp_path / "out")) == ["blob.erofs"]


def test_blob_id_depends_only_on_layer_digest_and_converter() -> None:
    digest = "sha256:" + "ab" * 32
    expected = hashlib.sha256(f"{converter_identity()}\n{digest}".encode()).hexdigest()
    assert blob_id_for(digest) == "sha256:" + expected
    assert blob_id_for(digest) != blob_id_for("sha256:" + "cd" * 32)


async def test_async_conversion_gives_the_same_blob(tmp_path: Path) -> None:
    layer = reproducibility_layer().write(tmp_path / "layer.tar.gz")
    sync_info, sync_blob = convert(layer, tmp_path / "sync")
    out = tmp_path / "async.erofs"
    info = await convert_layer_async(layer.path, "gzip", layer.digest, out, expected_diff_id=layer.diff_id)
    assert info == sync_info and out.read_bytes() == sync_blob.read_bytes()


# -- failures leave nothing behind -----------------------------------------------------------------


def test_diff_id_mismatch_is_detected(tmp_path: Path) -> None:
    layer = Layer().file("a", b"x").write(tmp_path / "layer.tgz")
    (tmp_path / "out").mkdir()
    wrong = "sha256:" + "0" * 64
    with pytest.raises(LayerFormatError, match=f"unpacks to diff_id {layer.diff_id}.*expects {wrong}"):
        convert_layer(layer.path, "gzip", layer.digest, tmp_path / "out/blob.erofs", expected_diff_id=wrong)
    assert os.listdir(tmp_path / "out") == []


def test_truncated_layer_fails_without_leftovers(tmp_path: Path) -> None:
    layer = Layer().file("a", os.urandom(500_000)).write(tmp_path / "layer.tgz")
    layer.path.write_bytes(layer.path.read_bytes()[:200_000])
    (tmp_path / "out").mkdir()
    with pytest.raises(LayerFormatError, match=f"layer {layer.digest} is truncated"):
        convert_layer(layer.path, "gzip", layer.digest, tmp_path / "out/blob.erofs")
    assert os.listdir(tmp_path / "out") == []


def test_full_disk_is_a_conversion_error_naming_layer_and_path(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        layer = Layer().file("big", os.urandom(3 * MiB)).write(tmp_path / "layer.tar", "none")
        out = small / "blob.erofs"
        with pytest.raises(ConversionError) as error:
            convert_layer(layer.path, "none", layer.digest, out, work_dir=tmp_path)
        message = str(error.value)
        assert layer.digest in message and str(out) in message and "\n" not in message
        assert os.listdir(small) == []
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("afsd-staging")] == []
    finally:
        unmount(small)


def test_missing_mkfs_erofs_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = Layer().file("a", b"x").write(tmp_path / "layer.tgz")
    (tmp_path / "empty-path").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    with pytest.raises(MissingToolError, match="mkfs.erofs not found.*apt-get install erofs-utils"):
        convert_layer(layer.path, "gzip", layer.digest, tmp_path / "blob.erofs")
    assert not any(p.name.startswith(("blob.erofs", "afsd-staging")) for p in tmp_path.iterdir())


def test_name_too_long_for_mkfs_is_a_clear_error(tmp_path: Path) -> None:
    name = "N" * 255  # valid in tar, ext4 and the erofs format; mkfs.erofs 1.5 fails on it
    layer = Layer().file(f"dir/{name}", b"x").write(tmp_path / "layer.tgz")
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match=f"layer {layer.digest} has a 255-byte file name .*upgrade erofs-utils"):
        convert_layer(layer.path, "gzip", layer.digest, tmp_path / "out/blob.erofs")
    assert os.listdir(tmp_path / "out") == []


def test_fsck_rejects_a_damaged_blob(tmp_path: Path) -> None:
    _, blob = convert(Layer().file("a", b"x" * 10000).write(tmp_path / "layer.tgz"), tmp_path / "out")
    damaged = tmp_path / "damaged.erofs"
    damaged.write_bytes(blob.read_bytes()[:4096])  # the data blocks are gone
    with pytest.raises(ConversionError, match=f"fsck.erofs rejects {damaged}"):
        fsck_erofs(damaged)
