"""Root filesystems from the node daemon (`afsd node`, API `afsd.node.v1.Node` on its unix socket).

A session's rootfs is an overlay the node daemon mounts: the image's erofs layers, the session's extra
dir above them, and a writable upper in the session's own directory (`<upper_dir>/upper`). The mount
outlives nothing: afslet unmounts it through the daemon when the call ends. The upper is the task's
scratch (tarred to the client from the page cache, then removed), so it is volatile: unmounting does not
sync the node's disk (see afsd.erofs.mount.mount_overlay).
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from afsd.afslet.errors import SetupError
from afsd.api import node_pb2 as pb
from afsd.api import node_pb2_grpc as pb_grpc
from afsd.rpc import daemon_did_not_answer

log = logging.getLogger(__name__)

MOUNT_TIMEOUT = 20 * 60.0
UNMOUNT_TIMEOUT = 120.0


class NodeMounts:
    def __init__(self, socket: Path, backend: str = "auto") -> None:
        self.socket = socket
        self.backend = backend
        self._channel = grpc.aio.insecure_channel(f"unix:{socket}")
        self._stub = pb_grpc.NodeStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    def _explain(self, error: grpc.aio.AioRpcError, what: str) -> str:
        if daemon_did_not_answer(error):
            return (f"{what}: the node daemon does not answer on {self.socket} ({error.details()}); "
                    "start it with `afsd node`")
        return f"{what}: {error.details() or error.code().name}"

    async def mount(self, image: str, platform: str, target: Path, upper_dir: Path | None,
                    extra_dir: Path) -> pb.MountInfo:
        """The image at `target`, with a writable upper in `upper_dir` (None: read-only)."""
        request = pb.MountRequest(image=image, target=str(target), backend=self.backend, platform=platform,
                                  upper_dir=str(upper_dir) if upper_dir is not None else "",
                                  volatile_upper=upper_dir is not None, extra_dir=str(extra_dir))
        try:
            response = await self._stub.Mount(request, timeout=MOUNT_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            raise SetupError(self._explain(error, f"mounting {image}")) from None
        return response.mount

    async def unmount(self, target: Path) -> bool:
        """Unmount `target`; False (logged) when the daemon could not. An unknown target counts as done."""
        try:
            await self._stub.Unmount(pb.UnmountRequest(target=str(target)), timeout=UNMOUNT_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return True
            log.error("%s", self._explain(error, f"unmounting {target}"))
            return False
        return True
