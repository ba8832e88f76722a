"""The fanotify supervisor's settings and its command line, in one place: the client starts it with these
options, and the keeper restarts it with the very same ones (the mechanics: afsd/ondemand/supervised/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from afsd.ondemand.supervised.settings import SourceSettings, daemon_command

SUPERVISOR_MODULE = "afsd.ondemand.fanotify.supervisor"


@dataclass(frozen=True)
class Settings(SourceSettings):
    workers: int = 2
    fetch_deadline: float = 30.0
    worker_timeout: float = 5.0
    heartbeat: float = 0.5
    task_chunks: int = 8
    fill_ahead: int = 4
    stream_window: int = 64
    prefetch_inflight: int = 2
    learned_inflight: int = 4
    orphan_deadline: float = 30.0
    fd_limit: int = 65536
    failure_memory: float = 5.0
    inline_fill: int = 1 << 20
    startup_quiet: float = 1.0

    HELP: ClassVar[dict[str, str]] = {
        **SourceSettings.HELP,
        "workers": "fetch worker processes",
        "fetch_deadline": "seconds a reader may wait for a fill before its read fails with EIO",
        "worker_timeout": "seconds without a heartbeat before a fetch worker is killed and replaced",
        "heartbeat": "seconds between worker heartbeats",
        "task_chunks": "most chunks one fill task covers",
        "fill_ahead": "chunks filled beyond a miss (a sequential reader's window starts there; 0: only what is read)",
        "stream_window": "most chunks filled ahead of a sequential reader (its window doubles with each read)",
        "prefetch_inflight": "background fill tasks in flight per blob",
        "learned_inflight": "fill tasks of a blob's learned prefetch (what readers read first) in flight",
        "orphan_deadline": "seconds the keeper waits for a supervisor to come back before failing events (EIO)",
        "fd_limit": "RLIMIT_NOFILE of the supervisor, and the journal's slot count",
        "failure_memory": "seconds a range whose fill failed or timed out fails further reads at once (a reader's "
                          "retry of the same page would otherwise wait for the whole deadline again)",
        "inline_fill": "bytes a miss may need for the supervisor to fill it itself when the blob's source is a "
                       "file on this machine, without a fetch worker (0: never)",
        "startup_quiet": "seconds without a read of a cold blob (no reader waiting) after which its startup is over "
                         "and its whole-blob background fill starts, when its first reads are not recorded (a "
                         "recording's window decides then); 0: the fill starts at once",
    }


def command_line(state_dir: Path, settings: Settings, *, metrics_listen: str | None = None,
                 daemon: bool = False) -> list[str]:
    return daemon_command(SUPERVISOR_MODULE, state_dir, settings, metrics_listen=metrics_listen, daemon=daemon)
