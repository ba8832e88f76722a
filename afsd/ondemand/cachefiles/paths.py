"""The fscache backend's state directory: one place that names every file in it.

    DIR/supervisor.sock   control socket (0600): the node daemon's requests and the worker's link
    DIR/supervisor.lock   held by the live supervisor
    DIR/supervisor.log    the supervisor's and its workers' log
    DIR/cache/            the cachefiles cache directory by default (must be on ext4, xfs or btrfs)

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
    backend: ClassVar[str] = "fscache"

    @property
    def default_cache_dir(self) -> Path:
        return self.root / "cache"
