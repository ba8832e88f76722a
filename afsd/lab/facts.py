"""What a lab image's root filesystem must look like, known from how the image was built.

Where it sits: beside `layers`, at the end of the data flow. `apply_layers` applies `LayerSpec`s by
the OCI layer rules (whiteouts, opaque directories, replaced paths, hardlinks) in plain Python, a
third opinion next to afsd's converter and umoci; `facts_from_layers` turns the result into
`ImageFacts`, and `ImageFacts.check` lists what an unpacked or mounted root filesystem contradicts.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from afsd.lab.layers import OPAQUE_MARKER, WHITEOUT_PREFIX, Entry, LayerSpec, relative_path

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ImageFacts:
    """Paths whose final state is known from how the image was built (keys are `/abs/paths`).

    `kinds` maps each known path to file/dir/symlink/char/block/fifo; the other maps hold what is
    known about those paths (content sha256, symlink target, permission bits, owner, xattrs, device
    numbers, mtime in ns for non-directories). `absent` paths must not exist (deleted by whiteouts
    or opaque directories); each of `hardlink_groups` must be one inode.
    """

    kinds: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    symlinks: Mapping[str, str] = field(default_factory=dict)
    modes: Mapping[str, int] = field(default_factory=dict)
    owners: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    xattrs: Mapping[str, Mapping[str, bytes]] = field(default_factory=dict)
    devices: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    mtimes_ns: Mapping[str, int] = field(default_factory=dict)
    absent: frozenset[str] = frozenset()
    hardlink_groups: tuple[frozenset[str], ...] = ()

    def only(self, paths: Iterable[str]) -> ImageFacts:
        """The facts about `paths` alone (plus all absent paths and hardlink groups among them)."""
        keep = set(paths)

        def pick(mapping: Mapping[str, object]) -> dict:
            return {p: v for p, v in mapping.items() if p in keep}

        return ImageFacts(pick(self.kinds), pick(self.files), pick(self.symlinks), pick(self.modes),
                          pick(self.owners), pick(self.xattrs), pick(self.devices), pick(self.mtimes_ns),
                          self.absent, tuple(g for g in self.hardlink_groups if g <= keep))

    def check(self, root: Path) -> list[str]:
        """What in the root filesystem at `root` contradicts these facts (empty when nothing)."""
        problems: list[str] = []

        def at(path: str) -> Path:
            return root / path.lstrip("/")

        for path in sorted(self.absent):
            if os.path.lexists(at(path)):
                problems.append(f"{path}: exists, but a whiteout deleted it")
        for path, kind in sorted(self.kinds.items()):
            try:
                st = os.lstat(at(path))
            except FileNotFoundError:
                problems.append(f"{path}: missing (expected {kind})")
                continue
            actual = file_kind(st.st_mode)
            if actual != kind:
                problems.append(f"{path}: is a {actual}, expected {kind}")
                continue
            if path in self.modes and stat.S_IMODE(st.st_mode) != self.modes[path]:
                problems.append(f"{path}: mode {stat.S_IMODE(st.st_mode):04o}, expected {self.modes[path]:04o}")
            if path in self.owners and (st.st_uid, st.st_gid) != tuple(self.owners[path]):
                problems.append(f"{path}: owner {st.st_uid}:{st.st_gid}, expected "
                                f"{self.owners[path][0]}:{self.owners[path][1]}")
            if path in self.mtimes_ns and st.st_mtime_ns != self.mtimes_ns[path]:
                problems.append(f"{path}: mtime {st.st_mtime_ns} ns, expected {self.mtimes_ns[path]} ns")
            if path in self.files and _file_sha256(at(path)) != self.files[path]:
                problems.append(f"{path}: content differs from what the image holds")
            if path in self.symlinks and os.readlink(at(path)) != self.symlinks[path]:
                problems.append(f"{path}: symlink to {os.readlink(at(path))!r}, expected {self.symlinks[path]!r}")
            if path in self.devices and (os.major(st.st_rdev), os.minor(st.st_rdev)) != tuple(self.devices[path]):
                problems.append(f"{path}: device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}, expected "
                                f"{self.devices[path][0]}:{self.devices[path][1]}")
            if path in self.xattrs:
                actual_xattrs = _read_xattrs(at(path))
                if actual_xattrs != dict(self.xattrs[path]):
                    problems.append(f"{path}: xattrs {sorted(actual_xattrs)} differ from expected "
                                    f"{sorted(self.xattrs[path])}")
        for group in self.hardlink_groups:
            inodes = {(s.st_dev, s.st_ino) for s in (os.lstat(at(p)) for p in group if os.path.lexists(at(p)))}
            if len(inodes) != 1:
                problems.append(f"{sorted(group)}: expected one inode (hardlinks), found {len(inodes)}")
        return problems

    def to_json(self) -> dict:
        return {
            "kinds": dict(self.kinds), "files": dict(self.files), "symlinks": dict(self.symlinks),
            "modes": dict(self.modes), "owners": {p: list(o) for p, o in self.owners.items()},
            "xattrs": {p: {k: v.hex() for k, v in x.items()} for p, x in self.xattrs.items()},
            "devices": {p: list(d) for p, d in self.devices.items()}, "mtimes_ns": dict(self.mtimes_ns),
            "absent": sorted(self.absent), "hardlink_groups": [sorted(g) for g in self.hardlink_groups],
        }

    @classmethod
    def from_json(cls, doc: Mapping) -> ImageFacts:
        return cls(doc["kinds"], doc["files"], doc["symlinks"], doc["modes"],
                   {p: (o[0], o[1]) for p, o in doc["owners"].items()},
                   {p: {k: bytes.fromhex(v) for k, v in x.items()} for p, x in doc["xattrs"].items()},
                   {p: (d[0], d[1]) for p, d in doc["devices"].items()}, doc["mtimes_ns"],
                   frozenset(doc["absent"]), tuple(frozenset(g) for g in doc["hardlink_groups"]))


def file_kind(mode: int) -> str:
    """file, dir, symlink, char, block, fifo or socket, from an `st_mode`."""
    for test, kind in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "unknown"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_xattrs(path: Path) -> dict[str, bytes]:
    names = os.listxattr(path, follow_symlinks=False)
    # Overlayfs keeps its own bookkeeping there; it is not image content.
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names if not n.startswith("trusted.overlay.")}


def apply_layers(layers: Sequence[LayerSpec]) -> tuple[dict[str, Entry], tuple[frozenset[str], ...]]:
    """The final state of an image's root filesystem by the OCI layer rules, as a third opinion.

    Returns each surviving path (`/abs/path`) with the entry that determines it (a hardlink is
    replaced by the entry of the file it links to, which shares its inode) and the hardlink groups
    with more than one surviving path. Whiteouts and opaque markers apply to lower layers only; a
    non-directory replacing a directory drops the directory's contents.
    """
    state: dict[str, Entry] = {}
    inode_of: dict[str, str] = {}  # path -> path of the first member of its inode

    def drop(path: str, *, itself: bool, keep: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        prefix = path.rstrip("/") + "/"
        for p in [p for p in state if (p.startswith(prefix) or (itself and p == path)) and p not in keep]:
            del state[p]
            inode_of.pop(p, None)

    for layer in layers:
        this_layer: set[str] = set()
        for entry in layer.members():
            path = "/" + entry.name
            parent, base = path.rsplit("/", 1)
            parent = parent or "/"
            if base == OPAQUE_MARKER:
                drop(parent, itself=False, keep=this_layer)
                continue
            if base.startswith(WHITEOUT_PREFIX):
                drop(f"{parent.rstrip('/')}/{base[len(WHITEOUT_PREFIX):]}", itself=True, keep=this_layer)
                continue
            previous = state.get(path)
            if previous is not None and not (previous.kind == "dir" and entry.kind == "dir"):
                drop(path, itself=True)
            if entry.kind == "hardlink":
                target = "/" + relative_path(entry.linkname)
                state[path] = replace(state[target], path=entry.path)
                inode_of[path] = inode_of.get(target, target)
            else:
                state[path] = entry
                inode_of[path] = path
            this_layer.add(path)

    groups: dict[str, set[str]] = {}
    for path, first in inode_of.items():
        if path in state and state[path].kind == "file":
            groups.setdefault(first, set()).add(path)
    return state, tuple(frozenset(g) for g in groups.values() if len(g) > 1)


def facts_from_layers(layers: Sequence[LayerSpec], *, paths: Iterable[str] | None = None,
                      absent: Iterable[str] = ()) -> ImageFacts:
    """`ImageFacts` for the root filesystem `layers` build (for `paths` only, if given)."""
    state, groups = apply_layers(layers)
    wanted = set(state) if paths is None else set(paths)
    absent = frozenset(absent)
    if wanted - set(state) or absent & set(state):
        raise ValueError(f"facts_from_layers: paths not in the image: {sorted(wanted - set(state))}; "
                         f"paths meant to be deleted but present: {sorted(absent & set(state))}")
    chosen = {p: e for p, e in state.items() if p in wanted}
    return ImageFacts(
        kinds={p: e.kind for p, e in chosen.items()},
        files={p: e.sha256() for p, e in chosen.items() if e.kind == "file"},
        symlinks={p: e.linkname for p, e in chosen.items() if e.kind == "symlink"},
        modes={p: e.mode & 0o7777 for p, e in chosen.items() if e.kind != "symlink"},
        owners={p: (e.uid, e.gid) for p, e in chosen.items()},
        xattrs={p: dict(e.xattrs) for p, e in chosen.items() if e.kind in ("file", "dir")},
        devices={p: (e.devmajor, e.devminor) for p, e in chosen.items() if e.kind in ("char", "block")},
        mtimes_ns={p: e.mtime_ns for p, e in chosen.items() if e.kind != "dir"},
        absent=absent,
        hardlink_groups=tuple(g for g in groups if g <= wanted),
    )
