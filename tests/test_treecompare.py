"""The tree comparison tool itself: identical trees compare equal, and every kind of difference the
image-equivalence test relies on is caught and named."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.treecompare import compare_trees, main, snapshot

MTIME_NS = 1_600_000_000_123_456_789
CAPABILITY = struct.pack("<IIIII", 0x0200_0001, 1 << 10, 0, 0, 0)


def make_tree(root: Path) -> None:
    """A small tree with every kind of node the tool records."""
    (root / "dir/sub").mkdir(parents=True)
    (root / "dir/file.txt").write_bytes(b"content\n")
    (root / "dir/empty").write_bytes(b"")
    (root / "dir/hard-1").write_bytes(b"one inode\n")
    os.link(root / "dir/hard-1", root / "dir/sub/hard-2")
    (root / "dir/copy").write_bytes(b"one inode\n")
    os.symlink("../dir/file.txt", root / "dir/link")
    os.mkfifo(root / "dir/fifo")
    os.mknod(root / "dir/null", 0o20666, os.makedev(1, 3))
    os.mknod(root / "dir/loop", 0o60660, os.makedev(7, 0))
    (root / "dir/setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "dir/setuid", 0o4755)
    (root / "dir/sticky").mkdir()
    os.chmod(root / "dir/sticky", 0o1777)
    os.chown(root / "dir/file.txt", 1234, 5678)
    os.setxattr(root / "dir/file.txt", "user.comment", b"hello")
    os.setxattr(root / "dir/setuid", "security.capability", CAPABILITY)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        root.mkdir()
        make_tree(root)
    return a, b


def test_identical_trees_have_no_differences(trees: tuple[Path, Path]) -> None:
    a, b = trees
    assert compare_trees(a, b) == []


def test_snapshot_records_every_attribute(trees: tuple[Path, Path]) -> None:
    nodes = snapshot(trees[0])
    assert nodes["/dir/file.txt"].uid == 1234 and nodes["/dir/file.txt"].gid == 5678
    assert nodes["/dir/file.txt"].size == 8
    assert dict(nodes["/dir/file.txt"].xattrs) == {"user.comment": b"hello"}
    assert dict(nodes["/dir/setuid"].xattrs) == {"security.capability": CAPABILITY}
    assert nodes["/dir/setuid"].mode == 0o4755
    assert nodes["/dir/sticky"].mode == 0o1777
    assert nodes["/dir/link"].symlink_target == "../dir/file.txt"
    assert nodes["/dir/null"].kind == "char" and nodes["/dir/null"].device == (1, 3)
    assert nodes["/dir/loop"].kind == "block" and nodes["/dir/loop"].device == (7, 0)
    assert nodes["/dir/fifo"].kind == "fifo"
    assert nodes["/dir/hard-1"].hardlinks == ("/dir/hard-1", "/dir/sub/hard-2")
    assert nodes["/dir/copy"].hardlinks is None
    assert nodes["/dir/link"].mtime_ns == MTIME_NS
    assert nodes["/dir"].mtime_ns is None  # directories' mtimes are not compared


def _rewrite(path: str, data: bytes) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        target = root / path
        st = os.lstat(target)
        target.write_bytes(data)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    return change


def _relink(root: Path) -> None:
    os.unlink(root / "dir/sub/hard-2")
    (root / "dir/sub/hard-2").write_bytes(b"one inode\n")
    os.utime(root / "dir/sub/hard-2", ns=(MTIME_NS, MTIME_NS))


def _retarget(root: Path) -> None:
    os.unlink(root / "dir/link")
    os.symlink("/elsewhere", root / "dir/link")
    os.utime(root / "dir/link", ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)


def _renode(root: Path) -> None:
    os.unlink(root / "dir/null")
    os.mknod(root / "dir/null", 0o20666, os.makedev(1, 5))
    os.utime(root / "dir/null", ns=(MTIME_NS, MTIME_NS))


def _file_to_dir(root: Path) -> None:
    os.unlink(root / "dir/empty")
    (root / "dir/empty").mkdir()


DIFFERENCES = [
    ("content", _rewrite("dir/file.txt", b"CONTENT\n"), "/dir/file.txt: sha256 differs: '434728a410a7'"),
    ("size", _rewrite("dir/file.txt", b"longer content\n"),
     ("/dir/file.txt: size differs: 8 != 15", "/dir/file.txt: sha256 differs")),
    ("permission bits", lambda r: os.chmod(r / "dir/file.txt", 0o600), "/dir/file.txt: mode differs: 0644 != 0600"),
    ("setuid bit", lambda r: os.chmod(r / "dir/setuid", 0o755), "/dir/setuid: mode differs: 4755 != 0755"),
    ("sticky bit", lambda r: os.chmod(r / "dir/sticky", 0o777), "/dir/sticky: mode differs: 1777 != 0777"),
    ("uid", lambda r: os.chown(r / "dir/file.txt", 1, -1), "/dir/file.txt: uid differs: 1234 != 1"),
    ("gid", lambda r: os.chown(r / "dir/file.txt", -1, 1), "/dir/file.txt: gid differs: 5678 != 1"),
    ("symlink owner", lambda r: os.lchown(r / "dir/link", 42, -1), "/dir/link: uid differs: 0 != 42"),
    ("symlink target", _retarget, "/dir/link: symlink_target differs: '../dir/file.txt' != '/elsewhere'"),
    ("device numbers", _renode, "/dir/null: device differs: 1:3 != 1:5"),
    ("kind", _file_to_dir, "/dir/empty: kind differs: file != dir"),
    ("xattr value", lambda r: os.setxattr(r / "dir/file.txt", "user.comment", b"bye"),
     "/dir/file.txt: xattr user.comment differs: b'hello' != b'bye'"),
    ("xattr removed", lambda r: os.removexattr(r / "dir/setuid", "security.capability"),
     "/dir/setuid: xattr security.capability only in A"),
    ("xattr added", lambda r: os.setxattr(r / "dir/sub", "user.new", b"x"), "/dir/sub: xattr user.new only in B"),
    ("hardlink group", _relink, ("/dir/hard-1: hardlinks differs: {/dir/hard-1, /dir/sub/hard-2} != none",
                                 "/dir/sub/hard-2: hardlinks differs: {/dir/hard-1, /dir/sub/hard-2} != none")),
    ("file mtime", lambda r: os.utime(r / "dir/file.txt", ns=(0, MTIME_NS + 1)),
     f"/dir/file.txt: mtime_ns differs: {MTIME_NS} != {MTIME_NS + 1}"),
    ("symlink mtime", lambda r: os.utime(r / "dir/link", ns=(0, 5), follow_symlinks=False),
     f"/dir/link: mtime_ns differs: {MTIME_NS} != 5"),
    ("fifo mtime", lambda r: os.utime(r / "dir/fifo", ns=(0, 5)), f"/dir/fifo: mtime_ns differs: {MTIME_NS} != 5"),
    ("missing file", lambda r: os.unlink(r / "dir/empty"), "/dir/empty: only in A (file)"),
    ("extra file", lambda r: (r / "dir/extra").write_bytes(b""), "/dir/extra: only in B (file)"),
    ("root mode", lambda r: os.chmod(r, 0o700), "/: mode differs: 0755 != 0700"),
]


@pytest.mark.parametrize(("change", "expected"), [pytest.param(c, e, id=name) for name, c, e in DIFFERENCES])
def test_each_kind_of_difference_is_reported(trees: tuple[Path, Path], change: Callable[[Path], None],
                                             expected: str | tuple[str, ...]) -> None:
    """`expected`: the start of each line the change must produce (and no other lines)."""
    a, b = trees
    os.chmod(a, 0o755)
    os.chmod(b, 0o755)
    change(b)
    differences = compare_trees(a, b)
    prefixes = (expected,) if isinstance(expected, str) else expected
    assert len(differences) == len(prefixes), differences
    for prefix in prefixes:
        assert any(line.startswith(prefix) for line in differences), (prefix, differences)


def test_a_missing_directory_is_reported_once_with_its_contents_counted(trees: tuple[Path, Path]) -> None:
    a, b = trees
    subprocess.run(["rm", "-rf", str(b / "dir")], check=True)
    assert compare_trees(a, b, labels=("left", "right")) == ["/dir: only in left (dir) and 12 entries below it"]


def test_directory_mtimes_are_not_compared(trees: tuple[Path, Path]) -> None:
    a, b = trees
    os.utime(b / "dir/sub", ns=(0, 1))
    assert compare_trees(a, b) == []


def test_overlay_bookkeeping_xattrs_are_ignored(trees: tuple[Path, Path]) -> None:
    a, b = trees
    os.setxattr(b / "dir/sub", "trusted.overlay.opaque", b"y")
    assert compare_trees(a, b) == []
    os.setxattr(b / "dir/sub", "trusted.other", b"y")
    assert compare_trees(a, b) == ["/dir/sub: xattr trusted.other only in B"]


@pytest.fixture
def tmpfs_inside(trees: tuple[Path, Path]) -> Iterator[Path]:
    """A tmpfs mounted at b/dir/sub holding one file, unmounted afterwards."""
    point = trees[1] / "dir/sub"
    st = os.stat(point)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], check=True)
    try:
        os.chmod(point, st.st_mode & 0o7777)
        (point / "on-tmpfs").write_bytes(b"x")
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=True)


def test_other_mounts_are_not_entered_unless_asked(trees: tuple[Path, Path], tmpfs_inside: Path) -> None:
    b = trees[1]
    assert "/dir/sub/on-tmpfs" not in snapshot(b)
    assert "/dir/sub" in snapshot(b)
    assert "/dir/sub/on-tmpfs" in snapshot(b, cross_mounts=True)


def test_cli_exit_status_and_output(trees: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    a, b = trees
    assert main([str(a), str(b)]) == 0
    assert "identical" in capsys.readouterr().out
    os.chmod(b / "dir/file.txt", 0o600)
    assert main([str(a), str(b)]) == 1
    assert "/dir/file.txt: mode differs: 0644 != 0600" in capsys.readouterr().out
    assert main([str(a), str(b / "missing")]) == 2


def test_cli_runs_as_a_module(trees: tuple[Path, Path]) -> None:
    a, b = trees
    result = subprocess.run([sys.executable, "-m", "tests.support.treecompare", str(a), str(b), "--json"],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert '"differences": []' in result.stdout
