"""Which layers afsd can serve lazily, and the node daemon leases that keep them attached.

containerd's CRI plugin (with `disable_snapshot_annotations = false`) labels each snapshot it prepares
for an image layer with where the layer comes from; containerd's unpacker adds the name the layer's
snapshot is to be committed under (`containerd.io/snapshot.ref`, the layer's chain id):

    containerd.io/snapshot.ref                     the target name (always set by the unpacker)
    containerd.io/snapshot/cri.image-ref           the image reference being pulled
    containerd.io/snapshot/cri.manifest-digest     the (platform) manifest the layer belongs to
    containerd.io/snapshot/cri.layer-digest        the layer's registry digest
    containerd.io/snapshot/cri.image-layers        the image's layers from this one up (a hint)

With the first four, the snapshotter asks the node daemon (`AttachLayer`) to attach the layer's erofs
blob under a lease; `ctr image pull` sets only the first, and such layers take containerd's normal
path (download, then unpack into a plain snapshot).

Lease ids are `<owner>.<random>`, the owner derived from the snapshotter's root directory: several
snapshotters may share a node daemon, and each reconciles only its own leases.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from afsd.api import node_pb2 as pb
from afsd.api import node_pb2_grpc as pb_grpc
from afsd.errors import AfsdError
from afsd.rpc import CHANNEL_OPTIONS, daemon_did_not_answer
from afsd.snapshotter.layout import check_lower_path
from afsd.snapshotter.store import SnapshotArgumentError

TARGET_LABEL = "containerd.io/snapshot.ref"
IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
MANIFEST_DIGEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"
LAYER_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
IMAGE_LAYERS_LABEL = "containerd.io/snapshot/cri.image-layers"
# Ours, on the committed snapshots of lazily served layers (containerd copies it into its own metadata,
# so `ctr snapshots info` shows which layers afsd serves).
LAZY_LAYER_LABEL = "containerd.io/snapshot/afsd.lazy-layer"

ATTACH_TIMEOUT = 30 * 60.0   # a layer nobody holds yet is pulled and converted by a layerstore first
CALL_TIMEOUT = 60.0


class NodeLayerError(AfsdError):
    """The node daemon could not attach or release a layer (or did not answer)."""


@dataclass(frozen=True)
class LayerSource:
    """A layer of an image, as the CRI labels name it."""

    image: str
    layer_digest: str
    manifest_digest: str = ""


def layer_source(labels: Mapping[str, str]) -> LayerSource | None:
    """The layer a Prepare's labels name, or None when they do not name one (not a CRI pull)."""
    image, digest = labels.get(IMAGE_REF_LABEL, ""), labels.get(LAYER_DIGEST_LABEL, "")
    if not image or not digest:
        return None
    return LayerSource(image, digest, labels.get(MANIFEST_DIGEST_LABEL, ""))


def lease_owner(root: Path) -> str:
    return "snapshotter-" + hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]


class NodeLayers:
    """This snapshotter's side of the node daemon's layer leases (AttachLayer, ReleaseLayer, ListLayerLeases)."""

    def __init__(self, socket: Path, owner: str, *, backend: str = "auto") -> None:
        self.socket = socket
        self.owner = owner
        self.backend = backend
        self._channel = grpc.aio.insecure_channel(f"unix:{socket}", options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.NodeStub(self._channel)

    def new_lease_id(self) -> str:
        return f"{self.owner}.{uuid.uuid4().hex}"

    async def attach(self, lease_id: str, source: LayerSource) -> pb.LayerLease:
        request = pb.AttachLayerRequest(lease_id=lease_id, image=source.image, manifest_digest=source.manifest_digest,
                                        layer_digest=source.layer_digest, backend=self.backend)
        response = await self._call("AttachLayer", request, ATTACH_TIMEOUT, f"attach layer {source.layer_digest}")
        lease = response.lease
        try:
            check_lower_path(lease.mountpoint)
        except SnapshotArgumentError as error:
            raise NodeLayerError(f"the node daemon attached {source.layer_digest} where overlayfs cannot use it: "
                                 f"{error}") from None
        return lease

    async def release(self, lease_id: str) -> bool:
        response = await self._call("ReleaseLayer", pb.ReleaseLayerRequest(lease_id=lease_id), CALL_TIMEOUT,
                                    f"release lease {lease_id}")
        return response.released

    async def leases(self, lease_id: str = "") -> list[pb.LayerLease]:
        """This snapshotter's leases (or the one named)."""
        prefix = lease_id or f"{self.owner}."
        response = await self._call("ListLayerLeases", pb.ListLayerLeasesRequest(prefix=prefix), CALL_TIMEOUT,
                                    "list layer leases")
        return [lease for lease in response.leases if not lease_id or lease.lease_id == lease_id]

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: str, request: object, timeout: float, what: str):
        try:
            return await getattr(self._stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            if daemon_did_not_answer(error):
                raise NodeLayerError(f"cannot {what}: the node daemon does not answer on {self.socket} "
                                     f"({error.details()})") from None
            raise NodeLayerError(f"cannot {what}: {error.code().name}: {error.details()}") from None
