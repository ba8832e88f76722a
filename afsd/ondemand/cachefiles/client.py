"""The node daemon's side of the fscache backend: start (or find) the supervisor, register blobs, ask
for status.

Data flow: node daemon -> `FscacheClient.register(spec, source config)` -> supervisor (keeps it) ->
`mount_fscache(name, target)` (mount.py, from the node daemon) -> the kernel's OPEN -> the worker looks
the registration up at the supervisor -> copen -> READs served from the source.

The supervisor is a detached daemon (its own session) that outlives the node daemon; starting, stopping
and plain requests are common to both supervised backends (afsd/ondemand/supervised/client.py). Only a
registration starts a missing supervisor, and a failed start says why in the supervisor's own words (it
binds the cache before detaching, so its one-line error is the launcher's stderr).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from afsd.errors import AfsdError
from afsd.ondemand.cachefiles.paths import StatePaths
from afsd.ondemand.cachefiles.settings import Settings, supervisor_command
from afsd.ondemand.spec import BlobSpec
from afsd.ondemand.supervised import protocol as p
from afsd.ondemand.supervised.client import SupervisorClientBase


class FscacheBackendError(AfsdError):
    """The fscache supervisor could not be started, or refused a request."""


class FscacheClient(SupervisorClientBase):
    error = FscacheBackendError
    paths: StatePaths

    def __init__(self, state_dir: Path, *, cache_dir: Path | None = None, settings: Settings | None = None,
                 metrics_listen: str | None = None, start_timeout: float = 120.0) -> None:
        super().__init__(StatePaths(Path(state_dir).absolute()), start_timeout=start_timeout)
        self.cache_dir = Path(cache_dir).absolute() if cache_dir else self.paths.default_cache_dir
        self.settings = settings or Settings()
        self.metrics_listen = metrics_listen

    def _command(self) -> list[str]:
        return supervisor_command(self.paths.root, self.cache_dir, self.settings, metrics_listen=self.metrics_listen)

    def _start_failure(self, stderr: str) -> str:
        lines = [line for line in stderr.splitlines() if line.strip()]
        return lines[-1].removeprefix("afsd fscache: ") if lines else f"see {self.paths.supervisor_log}"

    async def shutdown(self, *, force: bool = False, timeout: float = 60.0) -> None:
        """Stop the supervisor and its worker (refused while erofs mounts in fscache mode exist, unless
        `force`: their uncached reads would fail). Returns once both are gone and the cache is released."""
        await super().shutdown(force=force, timeout=timeout)

    async def restart_worker(self) -> None:
        """Replace the worker (an upgrade): requests in flight are re-delivered to the new one."""
        await self._request(p.RestartWorker())

    async def register(self, spec: BlobSpec, source_config: dict[str, Any], *, prefetch: bool = True,
                       copy_path: Path | None = None, learned: Sequence[tuple[int, int]] = (),
                       record: float = 0.0) -> p.BlobStatus:
        """Serve `spec` (OPENs of cookie key `spec.name`) from `source_config` (see afsd.ondemand.sources).
        Idempotent for the same blob; mount it afterwards. With `copy_path`, the worker also writes every
        verified byte it caches into a plain file there (sparse, the blob's size; its directory must exist),
        and fills the rest from the source once the cache file is whole: a readable copy of the blob.
        Removing that file is the caller's job. `learned` ranges are fetched first, and `record` seconds of
        first reads recorded (protocol.Register)."""
        copy = str(Path(copy_path).absolute()) if copy_path else ""
        reply = await self._request(p.Register(spec=spec, source=source_config, prefetch=prefetch, copy_path=copy,
                                               learned=[[offset, length] for offset, length in learned],
                                               record=record))
        if reply.blob is None:
            raise self.error(f"{self._name} registered blob {spec.name} without saying its status")
        return reply.blob
