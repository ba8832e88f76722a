"""Layer leases: single layers the node daemon keeps attached for a client that stacks layers itself.

`afsd snapshotter` (containerd's remote snapshotter) does not want whole images mounted: containerd
asks for one layer at a time and stacks them itself. A lease names one layer of one image; while it
exists the layer stays attached (blob file + backend) and mounted read-only at
`<state>/layers/<hex>`, shared with every image mount and every other lease of that layer. The
client chooses the lease id, so asking twice is harmless, and it can find (and drop) leases it forgot
about after a crash by their id prefix.

    <state>/leases/<lease id>.json   one record per lease, written once its layer is mounted and
                                     removed before the layer is released (a crash in between leaves
                                     an unused layer mount, which the daemon's restart unmounts)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afsd.errors import AfsdError
from afsd.fsutil import load_json_records, write_json_atomically
from afsd.ondemand.spec import BlobSpec

_LEASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class LeaseRequestError(AfsdError):
    """A lease request that is malformed or contradicts the lease already recorded under its id."""


def check_lease_id(lease_id: str) -> str:
    """`lease_id` if it is safe as a file name and a log word; LeaseRequestError otherwise."""
    if not _LEASE_ID.fullmatch(lease_id):
        raise LeaseRequestError(f"invalid lease id {lease_id[:64]!r}: use up to 200 of A-Z a-z 0-9 . _ - "
                                "(not starting with . _ or -)")
    return lease_id


@dataclass
class LeaseRecord:
    lease_id: str
    image: str                 # the normalised reference the layer was resolved through
    manifest_digest: str
    layer: BlobSpec
    backend: str               # the backend its layer was attached with
    created_unix: int

    def to_json(self) -> dict[str, Any]:
        return {"lease_id": self.lease_id, "image": self.image, "manifest_digest": self.manifest_digest,
                "layer": self.layer.to_json(), "backend": self.backend, "created_unix": self.created_unix}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LeaseRecord":
        return cls(lease_id=check_lease_id(data["lease_id"]), image=data["image"],
                   manifest_digest=data.get("manifest_digest", ""), layer=BlobSpec.from_json(data["layer"]),
                   backend=data["backend"], created_unix=int(data["created_unix"]))


class LeaseBook:
    """The lease records under `<state>/leases` (blocking file I/O: call from a thread)."""

    def __init__(self, state_root: Path) -> None:
        self.directory = state_root / "leases"

    def create(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def save(self, record: LeaseRecord) -> None:
        write_json_atomically(self.directory / f"{record.lease_id}.json", record.to_json())

    def forget(self, lease_id: str) -> None:
        (self.directory / f"{check_lease_id(lease_id)}.json").unlink(missing_ok=True)

    def records(self) -> list[LeaseRecord]:
        return load_json_records(self.directory, LeaseRecord.from_json, "lease record")
