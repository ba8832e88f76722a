"""Unpack one layer's tar stream into a staging directory that mkfs.erofs will read.

Data flow: `decompress.LayerStream` (uncompressed tar bytes) -> `unpack_layer` -> staging directory ->
`mkfs.build_image`. The staging tree is an overlayfs *lower layer*: OCI whiteouts become overlayfs
whiteouts (`.wh.NAME` -> a 0/0 character device NAME, `.wh..wh..opq` -> `trusted.overlay.opaque=y` on the
directory).

The tar is read as a stream (`tarfile` mode `r|`): one member at a time, file data copied in 1 MiB
chunks. Every file-system call is relative to a directory fd obtained by walking the path one component
at a time with `O_NOFOLLOW|O_DIRECTORY`, so no entry can write outside the staging root, whatever
symlinks earlier entries created. Symlinks themselves are created verbatim and never followed.

Policy for hostile or malformed entries (all fail the whole layer with `LayerFormatError` naming the
entry; a layer a registry serves is content-addressed, so a half-applied layer would be worse than none):
- absolute paths (`/etc/passwd`) and paths with a `..` component (`../x`, `a/../b`);
- paths whose parent is a symlink (`a -> /tmp/x`, then `a/file`) or a non-directory;
- hardlinks whose target is absolute, contains `..`, is missing, or is a directory.
Other oddities are skipped with a logged warning: AUFS metadata (`.wh..wh.*` other than the opaque
marker), tar member types with no file-system meaning, xattrs the staging file system refuses
(EPERM, ENOTSUP), and xattrs in the `trusted.overlay.*` namespace.
The latter are dropped because overlayfs acts on them (opaque, redirect, metacopy, ...): a layer could
otherwise hide or redirect other layers' files beyond what OCI whiteouts express.

Duplicate paths: the later entry wins; a directory over a directory keeps the directory (and its
contents) and takes the later entry's attributes. A whiteout never hides an entry of its own layer
(OCI image spec): `.wh.x` after `x` is ignored, and `x` or `x/y` after `.wh.x` replaces the whiteout.

Implicit directories: a parent the tar never lists (`srv/app` for `srv/app/new.txt`, the root without a
`./` entry, a directory that only holds a `.wh..wh..opq` marker) is created as 0755 root:root with a
fixed mtime, and listed in `UnpackReport.implicit_dirs`. OCI extraction keeps the metadata such a
directory already has in the layers below; overlayfs cannot know that, so `stack` restores it when the
image's layers are stacked. A directory recreated right after its own whiteout (`.wh.x`, then `x/y`) is
new, not implicit: the whiteout removed the lower one.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import shutil
import stat
import tarfile
import urllib.parse
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO

from afsd.errors import ConversionError, LayerFormatError

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_XATTR_PREFIX = "trusted.overlay."

# Entries the tar does not describe (the root without a `./` entry, parents the tar never lists)
# get this mtime, so the image does not depend on when it was built.
SYNTHESIZED_MTIME_NS = 0

_COPY_CHUNK = 1 << 20
# tarfile's stream reader re-slices its buffer on every header read: 64 KiB beats both its 10 KiB
# default (too many small reads) and 1 MiB (too much copying per 512-byte header).
_TAR_STREAM_BUFFER = 64 << 10
_ZERO_CHUNK = bytes(_COPY_CHUNK)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# xattrs the staging file system cannot hold: warn, as GNU tar does, instead of failing the layer.
_XATTR_UNSUPPORTED = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}
# Printable ASCII but `%` stays as it is in `encode_dir_path`.
_PATH_TEXT_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


@dataclass
class UnpackReport:
    """What `unpack_layer` did, for logs and tests."""

    entries: int = 0
    file_bytes: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    longest_name: bytes = b""  # the longest single path component, as mkfs.erofs limits it
    longest_name_entry: str = ""
    warnings: list[str] = field(default_factory=list)
    # Directories the tar does not list (see module doc), as `encode_dir_path` strings, sorted.
    implicit_dirs: list[str] = field(default_factory=list)


def encode_dir_path(parts: tuple[bytes, ...]) -> str:
    """An absolute path (`/`, `/srv/app`) as text that survives JSON and protobuf `string` fields.

    Names are bytes, and not always UTF-8: `%` and every byte outside printable ASCII are written as
    `%XX` (so `/caf%C3%A9` is `/café`); `decode_dir_path` reverses it.
    """
    return "/" + urllib.parse.quote(b"/".join(parts), safe=_PATH_TEXT_SAFE)


def decode_dir_path(text: str) -> tuple[bytes, ...]:
    """The path components of an `encode_dir_path` string (`()` for the root)."""
    return tuple(p for p in urllib.parse.unquote_to_bytes(text).split(b"/") if p)


def unpack_layer(stream: BinaryIO, staging: Path, *, layer: str) -> UnpackReport:
    """Extract the tar read from `stream` into the existing, empty directory `staging`.

    `layer` names the layer in errors. Raises `LayerFormatError` for a corrupt, truncated or hostile
    archive and `ConversionError` when the staging file system fails (e.g. it is full).
    """
    extractor = _Extractor(staging, layer)
    try:
        extractor.run(stream)
    finally:
        extractor.close()
    return extractor.report


class _Extractor:
    def __init__(self, staging: Path, layer: str) -> None:
        self.staging = staging
        self.layer = layer
        self.report = UnpackReport()
        self.root_fd = os.open(staging, _DIR_FLAGS)
        # mkdtemp makes 0700 dirs; a layer without a `./` entry must still give a usable root.
        os.fchown(self.root_fd, 0, 0)
        os.fchmod(self.root_fd, 0o755)
        # Directory mtimes are applied at the end: creating entries inside a directory changes its mtime.
        self.dir_mtimes: dict[tuple[bytes, ...], int] = {(): SYNTHESIZED_MTIME_NS}
        # Directories created without an entry of their own, until an entry for them turns up.
        self.implicit_dirs: set[tuple[bytes, ...]] = {()}
        self._cached_parent: tuple[tuple[bytes, ...], int] | None = None

    def close(self) -> None:
        self._drop_parent_cache()
        os.close(self.root_fd)

    # -- driving ---------------------------------------------------------------------------------

    def run(self, stream: BinaryIO) -> None:
        name = "<archive header>"
        try:
            with tarfile.open(fileobj=stream, mode="r|", errors="surrogateescape",
                              bufsize=_TAR_STREAM_BUFFER) as tar:
                for member in tar:
                    name = member.name
                    self.report.entries += 1
                    self._extract(tar, member)
            self._apply_dir_mtimes()
            self.report.implicit_dirs = sorted(encode_dir_path(parts) for parts in self.implicit_dirs)
        except tarfile.TarError as e:
            what = "is truncated" if "unexpected end of data" in str(e) else "is not a valid tar archive"
            raise LayerFormatError(f"layer {self.layer} {what}: {e} (at entry {name!r})") from None
        except OSError as e:
            raise ConversionError(
                f"unpacking layer {self.layer} into {self.staging} failed at entry {name!r}: "
                f"{e.strerror or e}"
            ) from None

    def _extract(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = self._components(member.name, member.name)
        if not parts:
            if not member.isdir():
                raise self._hostile(member.name, "the archive root is not a directory")
            self._set_dir_attributes(self.root_fd, (), member)
            return
        base = parts[-1]
        if len(base) > len(self.report.longest_name):
            self.report.longest_name, self.report.longest_name_entry = base, member.name
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, member)
            return
        parent = self._parent_fd(parts, member.name)
        if member.isdir():
            self._make_dir(parent, parts, member)
        elif member.isreg():
            self._make_file(parent, parts, tar, member)
        elif member.issym():
            self._replace(parent, parts)
            os.symlink(_fsbytes(member.linkname), base, dir_fd=parent)
            self._set_attributes(parent, base, member, is_symlink=True)
        elif member.islnk():
            self._make_hardlink(parent, parts, member)
        elif member.ischr() or member.isblk() or member.isfifo():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() else stat.S_IFIFO
            self._replace(parent, parts)
            device = os.makedev(member.devmajor, member.devminor) if not member.isfifo() else 0
            os.mknod(base, kind | 0o600, device, dir_fd=parent)
            self._set_attributes(parent, base, member)
        else:
            self._warn(f"skipped entry {member.name!r} of unsupported tar type {member.type!r}")

    # -- paths -----------------------------------------------------------------------------------

    def _components(self, name: str, entry: str, what: str = "path") -> tuple[bytes, ...]:
        raw = _fsbytes(name)
        if raw.startswith(b"/"):
            raise self._hostile(entry, f"absolute {what} {name!r}")
        parts = tuple(p for p in raw.split(b"/") if p not in (b"", b"."))
        if b".." in parts:
            raise self._hostile(entry, f"{what} {name!r} contains '..'")
        return parts

    def _parent_fd(self, parts: tuple[bytes, ...], entry: str) -> int:
        """An fd of the directory that will hold `parts[-1]`, creating missing parents (0755, root)."""
        dirs = parts[:-1]
        if self._cached_parent is not None and self._cached_parent[0] == dirs:
            return self._cached_parent[1]
        fd = self._walk(dirs, entry, create=True)
        self._drop_parent_cache()
        self._cached_parent = (dirs, fd)
        return fd

    def _walk(self, dirs: tuple[bytes, ...], entry: str, *, create: bool, subject: str = "its parent") -> int:
        """Open the directory `dirs` below the root without following any symlink; caller closes."""
        fd = os.dup(self.root_fd)
        try:
            for depth, part in enumerate(dirs):
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    child = self._synthesize_dir(fd, dirs[: depth + 1])
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    if create and _is_whiteout(st):
                        # `.wh.x` then `x/y`: the layer recreates x, and its own entries win. The
                        # lower x is gone, so the defaults are right (x is not implicit), and the new x
                        # must not show the lower x's contents: it is opaque.
                        os.unlink(part, dir_fd=fd)
                        child = self._synthesize_dir(fd, dirs[: depth + 1], implicit=False)
                        self._mark_opaque(child)
                    else:
                        where = b"/".join(dirs[: depth + 1]).decode("utf-8", "surrogateescape")
                        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                        raise self._hostile(entry, f"{subject} {where!r} is {kind}") from None
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _synthesize_dir(self, parent: int, parts: tuple[bytes, ...], *, implicit: bool = True) -> int:
        """Create a directory the tar does not list (0755, root, fixed mtime); returns its fd."""
        os.mkdir(parts[-1], 0o755, dir_fd=parent)
        fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o755)  # mkdir's mode is filtered by the umask
        self.dir_mtimes.setdefault(parts, SYNTHESIZED_MTIME_NS)
        if implicit:
            self.implicit_dirs.add(parts)
        return fd

    def _drop_parent_cache(self) -> None:
        if self._cached_parent is not None:
            os.close(self._cached_parent[1])
            self._cached_parent = None

    def _replace(self, parent: int, parts: tuple[bytes, ...]) -> None:
        """Remove whatever an earlier entry left at `parts` (the later entry wins)."""
        base = parts[-1]
        try:
            st = os.stat(base, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            # The cached parent fd is `parent` itself, so it stays valid; mtimes recorded for the
            # removed tree no longer apply.
            shutil.rmtree(base, dir_fd=parent)
            n = len(parts)
            for key in [k for k in self.dir_mtimes if k[:n] == parts]:
                del self.dir_mtimes[key]
            self.implicit_dirs -= {k for k in self.implicit_dirs if k[:n] == parts}
        else:
            os.unlink(base, dir_fd=parent)

    # -- entry kinds -----------------------------------------------------------------------------

    def _make_dir(self, parent: int, parts: tuple[bytes, ...], member: tarfile.TarInfo) -> None:
        base = parts[-1]
        replaces_whiteout = False
        try:
            st = os.stat(base, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                replaces_whiteout = _is_whiteout(st)
                os.unlink(base, dir_fd=parent)
                os.mkdir(base, 0o700, dir_fd=parent)
        except FileNotFoundError:
            os.mkdir(base, 0o700, dir_fd=parent)
        fd = os.open(base, _DIR_FLAGS, dir_fd=parent)
        try:
            if replaces_whiteout:  # `.wh.x` then `x/`: a new directory that hides the lower x entirely
                self._mark_opaque(fd)
            self._set_dir_attributes(fd, parts, member)
        finally:
            os.close(fd)

    def _mark_opaque(self, fd: int) -> None:
        os.setxattr(fd, OVERLAY_OPAQUE_XATTR, b"y")
        self.report.opaque_dirs += 1

    def _set_dir_attributes(self, fd: int, parts: tuple[bytes, ...], member: tarfile.TarInfo) -> None:
        # chown clears setuid/setgid bits and security.capability: chown, then chmod, then xattrs.
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode & 0o7777)
        self._set_xattrs(fd, member)
        self.dir_mtimes[parts] = _mtime_ns(member)
        self.implicit_dirs.discard(parts)

    def _make_file(self, parent: int, parts: tuple[bytes, ...], tar: tarfile.TarFile,
                   member: tarfile.TarInfo) -> None:
        self._replace(parent, parts)
        fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=parent)
        try:
            source = tar.extractfile(member)
            assert source is not None  # regular members always have data
            while chunk := source.read(_COPY_CHUNK):
                if len(chunk) == _COPY_CHUNK and chunk == _ZERO_CHUNK:
                    os.lseek(fd, _COPY_CHUNK, os.SEEK_CUR)  # keep sparse files sparse in staging
                else:
                    _write_all(fd, chunk)
            os.ftruncate(fd, member.size)
            self.report.file_bytes += member.size
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, member.mode & 0o7777)
            self._set_xattrs(fd, member)
            mtime = _mtime_ns(member)
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)

    def _make_hardlink(self, parent: int, parts: tuple[bytes, ...], member: tarfile.TarInfo) -> None:
        target = self._components(member.linkname, member.name, "hardlink target")
        if not target:
            raise self._hostile(member.name, "hardlink to the archive root")
        try:
            target_parent = self._walk(target[:-1], member.name, create=False,
                                       subject="the hardlink target's parent")
        except FileNotFoundError:
            raise self._hostile(member.name, f"hardlink target {member.linkname!r} does not exist") from None
        try:
            try:
                st = os.stat(target[-1], dir_fd=target_parent, follow_symlinks=False)
            except FileNotFoundError:
                raise self._hostile(
                    member.name, f"hardlink target {member.linkname!r} does not exist"
                ) from None
            if stat.S_ISDIR(st.st_mode):
                raise self._hostile(member.name, f"hardlink target {member.linkname!r} is a directory")
            if target == parts:
                return  # a link to itself: nothing to do
            self._replace(parent, parts)
            os.link(target[-1], parts[-1], src_dir_fd=target_parent, dst_dir_fd=parent,
                    follow_symlinks=False)
        finally:
            os.close(target_parent)

    def _whiteout(self, parts: tuple[bytes, ...], member: tarfile.TarInfo) -> None:
        base = parts[-1]
        parent = self._parent_fd(parts, member.name)
        if base == OPAQUE_MARKER:
            self._mark_opaque(parent)
            return
        if base.startswith(WHITEOUT_PREFIX * 2):
            self._warn(f"skipped AUFS metadata entry {member.name!r}")
            return
        hidden = base[len(WHITEOUT_PREFIX):]
        if not hidden:
            raise self._hostile(member.name, "whiteout without a name")
        try:
            os.stat(hidden, dir_fd=parent, follow_symlinks=False)
            # Only this layer's entries exist in staging, and the OCI spec keeps an entry the same
            # layer adds visible even when the layer also whites its name out.
            return
        except FileNotFoundError:
            pass
        os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=parent)
        os.chown(hidden, 0, 0, dir_fd=parent, follow_symlinks=False)
        mtime = _mtime_ns(member)
        os.utime(hidden, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)
        self.report.whiteouts += 1

    # -- attributes ------------------------------------------------------------------------------

    def _set_attributes(self, parent: int, base: bytes, member: tarfile.TarInfo, *,
                        is_symlink: bool = False) -> None:
        """Owner, mode, xattrs and mtime of a non-directory we cannot (or must not) open."""
        os.chown(base, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        if not is_symlink:
            # Linux has no lchmod; `base` is the device/FIFO this extractor just made, not a symlink.
            os.chmod(base, member.mode & 0o7777, dir_fd=parent)
        self._set_xattrs(f"/proc/self/fd/{parent}/".encode() + base, member)
        mtime = _mtime_ns(member)
        os.utime(base, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)

    def _set_xattrs(self, target: int | bytes, member: tarfile.TarInfo) -> None:
        for name, value in sorted(_member_xattrs(member, self.layer).items()):
            if name.startswith(OVERLAY_XATTR_PREFIX):
                self._warn(f"dropped xattr {name!r} of {member.name!r}: overlayfs would act on it")
                continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, value)
                else:
                    os.setxattr(target, name, value, follow_symlinks=False)
            except OSError as e:
                if e.errno not in _XATTR_UNSUPPORTED:
                    raise
                self._warn(f"could not set xattr {name!r} on {member.name!r}: {e.strerror}")

    def _apply_dir_mtimes(self) -> None:
        self._drop_parent_cache()
        for parts, mtime in sorted(self.dir_mtimes.items(), key=lambda item: -len(item[0])):
            try:
                fd = self._walk(parts, "<mtimes>", create=False)
            except (FileNotFoundError, LayerFormatError):
                continue  # replaced by a later non-directory entry
            try:
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)

    # -- reporting -------------------------------------------------------------------------------

    def _hostile(self, entry: str, why: str) -> LayerFormatError:
        return LayerFormatError(
            f"layer {self.layer} has an unsafe entry {entry!r}: {why}; refusing to unpack the layer"
        )

    def _warn(self, message: str) -> None:
        log.warning("layer %s: %s", self.layer, message)
        self.report.warnings.append(message)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _fsbytes(name: str) -> bytes:
    """A tar name as the bytes the archive held (tarfile decodes undecodable bytes as surrogates)."""
    return name.encode("utf-8", "surrogateescape")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """The entry's mtime in ns: pax `mtime` keeps sub-second digits that `TarInfo.mtime` (a float) loses."""
    pax = member.pax_headers.get("mtime")
    if pax is not None:
        try:
            return int((Decimal(pax) * 1_000_000_000).to_integral_value(rounding="ROUND_FLOOR"))
        except ArithmeticError:
            pass
    return int(member.mtime) * 1_000_000_000


def _member_xattrs(member: tarfile.TarInfo, layer: str) -> dict[str, bytes]:
    """xattrs from pax records: GNU tar's `SCHILY.xattr.NAME` and libarchive's `LIBARCHIVE.xattr.NAME`."""
    xattrs: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            # tarfile decoded the raw value as utf-8 with surrogateescape; undo that to get the bytes.
            xattrs[key[len("SCHILY.xattr."):]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):], errors="surrogateescape")
            try:
                xattrs.setdefault(name, base64.b64decode(value + "=" * (-len(value) % 4)))
            except ValueError:
                raise LayerFormatError(
                    f"layer {layer} entry {member.name!r} has a malformed LIBARCHIVE.xattr value for {name!r}"
                ) from None
    return xattrs
