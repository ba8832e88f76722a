"""What the node daemon remembers about its mounts, on disk, so a restarted daemon can adopt them.

    <state>/mounts/<id>.json   one record per image mount (written before the overlay is mounted,
                               updated after; removed after everything of it is unmounted)
    <state>/mounts/<id>/       its scratch: the fixup tree, the tmpfs upper's mountpoint
    <state>/layers/<hex>/      the shared read-only erofs mount of one layer
    <state>/blobs/<hex>.erofs  the layer's blob file (sparse while it is being filled on demand)
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from afsd.errors import AfsdError
from afsd.fsutil import load_json_records, write_json_atomically
from afsd.ondemand.spec import BlobSpec

# What may name an entry of the state directory: a layer digest's hex, a mount id.
_ENTRY_NAME = re.compile(r"^[0-9a-f]{1,64}$")


class StatePathError(AfsdError):
    """A path the node would derive under its state directory would not stay inside it."""


@dataclass
class MountRecord:
    mount_id: str
    image: str
    image_key: str
    manifest_digest: str
    target: str
    backend: str
    created_unix: int
    layers: list[BlobSpec]                 # bottom first
    upper: str = ""                        # "", "tmpfs" or the directory given
    upper_path: str = ""                   # the overlay upperdir
    work_path: str = ""                    # the overlay workdir
    tmpfs_path: str = ""                   # where the tmpfs upper is mounted, if any
    extra_dir: str = ""
    state: str = "mounting"                # mounting -> mounted
    layer_backends: dict[str, str] = field(default_factory=dict)  # digest -> backend that attached it

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["layers"] = [spec.to_json() for spec in self.layers]
        return document

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "MountRecord":
        data = dict(data)
        data["layers"] = [BlobSpec.from_json(layer) for layer in data["layers"]]
        return cls(**data)


class StateDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounts = root / "mounts"
        self.layers = root / "layers"
        self.blobs = root / "blobs"

    def create(self) -> None:
        for directory in (self.root, self.mounts, self.layers, self.blobs):
            directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def scratch(self, mount_id: str) -> Path:
        return self._inside(self.mounts, mount_id)

    def layer_mountpoint(self, spec: BlobSpec) -> Path:
        return self._inside(self.layers, spec.name)

    def blob_path(self, spec: BlobSpec) -> Path:
        return self._inside(self.blobs, spec.name, ".erofs")

    @staticmethod
    def _inside(directory: Path, name: str, suffix: str = "") -> Path:
        """`directory/name+suffix`, refusing any `name` that is not a plain hex name (so that no
        answer from a peer can make it a path elsewhere: `..`, `/`, an absolute path)."""
        path = directory / f"{name}{suffix}"
        if not _ENTRY_NAME.match(name) or path.parent != directory:
            raise StatePathError(f"refusing the state path {name!r}{suffix}: not a plain name inside {directory}")
        return path

    def save(self, record: MountRecord) -> None:
        write_json_atomically(self.mounts / f"{record.mount_id}.json", record.to_json())

    def forget(self, record: MountRecord) -> None:
        (self.mounts / f"{record.mount_id}.json").unlink(missing_ok=True)

    def records(self) -> list[MountRecord]:
        return load_json_records(self.mounts, self._checked_record, "mount record")

    def _checked_record(self, data: Any) -> MountRecord:
        """A record whose every path stays inside the state directory (StatePathError otherwise)."""
        record = MountRecord.from_json(data)
        for spec in record.layers:
            self.layer_mountpoint(spec)
        self.scratch(record.mount_id)
        return record


def mounted_paths() -> set[str]:
    """Mount points in this mount namespace (from /proc/self/mountinfo, octal escapes decoded)."""
    points = set()
    with open("/proc/self/mountinfo", "rb") as handle:
        for line in handle:
            field_ = line.split(b" ")[4]
            points.add(_unescape(field_).decode("utf-8", "surrogateescape"))
    return points


def _unescape(text: bytes) -> bytes:
    out, i = bytearray(), 0
    while i < len(text):
        if text[i:i + 1] == b"\\" and i + 3 < len(text) and text[i + 1:i + 4].isdigit():
            out.append(int(text[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return bytes(out)
