"""Read the on-disk layout of an uncompressed erofs image: which byte ranges hold file data.

Data flow: `mkfs.build_image` writes an image -> `canonicalize_xattr_order` makes it independent of the
staging file system -> `data_map` tells the lazy fetcher which ranges are regular-file data (fetched on
demand) and, by complement, which bytes are metadata (superblock, inodes, xattrs, directories, symlink
targets, inline tails) that must be present before the image is mounted.

The format (Linux `fs/erofs/erofs_fs.h`): superblock at byte 1024; inodes addressed by nid at
`meta_blkaddr * block_size + nid * 32`, 32-byte compact or 64-byte extended, followed by their inline
xattrs and (for FLAT_INLINE) the tail of their data; directories are blocks of 12-byte dirents followed by
names. Only the uncompressed layouts afsd produces are handled; compressed and chunk-based inodes are
rejected.
"""

from __future__ import annotations

import mmap
import struct
from collections import namedtuple
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from afsd.errors import ConversionError

SUPERBLOCK_OFFSET = 1024
EROFS_MAGIC = 0xE0F5E1E2
FEATURE_COMPAT_SB_CHKSUM = 0x1
NID_SHIFT = 5  # nids count 32-byte slots

# Data layouts (bits 1-3 of i_format).
FLAT_PLAIN = 0
COMPRESSED_FULL = 1
FLAT_INLINE = 2
COMPRESSED_COMPACT = 3
CHUNK_BASED = 4
_LAYOUT_NAMES = {COMPRESSED_FULL: "compressed", COMPRESSED_COMPACT: "compressed (compact)",
                 CHUNK_BASED: "chunk-based"}

# The one table of on-disk structures (little endian), with their field names.
_STRUCTS: dict[str, tuple[str, str]] = {
    "superblock": (
        "<IIIBBHQQIIII16s16sIHHH38s",
        "magic checksum feature_compat blkszbits sb_extslots root_nid inos build_time "
        "build_time_nsec blocks meta_blkaddr xattr_blkaddr uuid volume_name feature_incompat "
        "u1 extra_devices devt_slotoff reserved2",
    ),
    "inode_compact": (
        "<HHHHIIIIHHI",
        "format xattr_icount mode nlink size reserved i_u ino uid gid reserved2",
    ),
    "inode_extended": (
        "<HHHHQIIIIQII16s",
        "format xattr_icount mode reserved size i_u ino uid gid mtime mtime_nsec nlink reserved2",
    ),
    "dirent": ("<QHBB", "nid nameoff file_type reserved"),
    "xattr_ibody_header": ("<IB7s", "name_filter shared_count reserved2"),
    "xattr_entry": ("<BBH", "name_len name_index value_size"),
}


class _Layout:
    def __init__(self, name: str) -> None:
        fmt, fields = _STRUCTS[name]
        self.struct = struct.Struct(fmt)
        self.size = self.struct.size
        self.tuple = namedtuple(name, fields)  # type: ignore[misc]

    def read(self, buf: mmap.mmap | bytes, offset: int):  # noqa: ANN201 - a namedtuple of this layout
        return self.tuple._make(self.struct.unpack_from(buf, offset))


SUPERBLOCK = _Layout("superblock")
INODE_COMPACT = _Layout("inode_compact")
INODE_EXTENDED = _Layout("inode_extended")
DIRENT = _Layout("dirent")
XATTR_IBODY_HEADER = _Layout("xattr_ibody_header")
XATTR_ENTRY = _Layout("xattr_entry")
assert (SUPERBLOCK.size, INODE_COMPACT.size, INODE_EXTENDED.size, DIRENT.size) == (128, 32, 64, 12)

_S_IFMT, _S_IFDIR, _S_IFREG = 0o170000, 0o040000, 0o100000


@dataclass(frozen=True)
class Inode:
    """The parts of an erofs inode that locate its data."""

    nid: int
    offset: int  # byte offset of the inode in the image
    inode_size: int  # 32 or 64
    xattr_size: int
    layout: int
    mode: int
    size: int
    raw_blkaddr: int

    @property
    def is_dir(self) -> bool:
        return self.mode & _S_IFMT == _S_IFDIR

    @property
    def is_regular(self) -> bool:
        return self.mode & _S_IFMT == _S_IFREG

    @property
    def inline_offset(self) -> int:
        """Where a FLAT_INLINE tail starts: right after the inode and its xattrs."""
        return self.offset + self.inode_size + self.xattr_size


@dataclass(frozen=True)
class DataPlacement:
    """Where one inode's data bytes live: whole blocks in the data area, plus an inline tail."""

    blocks: tuple[int, int] | None  # (offset, length) of whole blocks; length is block-aligned
    tail: tuple[int, int] | None  # (offset, length) of the inline tail inside the metadata


class ErofsImage:
    """A read-only (or, for `canonicalize_xattr_order`, writable) view of an erofs image file."""

    def __init__(self, path: Path, *, writable: bool = False) -> None:
        self.path = path
        with open(path, "r+b" if writable else "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
            except ValueError:
                raise self._error("is empty") from None
        if len(self._map) < SUPERBLOCK_OFFSET + SUPERBLOCK.size:
            self.close()
            raise self._error("is too small to hold an erofs superblock")
        self.superblock = SUPERBLOCK.read(self._map, SUPERBLOCK_OFFSET)
        if self.superblock.magic != EROFS_MAGIC:
            self.close()
            raise self._error("has no erofs superblock (bad magic)")
        if self.superblock.extra_devices:
            self.close()
            raise self._error("keeps data on extra devices, which afsd does not produce")
        self.block_size = 1 << self.superblock.blkszbits
        self._meta_base = self.superblock.meta_blkaddr * self.block_size

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> ErofsImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inodes and directories ------------------------------------------------------------------

    def inode(self, nid: int) -> Inode:
        offset = self._meta_base + (nid << NID_SHIFT)
        if offset + INODE_COMPACT.size > len(self._map):
            raise self._error(f"has inode nid {nid} beyond its end")
        i_format = struct.unpack_from("<H", self._map, offset)[0]
        layout = INODE_EXTENDED if i_format & 1 else INODE_COMPACT
        raw = layout.read(self._map, offset)
        xattr_size = 0 if raw.xattr_icount == 0 else XATTR_IBODY_HEADER.size + (raw.xattr_icount - 1) * 4
        data_layout = (i_format >> 1) & 0x7
        if data_layout not in (FLAT_PLAIN, FLAT_INLINE):
            name = _LAYOUT_NAMES.get(data_layout, f"unknown ({data_layout})")
            raise self._error(f"has a {name} inode (nid {nid}); afsd reads only uncompressed images")
        return Inode(nid=nid, offset=offset, inode_size=layout.size, xattr_size=xattr_size,
                     layout=data_layout, mode=raw.mode, size=raw.size, raw_blkaddr=raw.i_u)

    def placement(self, inode: Inode) -> DataPlacement:
        bs = self.block_size
        if inode.layout == FLAT_PLAIN:
            length = -(-inode.size // bs) * bs
            return DataPlacement(blocks=(inode.raw_blkaddr * bs, length) if length else None, tail=None)
        whole = inode.size // bs * bs
        tail = inode.size - whole
        return DataPlacement(
            blocks=(inode.raw_blkaddr * bs, whole) if whole else None,
            tail=(inode.inline_offset, tail) if tail else None,
        )

    def read_data(self, inode: Inode) -> bytes:
        """An inode's data bytes as erofs would return them (file contents, directory blocks, ...)."""
        placement = self.placement(inode)
        parts = []
        if placement.blocks:
            start, length = placement.blocks
            parts.append(self._map[start : start + min(length, inode.size)])
        if placement.tail:
            start, length = placement.tail
            parts.append(self._map[start : start + length])
        data = b"".join(parts)
        if len(data) != inode.size:
            raise self._error(f"has data of inode nid {inode.nid} beyond its end")
        return data

    def entries(self, directory: Inode) -> Iterator[tuple[bytes, int]]:
        """(name, nid) of each entry of a directory, without `.` and `..`."""
        data = self.read_data(directory)
        bs = self.block_size
        for block_start in range(0, len(data), bs):
            block = data[block_start : block_start + bs]
            first = DIRENT.read(block, 0) if len(block) >= DIRENT.size else None
            if first is None or not DIRENT.size <= first.nameoff <= len(block):
                raise self._error(f"has a corrupt directory block in inode nid {directory.nid}")
            count = first.nameoff // DIRENT.size
            dirents = [DIRENT.read(block, i * DIRENT.size) for i in range(count)]
            for i, dirent in enumerate(dirents):
                end = dirents[i + 1].nameoff if i + 1 < count else len(block)
                name = block[dirent.nameoff : end]
                if i + 1 == count:
                    name = name.split(b"\0", 1)[0]  # the last name runs to the block end or a NUL
                if name not in (b".", b".."):
                    yield name, dirent.nid

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        """(path, inode) for every path in the image, the root as b"/" first; hardlinks appear once per path."""
        root = self.inode(self.superblock.root_nid)
        yield b"/", root
        stack = [(b"", root)]
        visited = {root.nid}
        while stack:
            prefix, directory = stack.pop()
            for name, nid in self.entries(directory):
                inode = self.inode(nid)
                path = prefix + b"/" + name
                yield path, inode
                if inode.is_dir:
                    if nid in visited:  # directories cannot be hardlinked: only a corrupt image loops
                        raise self._error(f"has a directory cycle at {path!r}")
                    visited.add(nid)
                    stack.append((path, inode))

    # -- writing ---------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> None:
        self._map[offset : offset + len(data)] = data

    def read(self, offset: int, length: int) -> bytes:
        return self._map[offset : offset + length]

    def _error(self, what: str) -> ConversionError:
        return ConversionError(f"erofs image {self.path} {what}")


def data_map(image: Path) -> list[tuple[int, int]]:
    """Sorted, merged (offset, length) ranges of `image` that hold regular-file data blocks.

    Every byte outside these ranges is metadata a lazy reader must have before mounting. Ranges are
    whole blocks: the zero padding after a file's last byte belongs to the file's range.
    """
    with ErofsImage(image) as img:
        ranges = []
        seen: set[int] = set()
        for _path, inode in img.walk():
            if inode.is_regular and inode.nid not in seen:
                seen.add(inode.nid)
                blocks = img.placement(inode).blocks
                if blocks:
                    ranges.append(blocks)
    return merge_ranges(ranges)


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort (offset, length) ranges and merge overlapping or touching ones."""
    merged: list[list[int]] = []
    for start, length in sorted(ranges):
        if merged and start <= merged[-1][0] + merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], start + length - merged[-1][0])
        else:
            merged.append([start, length])
    return [(start, length) for start, length in merged]


def canonicalize_xattr_order(image: Path) -> None:
    """Sort each inode's xattrs in place, so the image does not depend on the staging file system.

    mkfs.erofs 1.5 stores an inode's xattrs in `listxattr` order, which differs between file systems
    (ext4 lists in insertion order, tmpfs sorted descending); erofs readers scan the list linearly, so
    any order is valid. The superblock checksum covers the first block, so it is recomputed.
    """
    with ErofsImage(image, writable=True) as img:
        seen: set[int] = set()
        changed = False
        for _path, inode in img.walk():
            if inode.xattr_size and inode.nid not in seen:
                seen.add(inode.nid)
                changed |= _sort_inode_xattrs(img, inode)
        if changed and img.superblock.feature_compat & FEATURE_COMPAT_SB_CHKSUM:
            block = bytearray(img.read(SUPERBLOCK_OFFSET, img.block_size - SUPERBLOCK_OFFSET))
            block[4:8] = b"\0\0\0\0"
            img.write(SUPERBLOCK_OFFSET + 4, struct.pack("<I", crc32c(bytes(block))))


def _sort_inode_xattrs(img: ErofsImage, inode: Inode) -> bool:
    start = inode.offset + inode.inode_size
    body = img.read(start, inode.xattr_size)
    header = XATTR_IBODY_HEADER.read(body, 0)
    pos = XATTR_IBODY_HEADER.size
    shared_end = pos + 4 * header.shared_count
    shared = [body[i : i + 4] for i in range(pos, shared_end, 4)]
    entries = []
    pos = shared_end
    while pos + XATTR_ENTRY.size <= len(body):
        entry = XATTR_ENTRY.read(body, pos)
        if entry.name_len == 0:
            raise img._error(f"has a malformed xattr entry in inode nid {inode.nid}")
        length = XATTR_ENTRY.size + entry.name_len + entry.value_size
        length += -length % 4
        raw = body[pos : pos + length]
        if len(raw) < length:
            raise img._error(f"has a malformed xattr entry in inode nid {inode.nid}")
        entries.append(raw)
        pos += length
    shared.sort(key=lambda raw: struct.unpack("<I", raw)[0])
    # Any total order will do; name index first keeps namespaces together.
    entries.sort(key=lambda raw: (raw[1], raw))
    sorted_body = body[:XATTR_IBODY_HEADER.size] + b"".join(shared) + b"".join(entries) + body[pos:]
    if sorted_body == body:
        return False
    img.write(start, sorted_body)
    return True


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """CRC-32C as erofs computes its superblock checksum: seed ~0, no final inversion."""
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc
