"""Compare two root filesystems path by path: the yardstick of the image-equivalence tests.

Where it sits: at the very end of the data flow. Once an image has become a root filesystem twice
(afsd's erofs blobs stacked by overlayfs on one side, an independent unpacker such as umoci on the
other), `snapshot` records every path of each tree and `compare_trees` lists, in words, everything
that differs. The CLI does the same for two directories:

    python -m tests.support.treecompare ROOT_A ROOT_B [--cross-mounts] [--json]

What is recorded per path (without following symlinks):
  kind, full permission and special bits (S_IMODE: rwx, setuid, setgid, sticky), uid, gid;
  regular files: size and sha256 of the content; symlinks: the target; devices: major and minor;
  xattrs: every name and value except `EXCLUDED_XATTR_PREFIXES`;
  regular files sharing an inode with other recorded paths: the sorted set of those paths
  (comparable between trees, unlike inode numbers or link counts, which whiteouts can skew);
  mtime in ns for everything but directories (a directory's mtime changes whenever an unpacker
  creates something in it, so it says more about extraction order than about the image).

Directories on another filesystem than the root's are recorded but not entered, unless
`cross_mounts` is set. Only directories are checked: overlayfs reports a per-layer device number
for non-directories while its directories all carry the overlay's own, so a file's st_dev says
nothing about mount boundaries.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from afsd.lab.facts import file_kind

# Mount plumbing, not image content:
# - trusted.overlay.*: overlayfs' own bookkeeping (opaque, redirect, origin, metacopy, ...). It is
#   how whiteouts and opaque directories are stored in a layer; overlayfs hides these names from
#   listxattr on the merged tree anyway, and a plain directory tree never has them.
EXCLUDED_XATTR_PREFIXES: tuple[str, ...] = ("trusted.overlay.",)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Node:
    """What is recorded about one path. Fields that do not apply to the kind are None."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None = None
    sha256: str | None = None
    symlink_target: str | None = None
    device: tuple[int, int] | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    hardlinks: tuple[str, ...] | None = None
    mtime_ns: int | None = None


Snapshot = dict[str, Node]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _xattrs(path: str, excluded: tuple[str, ...]) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # filesystems without xattr support
        return ()
    return tuple(sorted((name, os.getxattr(path, name, follow_symlinks=False))
                        for name in names if not name.startswith(excluded)))


def snapshot(root: Path | str, *, cross_mounts: bool = False,
             excluded_xattr_prefixes: Iterable[str] = EXCLUDED_XATTR_PREFIXES) -> Snapshot:
    """Record every path under `root` (keys `/`, `/etc`, `/etc/passwd`, ...)."""
    root = os.fspath(root)
    excluded = tuple(excluded_xattr_prefixes)
    root_dev = os.lstat(root).st_dev
    nodes: Snapshot = {}
    inodes: dict[tuple[int, int], list[str]] = {}

    def record(rel: str, full: str, st: os.stat_result) -> None:
        kind = file_kind(st.st_mode)
        node = Node(kind=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                    xattrs=_xattrs(full, excluded),
                    mtime_ns=None if kind == "dir" else st.st_mtime_ns)
        if kind == "file":
            node = replace(node, size=st.st_size, sha256=_sha256(full))
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        elif kind == "symlink":
            node = replace(node, symlink_target=os.readlink(full))
        elif kind in ("char", "block"):
            node = replace(node, device=(os.major(st.st_rdev), os.minor(st.st_rdev)))
        nodes[rel] = node

    def walk(rel_dir: str, full_dir: str) -> None:
        with os.scandir(full_dir) as it:
            names = sorted(entry.name for entry in it)
        for name in names:
            full = os.path.join(full_dir, name)
            rel = f"{rel_dir.rstrip('/')}/{name}"
            st = os.lstat(full)
            record(rel, full, st)
            if stat.S_ISDIR(st.st_mode) and (cross_mounts or st.st_dev == root_dev):
                walk(rel, full)

    record("/", root, os.lstat(root))
    walk("/", root)
    for paths in inodes.values():
        if len(paths) > 1:
            group = tuple(sorted(paths))
            for path in paths:
                nodes[path] = replace(nodes[path], hardlinks=group)
    return nodes


def _show(field: str, value: object) -> str:
    if value is None:
        return "none"
    if field == "mode":
        return f"{value:04o}"
    if field == "device":
        return f"{value[0]}:{value[1]}"  # type: ignore[index]
    if field == "sha256":
        return repr(value[:12])  # type: ignore[index]
    if field == "hardlinks":
        return "{" + ", ".join(value) + "}"  # type: ignore[arg-type]
    return repr(value)


def _xattr_differences(path: str, a: Node, b: Node, labels: tuple[str, str]) -> list[str]:
    xa, xb = dict(a.xattrs), dict(b.xattrs)
    lines = []
    for name in sorted(set(xa) | set(xb)):
        if name not in xb:
            lines.append(f"{path}: xattr {name} only in {labels[0]}")
        elif name not in xa:
            lines.append(f"{path}: xattr {name} only in {labels[1]}")
        elif xa[name] != xb[name]:
            lines.append(f"{path}: xattr {name} differs: {xa[name]!r:.80} != {xb[name]!r:.80}")
    return lines


def _under(path: str, ancestor: str) -> bool:
    return path.startswith(ancestor.rstrip("/") + "/")


def compare_trees(a: Path | str | Mapping[str, Node], b: Path | str | Mapping[str, Node], *,
                  labels: tuple[str, str] = ("A", "B"), cross_mounts: bool = False) -> list[str]:
    """Every difference between two trees (or snapshots), one readable line each; [] if identical.

    A path missing on one side is reported once, with the number of entries below it.
    """
    left = a if isinstance(a, Mapping) else snapshot(a, cross_mounts=cross_mounts)
    right = b if isinstance(b, Mapping) else snapshot(b, cross_mounts=cross_mounts)
    differences: list[str] = []
    for side, this, other in ((labels[0], left, right), (labels[1], right, left)):
        missing = sorted(p for p in this if p not in other)
        for path in missing:
            parent = path.rsplit("/", 1)[0] or "/"
            if parent != path and parent in this and parent not in other:
                continue  # reported with its ancestor
            below = sum(1 for p in missing if _under(p, path))
            extra = f" and {below} entries below it" if below else ""
            differences.append(f"{path}: only in {side} ({this[path].kind}){extra}")
    for path in sorted(set(left) & set(right)):
        x, y = left[path], right[path]
        if x == y:
            continue
        if x.kind != y.kind:
            differences.append(f"{path}: kind differs: {x.kind} != {y.kind}")
            continue
        for f in fields(Node):
            if f.name == "kind":
                continue
            if f.name == "xattrs":
                differences += _xattr_differences(path, x, y, labels)
                continue
            vx, vy = getattr(x, f.name), getattr(y, f.name)
            if vx != vy:
                differences.append(f"{path}: {f.name} differs: {_show(f.name, vx)} != {_show(f.name, vy)}")
    return differences


def format_differences(differences: list[str], labels: tuple[str, str] = ("A", "B"),
                       limit: int = 60) -> str:
    """The first `limit` differences as a block of text for an assertion message."""
    head = [f"{len(differences)} difference(s) between {labels[0]} and {labels[1]}:"]
    shown = differences[:limit]
    tail = [f"... and {len(differences) - limit} more"] if len(differences) > limit else []
    return "\n".join(head + [f"  {line}" for line in shown] + tail)


def _to_json(snap: Snapshot) -> dict:
    return {path: {**asdict(node), "xattrs": {k: v.hex() for k, v in node.xattrs}}
            for path, node in snap.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.treecompare",
        description="Compare two directory trees: kinds, modes, owners, contents, links, devices, "
                    "xattrs, hardlink groups and non-directory mtimes. Exit 0 if identical, 1 if not.")
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--cross-mounts", action="store_true", help="descend into other filesystems")
    parser.add_argument("--json", action="store_true", help="print both snapshots and the differences as JSON")
    args = parser.parse_args(argv)
    for root in (args.a, args.b):
        if not root.is_dir():
            print(f"treecompare: {root} is not a directory", file=sys.stderr)
            return 2
    left = snapshot(args.a, cross_mounts=args.cross_mounts)
    right = snapshot(args.b, cross_mounts=args.cross_mounts)
    labels = (str(args.a), str(args.b))
    differences = compare_trees(left, right, labels=labels)
    if args.json:
        json.dump({"differences": differences, "a": _to_json(left), "b": _to_json(right)}, sys.stdout, indent=1)
        print()
    elif differences:
        print(format_differences(differences, labels, limit=len(differences)))
    else:
        print(f"identical: {len(left)} paths")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
