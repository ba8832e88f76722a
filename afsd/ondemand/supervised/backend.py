"""`SupervisedBackend`: what the fanotify and fscache backends share as node-daemon backends
(afsd.ondemand.base.Backend): a client of a detached supervisor, started (or found) once, whose status
feeds `counters`, the Prometheus collector and completeness, and whose pushed BlobComplete messages say
when a layer can be handed to the local layerstore.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

from afsd.errors import AfsdError
from afsd.ondemand.base import Backend, BackendUnavailableError
from afsd.ondemand.spec import BlobSpec
from afsd.ondemand.supervised.client import SupervisorClientBase
from afsd.ondemand.supervised.metrics import SupervisorStatusCollector
from afsd.ondemand.supervised.status import SupervisorStatus
from afsd.ondemand.trace import RecordedTrace

log = logging.getLogger(__name__)


class SupervisedBackend(Backend):
    collector: ClassVar[type[SupervisorStatusCollector]]   # this backend's Prometheus view of a status
    gauges: ClassVar[tuple[str, ...]] = ()                 # status details that `counters` shows too
    pushes_completion = True

    def __init__(self, client: SupervisorClientBase) -> None:
        self.client = client
        self._last_status: SupervisorStatus | None = None
        self._stopped = False

    async def start(self) -> None:
        """Start (or find) the supervisor. A failure (e.g. fscache: device busy, unsuitable cache directory) is
        logged, and each later attach that still cannot start it says why, so the node daemon keeps serving
        its other backends."""
        try:
            await self.client.ensure_running()
        except AfsdError as e:
            log.error("the %s backend cannot run: %s", self.name, e)

    async def _require_supervisor(self, spec: BlobSpec) -> None:
        try:
            await self.client.ensure_running()
        except AfsdError as e:
            raise BackendUnavailableError(f"backend {self.name} cannot serve layer {spec.layer_digest}: {e}") from None
        self._stopped = False

    async def detach(self, spec: BlobSpec, blob_path: Path) -> None:
        await self.client.unregister(spec.name, missing_ok=True)

    async def is_complete(self, spec: BlobSpec, blob_path: Path) -> bool:
        """What the supervisor says (complete, and so is the blob's plain file if it has one); the blob file's
        own bytes when the supervisor does not serve the blob."""
        blob = await self.client.blob_status(spec.name)
        if blob is not None:
            return blob.ready
        return await super().is_complete(spec, blob_path)

    async def take_trace(self, spec: BlobSpec, *, close: bool = False, detaching: bool = False) -> RecordedTrace | None:
        return await self.client.trace(spec.name, close=close, detaching=detaching)

    def blob_details(self, spec: BlobSpec) -> dict[str, Any]:
        blob = self._last_status.blob(spec.name) if self._last_status is not None else None
        return dict(blob.details) if blob is not None else {}

    async def refresh(self) -> SupervisorStatus | None:
        """Fetch the supervisor's status (what `counters` and the collector report from then on); None
        once it is stopped (asking never starts it: the next attach does)."""
        try:
            self._last_status = await self.client.status_if_running()
        except AfsdError as e:
            log.warning("no status from the %s supervisor: %s", self.name, e)
        else:
            self._stopped = self._last_status is None
        return self._last_status

    def stopped(self) -> bool:
        return self._stopped

    def counters(self) -> dict[str, float]:
        status = self._last_status
        if status is None:
            return {}
        gauges = {name: float(status.details[name]) for name in self.gauges if name in status.details}
        return {**status.counters, **gauges}

    def source_metrics(self) -> dict[str, float]:
        return dict(self._last_status.fetch) if self._last_status is not None else {}

    def metrics_collector(self) -> SupervisorStatusCollector:
        return self.collector(lambda: self._last_status)

    async def completed_blobs(self) -> AsyncIterator[str]:
        """What the supervisor pushes: a blob is complete (and so is its plain file, if it has one)."""
        async for message in self.client.watch():
            yield message.name
