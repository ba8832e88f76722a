"""Layers of lab images, described as Python data and written as layer blobs.

Where it sits: the first step of building a test image. A layer is a list of `Entry`s (from Python
literals, or read from a directory on disk with `entries_from_directory`), grouped in a `LayerSpec`.
`write_layer_blob` writes it as a PAX tar with Python's `tarfile` (xattrs travel as `SCHILY.xattr.*`
records), compressed with gzip, zstd or not at all, into a layout's blob directory; `oci_layout`
assembles the blobs into images. This path shares no code with afsd's own layer reader, so the tests
can use it as the independent side of a comparison.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

import zstandard

from afsd.oci.mediatypes import Compression

EntryKind = Literal["file", "dir", "symlink", "hardlink", "char", "block", "fifo"]

NS_PER_SECOND = 1_000_000_000
DEFAULT_MTIME_NS = 1_700_000_000 * NS_PER_SECOND  # 2023-11-14, a fixed time keeps layers reproducible
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
GZIP_LEVEL = 6
ZSTD_LEVEL = 3

_TAR_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
              "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
              "fifo": tarfile.FIFOTYPE}
_OCI_LAYER_TYPES: dict[Compression, str] = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
_CHUNK = 1 << 20


def sha256_digest(data: bytes) -> str:
    """The OCI digest (`sha256:<hex>`) of `data`."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def relative_path(path: str) -> str:
    """`path` relative to the image root: no leading or trailing slashes, `.` for the root."""
    return str(PurePosixPath("/", path).relative_to("/"))


# ---------------------------------------------------------------------------------------------
# Describing layers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One member of a layer tar.

    `path` is relative to the image root (`etc/passwd`; a leading `/` is ignored). `mode` holds the
    permission and special bits only (0o7777); the file type comes from `kind`. A regular file's
    content is `data`, or the file at `source` when the content is too big to hold in memory.
    `linkname` is a symlink's target, or for a hardlink the path of the earlier member it links to.
    `uname`/`gname` are written into the tar as they are: the numeric ids are what counts.
    """

    path: str
    kind: EntryKind = "file"
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = DEFAULT_MTIME_NS
    data: bytes = b""
    source: Path | None = None
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    uname: str = ""
    gname: str = ""

    @property
    def name(self) -> str:
        """The normalised relative path, without leading or trailing slashes."""
        return relative_path(self.path)

    @property
    def size(self) -> int:
        if self.kind != "file":
            return 0
        return self.source.stat().st_size if self.source is not None else len(self.data)

    def sha256(self) -> str:
        """The hex sha256 of a regular file's content."""
        digest = hashlib.sha256()
        for chunk in _content_chunks(self):
            digest.update(chunk)
        return digest.hexdigest()

    # Constructors for the common kinds; every field can still be set by keyword.
    @classmethod
    def file(cls, path: str, data: bytes = b"", *, mode: int = 0o644, **kw: object) -> Entry:
        return cls(path, "file", mode=mode, data=data, **kw)  # type: ignore[arg-type]

    @classmethod
    def dir(cls, path: str, *, mode: int = 0o755, **kw: object) -> Entry:
        return cls(path, "dir", mode=mode, **kw)  # type: ignore[arg-type]

    @classmethod
    def symlink(cls, path: str, target: str, **kw: object) -> Entry:
        return cls(path, "symlink", mode=0o777, linkname=target, **kw)  # type: ignore[arg-type]

    @classmethod
    def hardlink(cls, path: str, target: str, **kw: object) -> Entry:
        return cls(path, "hardlink", linkname=target, **kw)  # type: ignore[arg-type]

    @classmethod
    def char_device(cls, path: str, major: int, minor: int, *, mode: int = 0o666,
                    **kw: object) -> Entry:
        return cls(path, "char", mode=mode, devmajor=major, devminor=minor, **kw)  # type: ignore[arg-type]

    @classmethod
    def block_device(cls, path: str, major: int, minor: int, *, mode: int = 0o660,
                     **kw: object) -> Entry:
        return cls(path, "block", mode=mode, devmajor=major, devminor=minor, **kw)  # type: ignore[arg-type]

    @classmethod
    def fifo(cls, path: str, *, mode: int = 0o644, **kw: object) -> Entry:
        return cls(path, "fifo", mode=mode, **kw)  # type: ignore[arg-type]

    @classmethod
    def whiteout(cls, path: str) -> Entry:
        """Deletes `path` (file or whole directory) of the layers below."""
        p = PurePosixPath("/", path)
        return cls(str(p.parent / f"{WHITEOUT_PREFIX}{p.name}").lstrip("/"), "file", mode=0o000)

    @classmethod
    def opaque(cls, directory: str) -> Entry:
        """Hides everything the layers below have inside `directory`."""
        return cls(str(PurePosixPath("/", directory) / OPAQUE_MARKER).lstrip("/"), "file", mode=0o000)


@dataclass(frozen=True)
class LayerSpec:
    """The members of one layer, in tar order, and how the layer blob is compressed.

    With `add_parents` (the default, as docker and BuildKit do) a directory entry is written for any
    parent directory the entries do not list themselves, with `Entry.dir` defaults, just before the
    first member inside it. Turn it off to produce layers with implicit parent directories.
    """

    entries: tuple[Entry, ...]
    compression: Compression = "gzip"
    add_parents: bool = True
    created_by: str = ""

    def members(self) -> list[Entry]:
        """The entries as they will be written to the tar.

        A hardlink member carries the metadata of the file it links to, as tar writers record it
        (extractors differ in whether they apply a link member's own mode and owner).
        """
        seen: set[str] = set()
        by_name: dict[str, Entry] = {}
        members: list[Entry] = []
        for entry in self.entries:
            if self.add_parents:
                parents = list(PurePosixPath(entry.name).parents)[:-1]  # drop "."
                for parent in reversed(parents):
                    if str(parent) not in seen:
                        seen.add(str(parent))
                        members.append(Entry.dir(str(parent)))
            if entry.kind == "dir":
                seen.add(entry.name)
            if entry.kind == "hardlink" and (target := by_name.get(relative_path(entry.linkname))) is not None:
                entry = replace(entry, mode=target.mode, uid=target.uid, gid=target.gid,
                                mtime_ns=target.mtime_ns, uname=target.uname, gname=target.gname,
                                xattrs=target.xattrs)
            by_name[entry.name] = entry
            members.append(entry)
        return members


def entry_for_path(root: Path, relative: str) -> Entry:
    """An `Entry` describing `root/relative` as it is on disk (a regular file's content by path)."""
    path = root / relative
    st = os.lstat(path)
    common = {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
              "mtime_ns": st.st_mtime_ns}
    xattrs = {name: os.getxattr(path, name, follow_symlinks=False)
              for name in os.listxattr(path, follow_symlinks=False)}
    if stat.S_ISDIR(st.st_mode):
        return Entry(relative, "dir", xattrs=xattrs, **common)  # type: ignore[arg-type]
    if stat.S_ISREG(st.st_mode):
        return Entry(relative, "file", source=path, xattrs=xattrs, **common)  # type: ignore[arg-type]
    if stat.S_ISLNK(st.st_mode):
        return Entry(relative, "symlink", linkname=os.readlink(path), **common)  # type: ignore[arg-type]
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return Entry(relative, "char" if stat.S_ISCHR(st.st_mode) else "block", xattrs=xattrs,
                     devmajor=os.major(st.st_rdev), devminor=os.minor(st.st_rdev), **common)  # type: ignore[arg-type]
    if stat.S_ISFIFO(st.st_mode):
        return Entry(relative, "fifo", xattrs=xattrs, **common)  # type: ignore[arg-type]
    raise ValueError(f"{path}: sockets and unknown file types cannot go into a layer")


def entries_from_directory(root: Path) -> list[Entry]:
    """Every path under `root` (not `root` itself) as layer entries, parents before children,
    hardlinked files as one file plus hardlink entries, sockets left out (tar cannot hold them)."""
    entries: list[Entry] = []
    first_path: dict[tuple[int, int], str] = {}
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        relative_dir = os.path.relpath(directory, root)
        for name in sorted(dirnames) + sorted(filenames):
            relative = name if relative_dir == "." else f"{relative_dir}/{name}"
            st = os.lstat(root / relative)
            if stat.S_ISSOCK(st.st_mode):
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                first = first_path.setdefault((st.st_dev, st.st_ino), relative)
                if first != relative:
                    entries.append(Entry.hardlink(relative, first))
                    continue
            entries.append(entry_for_path(root, relative))
    return entries


# ---------------------------------------------------------------------------------------------
# Writing a layer as a tar archive and a layer blob
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerBlob:
    digest: str  # of the blob as stored (compressed)
    diff_id: str  # of the uncompressed tar
    size: int
    media_type: str
    compression: Compression


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to `target`."""

    def __init__(self, target: BinaryIO) -> None:
        super().__init__()
        self._target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        self._target.write(view)
        return view.nbytes

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256.hexdigest()}"


def _content_chunks(entry: Entry) -> Iterator[bytes]:
    if entry.source is None:
        for offset in range(0, len(entry.data), _CHUNK):
            yield entry.data[offset:offset + _CHUNK]
        return
    with open(entry.source, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            yield chunk


class _ChunkReader(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            self._pending = next(self._chunks, b"")
            if not self._pending:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _tarinfo(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.name)
    info.type = _TAR_TYPES[entry.kind]
    info.mode = entry.mode & 0o7777
    info.uid, info.gid = entry.uid, entry.gid
    info.uname, info.gname = entry.uname, entry.gname
    seconds, nanoseconds = divmod(entry.mtime_ns, NS_PER_SECOND)
    info.mtime = seconds
    # A hardlink names an earlier member by its archive path, which has no leading slash.
    info.linkname = relative_path(entry.linkname) if entry.kind == "hardlink" else entry.linkname
    info.devmajor, info.devminor = entry.devmajor, entry.devminor
    info.size = entry.size
    pax: dict[str, str] = {}
    if nanoseconds:
        # tarfile would format a float with too few digits; an explicit record keeps every ns.
        pax["mtime"] = f"{seconds}.{nanoseconds:09d}"
    for name, value in entry.xattrs.items():
        # tarfile encodes a value that is not valid UTF-8 back to its raw bytes (hdrcharset=BINARY).
        pax[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
    info.pax_headers = pax
    return info


def write_layer_tar(members: Iterable[Entry], out: BinaryIO) -> None:
    """Write `members` as a PAX tar archive to `out` (an uncompressed stream)."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for entry in members:
            info = _tarinfo(entry)
            if entry.kind == "file":
                archive.addfile(info, io.BufferedReader(_ChunkReader(_content_chunks(entry)), _CHUNK))
            else:
                archive.addfile(info)


def write_layer_blob(blobs_dir: Path, layer: LayerSpec) -> LayerBlob:
    """Write one layer into `blobs_dir` (a layout's `blobs/sha256`), compressed as the spec says."""
    blobs_dir.mkdir(parents=True, exist_ok=True)
    fd, partial_name = tempfile.mkstemp(dir=blobs_dir, prefix=".layer-", suffix=".partial")
    partial = Path(partial_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            blob = _HashingWriter(raw)
            if layer.compression == "gzip":
                # mtime=0 and no file name: the same entries always give the same blob digest.
                compressor: BinaryIO = gzip.GzipFile(filename="", fileobj=blob, mode="wb",  # type: ignore[assignment]
                                                     compresslevel=GZIP_LEVEL, mtime=0)
            elif layer.compression == "zstd":
                compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(  # type: ignore[assignment]
                    blob, closefd=False)
            else:
                compressor = blob  # type: ignore[assignment]
            tar = _HashingWriter(compressor)
            write_layer_tar(layer.members(), tar)  # type: ignore[arg-type]
            if compressor is not blob:
                compressor.close()
        final = blobs_dir / blob.digest.split(":", 1)[1]
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return LayerBlob(digest=blob.digest, diff_id=tar.digest, size=blob.size,
                     media_type=_OCI_LAYER_TYPES[layer.compression],
                     compression=layer.compression)
