"""The layer tar unpacker and the decompressing reader: safety, whiteouts, attributes, errors."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
from pathlib import Path

import pytest
import zstandard

from afsd.erofs.decompress import open_layer
from afsd.erofs.unpack import OVERLAY_OPAQUE_XATTR, UnpackReport, decode_dir_path, encode_dir_path, unpack_layer
from afsd.errors import LayerFormatError
from tests.support.tars import Layer, LayerFile, write_blob


def unpack(layer_file: LayerFile, staging: Path) -> tuple[UnpackReport, str]:
    staging.mkdir(parents=True, exist_ok=True)
    with open_layer(layer_file.path, layer_file.compression, layer_file.digest) as stream:  # type: ignore[arg-type]
        report = unpack_layer(stream, staging, layer=layer_file.digest)
        stream.drain()
        return report, stream.diff_id


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path below `root` with its mode and (for files) contents or (for symlinks) target."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                content = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.fsencode(os.readlink(path))
            else:
                content = b""
            result[str(path.relative_to(root))] = (st.st_mode, content)
    return result


# -- hostile archives ------------------------------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """(staging, sentinel): staging two levels below tmp_path, a sentinel directory next to it."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep").write_text("untouched")
    staging = tmp_path / "work" / "staging"
    staging.mkdir(parents=True)
    return staging, sentinel


def hostile_layers(sentinel: Path) -> dict[str, tuple[Layer, str]]:
    """Each hostile archive with the entry the error must name."""
    return {
        "dotdot": (Layer().file("../evil", b"x"), "../evil"),
        "absolute": (Layer().file(f"{sentinel}/abs", b"x"), f"{sentinel}/abs"),
        "dotdot_inside": (Layer().dir("dir").file("dir/../../x", b"x"), "dir/../../x"),
        "through_symlink": (Layer().symlink("a", str(sentinel)).file("a/file", b"x"), "a/file"),
        "dir_through_symlink": (Layer().symlink("a", str(sentinel)).dir("a/sub"), "a/sub"),
        "symlink_dotdot_chain": (
            Layer().symlink("l1", "..").symlink("l2", "l1/..").file("l2/x", b"x"), "l2/x"
        ),
        "nested_symlink_chain": (
            Layer().dir("d").symlink("d/up", "../..").file("d/up/escaped", b"x"), "d/up/escaped"
        ),
        "hardlink_dotdot": (Layer().hardlink("passwd", "../../etc/passwd"), "passwd"),
        "hardlink_absolute": (Layer().hardlink("keep", f"{sentinel}/keep"), "keep"),
        "hardlink_through_symlink": (
            Layer().symlink("s", str(sentinel)).hardlink("keep", "s/keep"), "keep"
        ),
        "hardlink_missing": (Layer().hardlink("ghost", "not/there"), "ghost"),
        "whiteout_through_symlink": (Layer().symlink("s", str(sentinel)).whiteout("s/keep"), "s/.wh.keep"),
        "opaque_through_symlink": (Layer().symlink("s", str(sentinel)).opaque("s"), "s/.wh..wh..opq"),
    }


@pytest.mark.parametrize("case", sorted(hostile_layers(Path("/x"))))
def test_hostile_entry_fails_the_layer_and_writes_nothing_outside(
    case: str, sandbox: tuple[Path, Path], tmp_path: Path
) -> None:
    staging, sentinel = sandbox
    layer, entry = hostile_layers(sentinel)[case]
    blob = layer.write(tmp_path / "layer.tar.gz")
    before = tree(tmp_path / "work"), tree(sentinel)
    with pytest.raises(LayerFormatError) as error:
        unpack(blob, staging)
    message = str(error.value)
    assert blob.digest in message and repr(entry) in message and "\n" not in message
    # Nothing changed next to the staging dir or in the directory the entries aim at.
    assert tree(sentinel) == before[1]
    outside = {p for p in tree(tmp_path / "work") if not p.startswith("staging")}
    assert outside == {p for p in before[0] if not p.startswith("staging")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.tar.gz", "sentinel", "work"]


def test_symlinks_are_created_verbatim_and_never_followed(sandbox: tuple[Path, Path], tmp_path: Path) -> None:
    staging, sentinel = sandbox
    layer = (Layer().symlink("abs", f"{sentinel}/keep").symlink("up", "../../../../etc")
             .symlink("loop", "loop").symlink("abs", f"{sentinel}/other")  # a duplicate replaces it
             .file("up2", b"plain"))
    unpack(layer.write(tmp_path / "l.tar"), staging)
    assert os.readlink(staging / "abs") == f"{sentinel}/other"
    assert os.readlink(staging / "up") == "../../../../etc"
    assert os.readlink(staging / "loop") == "loop"
    assert (sentinel / "keep").read_text() == "untouched"


# -- corrupt and truncated input -------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_truncated_layer_is_a_clear_layer_format_error(compression: str, tmp_path: Path) -> None:
    layer = Layer().dir("etc").file("etc/big", os.urandom(300_000)).file("etc/after", b"x")
    blob = layer.write(tmp_path / "layer", compression)
    data = blob.path.read_bytes()
    blob.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LayerFormatError, match=r"^layer sha256:[0-9a-f]{64} is truncated: ") as error:
        unpack(blob, tmp_path / "staging")
    assert "\n" not in str(error.value)


def test_zstd_cut_at_a_block_boundary_is_still_truncated(tmp_path: Path) -> None:
    # The zstd stream reader alone reports a clean EOF here; the frame tracker must notice.
    tar = Layer().file("a", os.urandom(200_000)).tar_bytes()
    compressed = zstandard.ZstdCompressor(write_checksum=True).compress(tar)
    path = tmp_path / "layer.zst"
    path.write_bytes(compressed[:-4])  # only the frame checksum is missing
    with pytest.raises(LayerFormatError, match="is truncated"):
        with open_layer(path, "zstd", "sha256:cut") as stream:
            stream.drain()


def test_multi_frame_zstd_with_a_skippable_frame_reads_as_one_stream(tmp_path: Path) -> None:
    tar = Layer().file("a", os.urandom(300_000)).file("b", b"z" * 500_000).tar_bytes()
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    path = tmp_path / "layer.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(tar[:100_000]) + skippable
                     + zstandard.ZstdCompressor(write_checksum=True).compress(tar[100_000:]))
    blob = LayerFile(path, "zstd", "sha256:frames", "sha256:" + hashlib.sha256(tar).hexdigest())
    _, diff_id = unpack(blob, tmp_path / "staging")
    assert diff_id == blob.diff_id
    assert (tmp_path / "staging/b").read_bytes() == b"z" * 500_000


def test_corrupt_gzip_is_a_layer_format_error(tmp_path: Path) -> None:
    blob = Layer().file("a", os.urandom(100_000)).write(tmp_path / "layer.tgz", "gzip")
    data = bytearray(blob.path.read_bytes())
    data[5000:5100] = bytes(100)
    blob.path.write_bytes(bytes(data))
    with pytest.raises(LayerFormatError, match=r"is (corrupt|truncated)"):
        unpack(blob, tmp_path / "staging")


def test_not_a_tar_is_a_layer_format_error(tmp_path: Path) -> None:
    blob = write_blob(tmp_path / "layer.tgz", b"this is not a tar archive at all" * 100, "gzip")
    with pytest.raises(LayerFormatError, match="is not a valid tar archive"):
        unpack(blob, tmp_path / "staging")


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_diff_id_is_the_sha256_of_the_whole_uncompressed_stream(compression: str, tmp_path: Path) -> None:
    tar = Layer().file("a", b"hello").tar_bytes() + bytes(20480)  # padding after the end marker
    blob = write_blob(tmp_path / "layer", tar, compression)
    _, diff_id = unpack(blob, tmp_path / "staging")
    assert diff_id == "sha256:" + hashlib.sha256(tar).hexdigest() == blob.diff_id


def test_multi_member_gzip_reads_as_one_stream(tmp_path: Path) -> None:
    tar = Layer().file("a", b"1" * 10000).file("b", b"2" * 10000).tar_bytes()
    path = tmp_path / "layer.tgz"
    path.write_bytes(gzip.compress(tar[:7000]) + gzip.compress(tar[7000:]))
    blob = LayerFile(path, "gzip", "sha256:multi", "sha256:" + hashlib.sha256(tar).hexdigest())
    _, diff_id = unpack(blob, tmp_path / "staging")
    assert diff_id == blob.diff_id
    assert (tmp_path / "staging/b").read_bytes() == b"2" * 10000


# -- whiteouts, duplicates, attributes -------------------------------------------------------------


def test_whiteouts_become_overlayfs_whiteouts(tmp_path: Path) -> None:
    layer = (Layer().dir("etc").whiteout("etc/gone").whiteout("top").opaque("var/cache")
             .file(".wh..wh.plnk", b"aufs"))
    staging = tmp_path / "staging"
    report, _ = unpack(layer.write(tmp_path / "l.tar"), staging)
    for hidden in ("etc/gone", "top"):
        st = (staging / hidden).lstat()
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert not (staging / "etc/.wh.gone").exists()
    assert os.getxattr(staging / "var/cache", OVERLAY_OPAQUE_XATTR) == b"y"
    assert stat.S_IMODE((staging / "var/cache").stat().st_mode) == 0o755
    assert not (staging / "var/cache/.wh..wh..opq").exists()
    assert not (staging / ".wh..wh.plnk").exists() and report.warnings
    assert (report.whiteouts, report.opaque_dirs) == (2, 1)


def test_whiteout_of_an_entry_from_the_same_layer_keeps_the_entry(tmp_path: Path) -> None:
    layer = (Layer().file("kept", b"mine").whiteout("kept").whiteout("later").file("later", b"new")
             .whiteout("recreated").file("recreated/inside", b"child"))
    staging = tmp_path / "staging"
    unpack(layer.write(tmp_path / "l.tar"), staging)
    assert (staging / "kept").read_bytes() == b"mine"
    assert (staging / "later").read_bytes() == b"new"
    assert (staging / "recreated/inside").read_bytes() == b"child"


def test_duplicate_paths_later_entry_wins(tmp_path: Path) -> None:
    layer = (Layer().file("f", b"first").file("f", b"second")
             .dir("d", mode=0o700).file("d/inside", b"kept").dir("d", mode=0o750)
             .dir("x").file("x/sub", b"gone").file("x", b"file over dir")
             .file("y", b"file").dir("y").symlink("z", "one").file("z", b"file over symlink"))
    staging = tmp_path / "staging"
    unpack(layer.write(tmp_path / "l.tar"), staging)
    assert (staging / "f").read_bytes() == b"second"
    assert (staging / "d/inside").read_bytes() == b"kept"
    assert stat.S_IMODE((staging / "d").stat().st_mode) == 0o750
    assert (staging / "x").read_bytes() == b"file over dir"
    assert (staging / "y").is_dir()
    assert not (staging / "z").is_symlink() and (staging / "z").read_bytes() == b"file over symlink"


def test_trusted_overlay_xattrs_from_the_tar_are_dropped(tmp_path: Path) -> None:
    layer = Layer().dir("d", xattrs={"trusted.overlay.opaque": b"y", "trusted.overlay.redirect": b"/x",
                                     "user.ok": b"1"})
    staging = tmp_path / "staging"
    report, _ = unpack(layer.write(tmp_path / "l.tar"), staging)
    assert os.listxattr(staging / "d") == ["user.ok"]
    assert any("trusted.overlay.opaque" in w for w in report.warnings)


def test_root_defaults_to_0755_root_with_a_fixed_mtime(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir(mode=0o700)
    unpack(Layer().file("usr/bin/tool", b"x", mtime=1_700_000_000).write(tmp_path / "l.tar"), staging)
    st = staging.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o755, 0, 0, 0)
    # Parents the tar never lists are synthesized the same way.
    for parent in ("usr", "usr/bin"):
        st = (staging / parent).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o755, 0)
    assert (staging / "usr/bin/tool").stat().st_mtime_ns == 1_700_000_000 * 10**9


def test_root_entry_sets_the_root_attributes(tmp_path: Path) -> None:
    layer = Layer().dir("./", mode=0o750, uid=5, gid=6, mtime=1_500_000_000, xattrs={"user.root": b"r"})
    staging = tmp_path / "staging"
    unpack(layer.file("a", b"x").write(tmp_path / "l.tar"), staging)
    st = staging.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 5, 6)
    assert st.st_mtime_ns == 1_500_000_000 * 10**9
    assert os.getxattr(staging, "user.root") == b"r"


def test_directory_mtimes_come_from_the_tar_after_their_contents(tmp_path: Path) -> None:
    layer = (Layer().dir("d", mtime="1400000000.5").file("d/a", b"1", mtime="1600000000.123456789")
             .dir("d/sub", mtime=1_300_000_000).file("d/sub/b", b"2").whiteout("d/gone"))
    staging = tmp_path / "staging"
    unpack(layer.write(tmp_path / "l.tar"), staging)
    assert (staging / "d").stat().st_mtime_ns == 1_400_000_000_500_000_000
    assert (staging / "d/sub").stat().st_mtime_ns == 1_300_000_000 * 10**9
    assert (staging / "d/a").stat().st_mtime_ns == 1_600_000_000_123_456_789


def test_owner_mode_and_xattrs_survive_chown(tmp_path: Path) -> None:
    capability = bytes([1, 0, 0, 2, 0x20, 0, 0, 0]) + bytes(12)  # cap_net_raw, permitted
    layer = (Layer().file("suid", b"x", mode=0o4755, uid=1000, gid=1000)
             .file("cap", b"x", mode=0o755, uid=7, xattrs={"security.capability": capability})
             .dir("sticky", mode=0o1777, gid=50).file("sgid", b"x", mode=0o2711, uid=2**31, gid=2**20)
             .libarchive_xattr("bsd", "x", "user.from.bsdtar", b"\x00\xffbinary"))
    staging = tmp_path / "staging"
    unpack(layer.write(tmp_path / "l.tar"), staging)
    for name, mode, uid, gid in (("suid", 0o4755, 1000, 1000), ("cap", 0o755, 7, 0),
                                 ("sticky", 0o1777, 0, 50), ("sgid", 0o2711, 2**31, 2**20)):
        st = (staging / name).lstat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, gid), name
    assert os.getxattr(staging / "cap", "security.capability") == capability
    assert os.getxattr(staging / "bsd", "user.from.bsdtar") == b"\x00\xffbinary"


# -- implicit directories --------------------------------------------------------------------------


def test_directories_without_an_entry_of_their_own_are_reported_as_implicit(tmp_path: Path) -> None:
    layer = (Layer().file("srv/app/new.txt", b"n")  # srv and srv/app are implicit ...
             .dir("srv")  # ... until an entry for srv turns up, even after its contents
             .opaque("cache/only-marker")  # a directory that only holds an opaque marker
             .whiteout("again").file("again/inside", b"i")  # recreated after its own whiteout: new
             .file("replaced/sub/f", b"f").file("replaced", b"now a file")
             .dir("listed").file("listed/deeper/f", b"f"))
    staging = tmp_path / "staging"
    report, _ = unpack(layer.write(tmp_path / "l.tar"), staging)
    assert report.implicit_dirs == ["/", "/cache", "/cache/only-marker", "/listed/deeper", "/srv/app"]
    assert os.getxattr(staging / "cache/only-marker", OVERLAY_OPAQUE_XATTR) == b"y"


def test_a_root_entry_makes_the_root_explicit(tmp_path: Path) -> None:
    report, _ = unpack(Layer().dir("./").file("a/b", b"x").write(tmp_path / "l.tar"), tmp_path / "staging")
    assert report.implicit_dirs == ["/a"]


def test_implicit_dir_paths_survive_any_name_bytes(tmp_path: Path) -> None:
    layer = Layer().file("caf\udce9 50%/\u65e5\u672c/f", b"x")  # Latin-1 byte, `%`, UTF-8 name
    report, _ = unpack(layer.write(tmp_path / "l.tar"), tmp_path / "staging")
    assert report.implicit_dirs == ["/", "/caf%E9 50%25", "/caf%E9 50%25/%E6%97%A5%E6%9C%AC"]
    assert decode_dir_path(report.implicit_dirs[2]) == (b"caf\xe9 50%", "\u65e5\u672c".encode())
    for text in report.implicit_dirs:
        text.encode("utf-8")  # what JSON and protobuf string fields need
        assert encode_dir_path(decode_dir_path(text)) == text
