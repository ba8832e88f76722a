"""The fscache backend's state directory: one place that names every file in it.

    DIR/supervisor.sock   control socket (0600): the node daemon's requests and the worker's link
    DIR/supervisor.lock   held by the live supervisor
    DIR/supervisor.log    the supervisor's and its workers' log
    DIR/cache/            the cachefiles cache directory by default (must be on ext4, xfs or btrfs)
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from afsd.errors import AfsdError

_SUN_PATH_MAX = 107


class StateDirError(AfsdError):
    """The fscache backend's state directory cannot be used."""


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def socket(self) -> Path:
        return self.root / "supervisor.sock"

    @property
    def lock(self) -> Path:
        return self.root / "supervisor.lock"

    @property
    def log(self) -> Path:
        return self.root / "supervisor.log"

    @property
    def default_cache_dir(self) -> Path:
        return self.root / "cache"

    def ensure(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if len(os.fsencode(self.socket)) > _SUN_PATH_MAX:
            raise StateDirError(f"fscache state directory {self.root} is too long for a unix socket path "
                                f"(max {_SUN_PATH_MAX - len('/supervisor.sock')} bytes): choose a shorter one")

    def listen(self) -> socket.socket:
        """The control socket, only root can connect (created 0600, no window)."""
        self.socket.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            sock.bind(os.fspath(self.socket))
        finally:
            os.umask(old_umask)
        sock.listen(64)
        sock.setblocking(False)
        return sock
