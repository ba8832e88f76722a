"""The node daemon's side of the fanotify backend: start or re-attach the supervisor, prepare blobs,
register them.

Data flow: node daemon -> `prepare_blob` (blobfile.py: sparse file, metadata prefilled) ->
`SupervisorClient.register` (the supervisor opens the fill fd, marks the blob, serves its misses)
-> `afsd.erofs.mount.mount_erofs(blob_path, target)` -> readers.

The supervisor is a detached daemon (its own session) that outlives the node daemon: a restarted node
daemon makes a new `SupervisorClient` on the same state directory and finds it (or the replacement the
keeper started) still serving. Starting, stopping and plain requests are common to both supervised
backends (afsd/ondemand/supervised/client.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from afsd.errors import AfsdError
from afsd.ondemand.fanotify.blobfile import BlobFileError, prepare_blob
from afsd.ondemand.fanotify.paths import StatePaths
from afsd.ondemand.fanotify.settings import Settings, command_line
from afsd.ondemand.spec import BlobSpec
from afsd.ondemand.supervised import protocol as p
from afsd.ondemand.supervised.client import SupervisorClientBase

__all__ = ["BlobFileError", "FanotifyBackendError", "SupervisorClient", "prepare_blob"]


class FanotifyBackendError(AfsdError):
    """The fanotify supervisor refused a request or cannot be reached."""


class SupervisorClient(SupervisorClientBase):
    error = FanotifyBackendError
    # Requests that, finding no supervisor, wait for the one its keeper may be restarting (only a Register
    # starts one: supervised/client.py).
    waiting_requests: ClassVar[tuple[type[p.Message], ...]] = (p.Register, p.Unregister, p.StatusRequest)
    paths: StatePaths

    def __init__(self, state_dir: Path, settings: Settings | None = None, *, metrics_listen: str | None = None,
                 start_timeout: float = 30.0) -> None:
        super().__init__(StatePaths(Path(state_dir).absolute()), start_timeout=start_timeout)
        self.settings = settings or Settings()
        self.metrics_listen = metrics_listen

    def _command(self) -> list[str]:
        return command_line(self.paths.root, self.settings, metrics_listen=self.metrics_listen, daemon=True)

    async def shutdown(self, *, force: bool = False, timeout: float = 30.0) -> None:
        """Stop the supervisor, its workers and its keeper (refused while incomplete blobs are mounted,
        unless `force`). Returns once all of them are gone."""
        await super().shutdown(force=force, timeout=timeout)

    async def restart(self) -> None:
        """Ask the supervisor to exit so the keeper starts a fresh one (e.g. after an upgrade)."""
        await self._request(p.Restart())

    async def register(self, spec: BlobSpec, blob_path: Path, source_config: dict[str, Any], *,
                       prefetch: bool = False, learned: Sequence[tuple[int, int]] = (),
                       record: float = 0.0) -> p.BlobStatus:
        """Have the supervisor serve `blob_path` (prepared with `prepare_blob`). Returns the blob's status
        (complete when nothing is missing). Idempotent for the same blob and path. `learned` ranges are
        fetched first; `record`: seconds of first reads to record (protocol.Register)."""
        reply = await self._request(p.Register(spec=spec, source=source_config, prefetch=prefetch,
                                               path=os.fspath(Path(blob_path).absolute()),
                                               learned=[[offset, length] for offset, length in learned], record=record))
        if reply.blob is None:
            raise self.error(f"{self._name} registered blob {spec.name} without saying its status")
        return reply.blob
