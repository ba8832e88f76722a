"""The fanotify backend's state directory: one place that names every file in it.

    DIR/supervisor.sock   control + worker socket (0600)     DIR/keeper.sock    keeper socket (0600)
    DIR/supervisor.lock   held by the live supervisor        DIR/keeper.lock    held by the live keeper
    DIR/journal           pending-event journal (journal.py) DIR/blobs/*.json   registered blobs
    DIR/supervisor.log, DIR/keeper.log

The supervisor's three are common to both supervised backends (afsd/ondemand/supervised/paths.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from afsd.ondemand.supervised.paths import StateDirError, SupervisorPaths

__all__ = ["StateDirError", "StatePaths"]


@dataclass(frozen=True)
class StatePaths(SupervisorPaths):
    backend: ClassVar[str] = "fanotify"

    @property
    def keeper_socket(self) -> Path:
        return self.root / "keeper.sock"

    @property
    def keeper_lock(self) -> Path:
        return self.root / "keeper.lock"

    @property
    def journal(self) -> Path:
        return self.root / "journal"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def keeper_log(self) -> Path:
        return self.root / "keeper.log"

    def blob_record(self, name: str) -> Path:
        return self.blobs / f"{name}.json"

    def daemon_locks(self) -> tuple[Path, ...]:
        return (self.supervisor_lock, self.keeper_lock)

    def ensure(self) -> None:
        super().ensure()
        self.blobs.mkdir(mode=0o700, exist_ok=True)
