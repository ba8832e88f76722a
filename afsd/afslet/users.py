"""The container's user, looked up in the image's own /etc/passwd and /etc/group (Docker's rules,
as in moby's `user.GetExecUser`), never the host's.

`""` is root. `name` or `uid` takes uid, primary gid and home from passwd (an unknown numeric uid is
allowed, with gid 0); without an explicit group, the groups listing the user as a member become
supplementary gids. `user:group` takes the group by name or number and adds no supplementary groups.

The files are read through `path_in_root`, which resolves symlinks as if `rootfs` were `/`: an image's
`/etc/passwd -> /somewhere` cannot make afslet read a host file.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from afsd.afslet.errors import SetupError

MAX_SYMLINKS = 40
MAX_ID = 2**31 - 1


@dataclass(frozen=True)
class ExecUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"
    name: str = ""


@dataclass(frozen=True)
class _Passwd:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class _Group:
    name: str
    gid: int
    members: tuple[str, ...]


def path_in_root(root: Path, path: str) -> Path:
    """`path` inside `root` with every symlink resolved relative to `root` (`..` stops at `root`)."""
    pending = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            links += 1
            if links > MAX_SYMLINKS:
                raise SetupError(f"too many levels of symlinks resolving {path} in the image")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p not in ("", ".")] + pending
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def _read_lines(rootfs: Path, path: str) -> list[list[str]]:
    try:
        text = path_in_root(rootfs, path).read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _passwd(rootfs: Path) -> list[_Passwd]:
    entries = []
    for fields in _read_lines(rootfs, "/etc/passwd"):
        if len(fields) >= 4 and fields[2].isdigit() and fields[3].isdigit():
            entries.append(_Passwd(fields[0], int(fields[2]), int(fields[3]), fields[5] if len(fields) > 5 else ""))
    return entries


def _groups(rootfs: Path) -> list[_Group]:
    entries = []
    for fields in _read_lines(rootfs, "/etc/group"):
        if len(fields) >= 3 and fields[2].isdigit():
            members = tuple(m for m in fields[3].split(",") if m) if len(fields) > 3 else ()
            entries.append(_Group(fields[0], int(fields[2]), members))
    return entries


def _numeric(text: str, what: str) -> int | None:
    if not text.isdigit():
        return None
    value = int(text)
    if value > MAX_ID:
        raise SetupError(f"{what} {text} is out of range (0-{MAX_ID})")
    return value


def resolve_user(rootfs: Path, spec: str) -> ExecUser:
    user_part, _, group_part = spec.partition(":")
    uid, gid, home, name = 0, 0, "/", ""
    passwd = _passwd(rootfs)
    wanted = user_part or "0"
    wanted_uid = _numeric(wanted, "uid")
    match = next((p for p in passwd if p.name == wanted or (wanted_uid is not None and p.uid == wanted_uid)), None)
    if match is not None:
        uid, gid, home, name = match.uid, match.gid, match.home or "/", match.name
    elif wanted_uid is not None:
        uid = wanted_uid
    else:
        raise SetupError(f"user {wanted!r} is not in the image's /etc/passwd; use a user the image defines "
                         "or a numeric uid")
    groups = _groups(rootfs)
    if group_part:
        wanted_gid = _numeric(group_part, "gid")
        group = next((g for g in groups if g.name == group_part or (wanted_gid is not None and g.gid == wanted_gid)),
                     None)
        if group is not None:
            gid = group.gid
        elif wanted_gid is not None:
            gid = wanted_gid
        else:
            raise SetupError(f"group {group_part!r} is not in the image's /etc/group; use a group the image "
                             "defines or a numeric gid")
        return ExecUser(uid, gid, (), posixpath.normpath(home), name)
    additional = sorted({g.gid for g in groups if name and name in g.members} - {gid})
    return ExecUser(uid, gid, tuple(additional), posixpath.normpath(home), name)
