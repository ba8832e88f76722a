"""The fscache supervisor's settings and its command line, in one place: the client starts the
supervisor with these options and the supervisor hands the worker's share on to every worker it starts
(the mechanics: afsd/ondemand/supervised/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from afsd.ondemand.supervised.settings import SourceSettings, daemon_command

SUPERVISOR_MODULE = "afsd.ondemand.cachefiles.supervisor"


@dataclass(frozen=True)
class Settings(SourceSettings):
    tag: str = "afsd"
    read_unit: int = 1 << 20
    stream_window: int = 16
    ahead_inflight: int = 2
    prefetch_inflight: int = 2
    learned_inflight: int = 4
    writer_threads: int = 4
    heartbeat: float = 0.5
    worker_timeout: float = 20.0
    restart_backoff: float = 5.0

    HELP: ClassVar[dict[str, str]] = {
        **SourceSettings.HELP,
        "tag": "name of the cachefiles cache (one per machine)",
        "read_unit": "bytes a READ miss is widened to (aligned; at least 1 MiB by default, never past the blob's end)",
        "stream_window": "most read units filled ahead of a sequential reader (its window doubles with each READ "
                         "it makes; 0: no read-ahead)",
        "ahead_inflight": "fills ahead of sequential readers in flight per blob (each up to 4 read units)",
        "prefetch_inflight": "background fill units in flight per blob",
        "learned_inflight": "units of a blob's learned prefetch (what readers read first) in flight",
        "writer_threads": "threads writing into cache files (the C shim releases the GIL)",
        "heartbeat": "seconds between worker status reports",
        "worker_timeout": "seconds without a report before a worker is killed and replaced",
        "restart_backoff": "longest wait before restarting a worker that keeps dying (seconds)",
    }


def supervisor_command(state_dir: Path, cache_dir: Path, settings: Settings, *,
                       metrics_listen: str | None = None, daemon: bool = True) -> list[str]:
    return daemon_command(SUPERVISOR_MODULE, state_dir, settings, "--cache-dir", str(cache_dir),
                               metrics_listen=metrics_listen, daemon=daemon)
