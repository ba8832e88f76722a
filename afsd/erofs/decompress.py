"""Open a registry layer blob as a stream of tar bytes, hashing them on the way (the OCI diff_id).

Data flow: layer blob file (gzip, zstd or plain tar) -> `open_layer` -> `LayerStream.read` -> the tar
unpacker. Every byte the unpacker reads passes through one sha256, so the diff_id costs no second pass.
Truncated or corrupt input surfaces as `LayerFormatError` naming the layer, never as a raw zlib/EOF error.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard

from afsd.errors import LayerFormatError
from afsd.oci.mediatypes import Compression

_READ_SIZE = 1 << 20


class LayerStream(io.RawIOBase):
    """A read-only stream of a layer's uncompressed tar bytes that computes their sha256."""

    def __init__(self, source: BinaryIO, layer: str, finish_check: _FrameTracker | None = None) -> None:
        super().__init__()
        self._source = source
        self._layer = layer
        self._sha256 = hashlib.sha256()
        self._finish_check = finish_check
        self._at_eof = False
        self.uncompressed_size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._at_eof:
            return b""
        try:
            data = self._source.read(size if size is not None and size >= 0 else _READ_SIZE)
        except EOFError as e:
            raise LayerFormatError(f"layer {self._layer} is truncated: {e}") from None
        except (zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as e:
            raise LayerFormatError(f"layer {self._layer} is corrupt: {e}") from None
        if not data and size != 0:
            self._at_eof = True
            if self._finish_check is not None and not self._finish_check.at_frame_boundary():
                raise LayerFormatError(
                    f"layer {self._layer} is truncated: the zstd stream ends inside a frame"
                )
            return b""
        self._sha256.update(data)
        self.uncompressed_size += len(data)
        return data

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read (and hash) whatever is left, e.g. the zero padding after a tar's end-of-archive marker."""
        while self.read(_READ_SIZE):
            pass

    @property
    def diff_id(self) -> str:
        """`sha256:<hex>` of every uncompressed byte; complete only after `drain()`."""
        if not self._at_eof:
            raise RuntimeError("diff_id asked for before the layer stream was read to the end")
        return "sha256:" + self._sha256.hexdigest()


@contextlib.contextmanager
def open_layer(path: Path, compression: Compression, layer: str, *,
               on_read: Callable[[int], None] | None = None) -> Iterator[LayerStream]:
    """Open the layer blob at `path` for reading as uncompressed tar bytes.

    `layer` (normally its digest) only names the layer in error messages; `on_read` is told how many
    bytes of the blob file have been read so far, as they are (for progress).
    """
    with open(path, "rb") as opened:
        raw: BinaryIO = opened if on_read is None else _Counting(opened, on_read)  # type: ignore[assignment]
        if compression == "gzip":
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield LayerStream(gz, layer)
        elif compression == "zstd":
            tracker = _FrameTracker(raw)
            reader = zstandard.ZstdDecompressor().stream_reader(
                tracker, read_size=_READ_SIZE, read_across_frames=True
            )
            with reader:
                yield LayerStream(reader, layer, finish_check=tracker)
        elif compression == "none":
            yield LayerStream(raw, layer)
        else:
            raise ValueError(f"unknown layer compression {compression!r}")


class _Counting(io.RawIOBase):
    """A file that reports how far it has been read."""

    def __init__(self, file: BinaryIO, on_read: Callable[[int], None]) -> None:
        super().__init__()
        self._file, self._on_read, self._position = file, on_read, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._position += len(data)
        self._on_read(self._position)
        return data

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = self._file.readinto(buffer)  # type: ignore[attr-defined]
        self._position += count or 0
        self._on_read(self._position)
        return count


_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK, _SKIPPABLE_MAGIC = 0xFFFFFFF0, 0x184D2A50


class _FrameTracker(io.RawIOBase):
    """Passes compressed bytes through to the zstd decompressor and follows the frame structure.

    python-zstandard's stream reader returns a clean EOF when its input stops in the middle of a
    frame, so a truncated layer would look complete. Walking frame and block headers (RFC 8878 §3.1)
    costs a few bytes of parsing per 128 KiB block and tells whether the input ended on a frame boundary.
    """

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self._pending = bytearray()  # header bytes collected but not yet parsed
        self._skip = 0  # payload bytes to pass over before the next header
        self._state = "magic"
        self._has_checksum = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size if size >= 0 else _READ_SIZE)
        self._follow(memoryview(data))
        return data

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def at_frame_boundary(self) -> bool:
        return self._state == "magic" and not self._pending and self._skip == 0

    def _follow(self, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            if self._skip:
                step = min(self._skip, len(data) - pos)
                self._skip -= step
                pos += step
                continue
            need = self._header_size()
            take = min(need - len(self._pending), len(data) - pos)
            self._pending += data[pos : pos + take]
            pos += take
            if len(self._pending) == need:
                self._advance(bytes(self._pending))

    def _header_size(self) -> int:
        if self._state == "magic":
            return 4
        if self._state == "frame_header":
            # Needs the descriptor byte first to know the full header size.
            if not self._pending:
                return 1
            fhd = self._pending[0]
            fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
            fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
            return 1 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag] + fcs_size
        if self._state == "skippable_size":
            return 4
        return 3  # block header

    def _advance(self, header: bytes) -> None:
        state = self._state
        if state == "frame_header" and len(header) < self._header_size():
            return  # only the descriptor so far; keep collecting
        self._pending.clear()
        if state == "magic":
            (magic,) = struct.unpack("<I", header)
            if magic == _ZSTD_MAGIC:
                self._state = "frame_header"
            elif magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
                self._state = "skippable_size"
            else:
                self._state = "garbage"  # the decompressor itself reports the bad magic
                self._skip = 1 << 62
        elif state == "skippable_size":
            (self._skip,) = struct.unpack("<I", header)
            self._state = "magic"
        elif state == "frame_header":
            self._has_checksum = bool(header[0] & 0x04)
            self._state = "block"
        else:  # block header
            (value,) = struct.unpack("<I", header + b"\0")
            last, block_type, block_size = value & 1, (value >> 1) & 3, value >> 3
            self._skip = 1 if block_type == 1 else block_size  # RLE blocks carry one byte
            if last:
                self._skip += 4 if self._has_checksum else 0
                self._state = "magic"
