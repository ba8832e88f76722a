"""A supervised backend's state directory: the supervisor's socket, lock and log, named once.

    DIR/supervisor.sock   control socket (0600): the node daemon's requests and the workers' links
    DIR/supervisor.lock   flock held by the live supervisor
    DIR/supervisor.log    the supervisor's and its workers' log

Each backend's `StatePaths` (fanotify/paths.py, cachefiles/paths.py) adds the files only it has.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from afsd.errors import AfsdError

_SUN_PATH_MAX = 107


class StateDirError(AfsdError):
    """An on-demand backend's state directory cannot be used."""


@dataclass(frozen=True)
class SupervisorPaths:
    root: Path
    backend: ClassVar[str] = ""      # names the backend in errors: "fanotify", "fscache"

    @property
    def supervisor_socket(self) -> Path:
        return self.root / "supervisor.sock"

    @property
    def supervisor_lock(self) -> Path:
        return self.root / "supervisor.lock"

    @property
    def supervisor_log(self) -> Path:
        return self.root / "supervisor.log"

    def daemon_locks(self) -> tuple[Path, ...]:
        """The locks this backend's long-lived daemons hold while they live (all free: all stopped)."""
        return (self.supervisor_lock,)

    def ensure(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if len(os.fsencode(self.supervisor_socket)) > _SUN_PATH_MAX:
            raise StateDirError(f"{self.backend} state directory {self.root} is too long for a unix socket path "
                                f"(max {_SUN_PATH_MAX - len('/supervisor.sock')} bytes): choose a shorter one")

    @staticmethod
    def listen(path: Path) -> socket.socket:
        """A listening unix socket at `path` only root can connect to (created 0600, no window)."""
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old_umask)
        sock.listen(64)
        sock.setblocking(False)
        return sock
