"""Craft layer tars in Python for the erofs converter tests: every entry type, xattrs, hostile paths.

`Layer` collects entries and writes them as a tar (PAX format, as GNU tar and Docker write layers),
optionally gzip- or zstd-compressed, returning the blob's digest and diff_id.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

DEFAULT_MTIME = 1_600_000_000


@dataclass
class LayerFile:
    """A written layer blob and the digests a registry/image config would give it."""

    path: Path
    compression: str
    digest: str  # sha256 of the blob bytes
    diff_id: str  # sha256 of the uncompressed tar


@dataclass
class Layer:
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = field(default_factory=list)

    def _add(self, name: str, kind: bytes, *, mode: int, uid: int = 0, gid: int = 0,
             mtime: int | str = DEFAULT_MTIME, data: bytes | None = None, linkname: str = "",
             xattrs: dict[str, bytes] | None = None, pax: dict[str, str] | None = None,
             devmajor: int = 0, devminor: int = 0) -> Layer:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.uname = info.gname = ""
        info.linkname = linkname
        info.devmajor, info.devminor = devmajor, devminor
        info.size = len(data) if data is not None else 0
        headers = dict(pax or {})
        if isinstance(mtime, str):  # a pax mtime with sub-second digits
            headers["mtime"] = mtime
            info.mtime = int(float(mtime))
        else:
            info.mtime = mtime
        for key, value in (xattrs or {}).items():
            # tarfile writes str values; surrogateescape carries arbitrary bytes (hdrcharset=BINARY).
            headers[f"SCHILY.xattr.{key}"] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = headers
        self.entries.append((info, data))
        return self

    def file(self, name: str, data: bytes = b"", *, mode: int = 0o644, **kw: object) -> Layer:
        return self._add(name, tarfile.REGTYPE, mode=mode, data=data, **kw)  # type: ignore[arg-type]

    def dir(self, name: str, *, mode: int = 0o755, **kw: object) -> Layer:
        return self._add(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]

    def symlink(self, name: str, target: str, **kw: object) -> Layer:
        return self._add(name, tarfile.SYMTYPE, mode=0o777, linkname=target, **kw)  # type: ignore[arg-type]

    def hardlink(self, name: str, target: str, **kw: object) -> Layer:
        return self._add(name, tarfile.LNKTYPE, mode=0o644, linkname=target, **kw)  # type: ignore[arg-type]

    def chardev(self, name: str, major: int, minor: int, *, mode: int = 0o666, **kw: object) -> Layer:
        return self._add(name, tarfile.CHRTYPE, mode=mode, devmajor=major, devminor=minor, **kw)  # type: ignore[arg-type]

    def blockdev(self, name: str, major: int, minor: int, *, mode: int = 0o660, **kw: object) -> Layer:
        return self._add(name, tarfile.BLKTYPE, mode=mode, devmajor=major, devminor=minor, **kw)  # type: ignore[arg-type]

    def fifo(self, name: str, *, mode: int = 0o644, **kw: object) -> Layer:
        return self._add(name, tarfile.FIFOTYPE, mode=mode, **kw)  # type: ignore[arg-type]

    def whiteout(self, path: str) -> Layer:
        """An OCI whiteout hiding `path` of the layers below."""
        parent, _, name = path.rpartition("/")
        return self.file(f"{parent}/.wh.{name}" if parent else f".wh.{name}")

    def opaque(self, directory: str) -> Layer:
        """An OCI opaque marker: `directory` hides everything the layers below have in it."""
        return self.file(f"{directory.rstrip('/')}/.wh..wh..opq")

    def libarchive_xattr(self, name: str, target_file: str, key: str, value: bytes) -> Layer:
        """A file whose xattr is recorded the way bsdtar/libarchive writes it (base64, no padding)."""
        encoded = base64.b64encode(value).decode().rstrip("=")
        return self.file(name, target_file.encode(), pax={f"LIBARCHIVE.xattr.{key}": encoded})

    def tar_bytes(self) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for info, data in self.entries:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return out.getvalue()

    def write(self, path: Path, compression: str = "gzip") -> LayerFile:
        return write_blob(path, self.tar_bytes(), compression)


def write_blob(path: Path, tar: bytes, compression: str = "gzip") -> LayerFile:
    """Compress raw tar bytes as a registry would store them, and write them to `path`."""
    if compression == "gzip":
        blob = gzip.compress(tar, mtime=0)
    elif compression == "zstd":
        blob = zstandard.ZstdCompressor().compress(tar)
    elif compression == "none":
        blob = tar
    else:
        raise ValueError(compression)
    path.write_bytes(blob)
    return LayerFile(path=path, compression=compression, digest=_sha256(blob), diff_id=_sha256(tar))


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
