"""`FanotifyBackend`: the fanotify pre-content backend behind the common on-demand interface
(afsd.ondemand.base.Backend), for the node daemon.

attach = `prepare_blob` (sparse file + verified metadata, through the in-process RangeSource; the file data
of the chunks fetched for it is not kept: measured, 90 MiB more written before the mount cost more than the
learned stream it saved, which runs while the container starts) +
register with the supervisor (which marks the blob and serves its misses through fetch workers built
from the source configuration); mount = file-backed erofs (base class); detach = unregister. What the
two supervised backends share (start, status, counters, metrics, completeness): supervised/backend.py.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import tempfile
from pathlib import Path

from afsd import phases
from afsd.ondemand.base import NO_STARTUP_TRACE, BackendOptions, BlobSource, StartupTrace
from afsd.ondemand.fanotify import _sys
from afsd.ondemand.fanotify.client import SupervisorClient, prepare_blob
from afsd.ondemand.fanotify.metrics import StatusCollector
from afsd.ondemand.fanotify.settings import Settings
from afsd.ondemand.spec import BlobSpec
from afsd.ondemand.supervised.backend import SupervisedBackend


class FanotifyBackend(SupervisedBackend):
    name = "fanotify"
    collector = StatusCollector
    gauges = ("supervisor_restarts", "pending_events")
    client: SupervisorClient

    def __init__(self, state_dir: Path, settings: Settings | None = None, *, metrics_listen: str | None = None,
                 prefetch: bool = False) -> None:
        super().__init__(SupervisorClient(state_dir, settings, metrics_listen=metrics_listen))
        self.prefetch = prefetch

    @classmethod
    def create(cls, options: BackendOptions) -> FanotifyBackend:
        settings = Settings(sources=options.sources)
        if options.fetch_workers is not None:
            settings = dataclasses.replace(settings, workers=options.fetch_workers)
        return cls(options.state_dir, settings, prefetch=options.prefetch)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if os.geteuid() != 0:
            return "the fanotify backend needs root (fanotify permission events need CAP_SYS_ADMIN)"
        try:
            group = _sys.new_pre_content_group()
        except OSError as e:
            if e.errno == errno.EPERM:
                return "the fanotify backend needs CAP_SYS_ADMIN"
            return ("this kernel has no fanotify pre-content events (FAN_CLASS_PRE_CONTENT): it needs "
                    "Linux 6.14+ with CONFIG_FANOTIFY_ACCESS_PERMISSIONS")
        try:
            with tempfile.NamedTemporaryFile(dir="/var/tmp", prefix=".afsd-fanotify-probe-") as probe:
                try:
                    _sys.mark_pre_access(group, probe.fileno())
                except OSError as e:
                    if e.errno == errno.EINVAL:
                        return ("this kernel refuses FAN_PRE_ACCESS marks: it needs Linux 6.14+ with "
                                "CONFIG_FANOTIFY_ACCESS_PERMISSIONS")
                    # EOPNOTSUPP: /var/tmp is on a filesystem without marks; the layer cache may differ.
        finally:
            os.close(group)
        return None

    async def attach(self, spec: BlobSpec, blob_path: Path, source: BlobSource,
                     startup: StartupTrace = NO_STARTUP_TRACE) -> None:
        await self._require_supervisor(spec)
        with phases.phase("attach.prepare"):
            await prepare_blob(spec, blob_path, source.source)
        with phases.phase("attach.register"):
            await self.client.register(spec, blob_path, source.config, prefetch=self.prefetch, learned=startup.learned,
                                       record=startup.record)
