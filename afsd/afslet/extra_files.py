"""The extra files of an Execute call (`file_begin` / `file_chunk` / `file_end` frames), written under
the session's extra directory, which the node daemon stacks read-only above the image.

Paths are the client's and are never trusted: a path is cleaned lexically (leading `/` and `.` dropped,
`..` resolved), a path that climbs out of the extra directory is refused, and every directory on the
way is opened with O_NOFOLLOW relative to its parent's fd, so a symlink uploaded earlier (`a -> /etc`)
cannot redirect a later entry (`a/passwd`) outside. Symlink *targets* are stored as given: they are
resolved inside the container, where they cannot reach the host.

Modes, owners and mtimes are applied at `file_end`; directory mtimes are applied once the upload is
complete (creating entries inside a directory would change it again). All disk work runs in threads.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from dataclasses import dataclass, field

from afsd.afslet.errors import LimitError, RequestError
from afsd.api import afslet_pb2 as pb

_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_OPEN = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755


def clean_path(path: str) -> list[str]:
    """The components of `path` relative to the extra directory; RequestError if it escapes or is empty."""
    if "\x00" in path:
        raise RequestError(f"path {path!r} contains a NUL byte")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise RequestError(f"path {path!r} escapes the extra directory")
            parts.pop()
            continue
        parts.append(part)
    if not parts:
        raise RequestError(f"path {path!r} names the extra directory itself; give a path below it")
    return parts


@dataclass
class _OpenEntry:
    begin: pb.FileEntryBegin
    display: str
    parent_fd: int
    name: str
    fd: int = -1  # regular files only


@dataclass
class ExtraTree:
    """Writes one call's extra entries under `root` (an existing, empty directory)."""

    root: str
    max_bytes: int = 1 << 62       # file bytes in all (afsd let --max-extra-bytes)
    max_entries: int = 1 << 62     # entries in all (afsd let --max-extra-entries)
    entries: int = 0
    bytes_written: int = 0
    paths: set[str] = field(default_factory=set)
    _root_fd: int = -1
    _open: _OpenEntry | None = None
    _dir_times: list[tuple[list[str], int]] = field(default_factory=list)

    # -- frames ---------------------------------------------------------------------------------

    async def begin(self, begin: pb.FileEntryBegin) -> None:
        if self._open is not None:
            # The reference closed a previous entry implicitly; keep that leniency.
            await self.end()
        parts = clean_path(begin.path)
        kind = begin.type
        if kind not in (pb.FILE_TYPE_DIR, pb.FILE_TYPE_FILE, pb.FILE_TYPE_SYMLINK):
            raise RequestError(f"file_begin {begin.path!r}: unknown file type {kind}")
        if kind == pb.FILE_TYPE_SYMLINK and not begin.symlink_target:
            raise RequestError(f"file_begin {begin.path!r}: a symlink needs symlink_target")
        if "\x00" in begin.symlink_target:
            raise RequestError(f"file_begin {begin.path!r}: symlink_target contains a NUL byte")
        if self.entries >= self.max_entries:
            raise LimitError(f"extra files: more than this afslet's limit of {self.max_entries} entries "
                             "(afsd let --max-extra-entries)")
        self._open = await asyncio.to_thread(self._begin, begin, parts)
        self.entries += 1
        self.paths.add("/".join(parts))

    async def chunk(self, chunk: pb.FileChunk) -> None:
        if not chunk.data:
            return
        entry = self._open
        if entry is None:
            raise RequestError("file_chunk without a preceding file_begin")
        if entry.fd < 0:
            raise RequestError(f"file_chunk for {entry.display!r}, which is not a regular file")
        if self.bytes_written + len(chunk.data) > self.max_bytes:
            raise LimitError(f"extra files: more than this afslet's limit of {self.max_bytes} bytes "
                             "(afsd let --max-extra-bytes)")
        await asyncio.to_thread(self._write_all, entry, chunk.data)
        self.bytes_written += len(chunk.data)

    async def end(self) -> None:
        entry, self._open = self._open, None
        if entry is None:
            raise RequestError("file_end without a preceding file_begin")
        await asyncio.to_thread(self._finish_entry, entry)

    async def complete(self) -> None:
        """The client half-closed: check nothing is left open, then set directory mtimes."""
        if self._open is not None:
            raise RequestError(f"the upload ended inside {self._open.display!r}: file_end is missing")
        await asyncio.to_thread(self._apply_dir_times)

    def close(self) -> None:
        """Release file descriptors (after success or failure)."""
        entry, self._open = self._open, None
        if entry is not None:
            self._close_entry(entry)
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    # -- blocking parts (threads) ---------------------------------------------------------------

    def _root(self) -> int:
        if self._root_fd < 0:
            self._root_fd = os.open(self.root, _DIR_OPEN)
        return self._root_fd

    def _open_dirs(self, parts: list[str], display: str, *, create_mode: int = DEFAULT_DIR_MODE) -> int:
        """An fd of the directory `parts` (created 0755 where missing), never following a symlink."""
        fd = os.dup(self._root())
        try:
            for index, part in enumerate(parts):
                try:
                    os.mkdir(part, create_mode, dir_fd=fd)
                except FileExistsError:
                    pass
                try:
                    child = os.open(part, _DIR_OPEN, dir_fd=fd)
                except OSError as error:
                    if error.errno in (errno.ELOOP, errno.ENOTDIR):
                        where = "/".join(parts[:index + 1])
                        raise RequestError(f"file_begin {display!r}: {where!r} is not a directory "
                                           "(a file or symlink was uploaded there)") from None
                    raise
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _begin(self, begin: pb.FileEntryBegin, parts: list[str]) -> _OpenEntry:
        display = "/".join(parts)
        try:
            if begin.type == pb.FILE_TYPE_DIR:
                fd = self._open_dirs(parts, display)
                os.close(fd)
                parent = self._open_dirs(parts[:-1], display)
                return _OpenEntry(begin, display, parent, parts[-1])
            parent = self._open_dirs(parts[:-1], display)
            entry = _OpenEntry(begin, display, parent, parts[-1])
            try:
                if begin.type == pb.FILE_TYPE_SYMLINK:
                    self._replace_with_symlink(entry)
                else:
                    entry.fd = os.open(entry.name, _FILE_OPEN, 0o600, dir_fd=parent)
                    if not stat.S_ISREG(os.fstat(entry.fd).st_mode):
                        raise RequestError(f"file_begin {display!r}: not a regular file")
            except BaseException:
                self._close_entry(entry)
                raise
            return entry
        except RequestError:
            raise
        except OSError as error:
            raise RequestError(f"file_begin {display!r}: {error.strerror or error}") from None

    def _replace_with_symlink(self, entry: _OpenEntry) -> None:
        try:
            existing = os.stat(entry.name, dir_fd=entry.parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None:
            if stat.S_ISDIR(existing.st_mode):
                raise RequestError(f"file_begin {entry.display!r}: a directory is already there")
            os.unlink(entry.name, dir_fd=entry.parent_fd)
        os.symlink(entry.begin.symlink_target, entry.name, dir_fd=entry.parent_fd)

    @staticmethod
    def _write_all(entry: _OpenEntry, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(entry.fd, view)
            view = view[written:]

    def _finish_entry(self, entry: _OpenEntry) -> None:
        begin = entry.begin
        try:
            if begin.type == pb.FILE_TYPE_FILE:
                os.fchmod(entry.fd, (begin.mode & 0o7777) or DEFAULT_FILE_MODE)
                _chown(lambda: os.fchown(entry.fd, begin.uid, begin.gid))
                # chown clears set-uid/set-gid bits: apply the mode again after it.
                os.fchmod(entry.fd, (begin.mode & 0o7777) or DEFAULT_FILE_MODE)
                if begin.mtime_unix > 0:
                    os.utime(entry.fd, (begin.mtime_unix, begin.mtime_unix))
            elif begin.type == pb.FILE_TYPE_DIR:
                fd = os.open(entry.name, _DIR_OPEN, dir_fd=entry.parent_fd)
                try:
                    _chown(lambda: os.fchown(fd, begin.uid, begin.gid))
                    os.fchmod(fd, (begin.mode & 0o7777) or DEFAULT_DIR_MODE)
                finally:
                    os.close(fd)
                if begin.mtime_unix > 0:
                    self._dir_times.append((entry.display.split("/"), begin.mtime_unix))
            else:
                _chown(lambda: os.chown(entry.name, begin.uid, begin.gid, dir_fd=entry.parent_fd,
                                        follow_symlinks=False))
                if begin.mtime_unix > 0:
                    os.utime(entry.name, (begin.mtime_unix, begin.mtime_unix), dir_fd=entry.parent_fd,
                             follow_symlinks=False)
        except OSError as error:
            raise RequestError(f"file_end {entry.display!r}: {error.strerror or error}") from None
        finally:
            self._close_entry(entry)

    def _apply_dir_times(self) -> None:
        # Deepest first, so that setting a child's time does not disturb its parent's afterwards.
        for parts, mtime in sorted(self._dir_times, key=lambda item: -len(item[0])):
            fd = self._open_dirs(parts, "/".join(parts))
            try:
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)

    @staticmethod
    def _close_entry(entry: _OpenEntry) -> None:
        if entry.fd >= 0:
            os.close(entry.fd)
            entry.fd = -1
        if entry.parent_fd >= 0:
            os.close(entry.parent_fd)
            entry.parent_fd = -1


def _chown(call) -> None:
    try:
        call()
    except PermissionError:
        pass  # not root: keep our own ownership, as the reference did


def add_mount_stubs(root: str, *, resolv_conf: bool, directories: list[str] = ()) -> None:
    """Mount points runc needs, created in the extra dir (a read-only lower) rather than letting runc
    create them in the writable upper, where they would show up in the returned tar.

    Nothing is created where the client uploaded something; `resolv_conf` adds an empty
    etc/resolv.conf for the host's file to be bind-mounted onto; `directories` (absolute container
    paths, the operator's --bind destinations) are created with their parents.
    """
    for name in ("proc", "sys", "dev"):
        path = os.path.join(root, name)
        if not os.path.lexists(path):
            os.mkdir(path, 0o755)
    for directory in directories:
        path = os.path.join(root, directory.strip("/"))
        if not os.path.lexists(path):
            os.makedirs(path, 0o755, exist_ok=True)
    if resolv_conf:
        etc = os.path.join(root, "etc")
        if not os.path.lexists(etc):
            os.mkdir(etc, 0o755)
        if os.path.isdir(etc) and not os.path.islink(etc):
            target = os.path.join(etc, "resolv.conf")
            if not os.path.lexists(target):
                with open(target, "x"):
                    pass
                os.chmod(target, 0o644)
