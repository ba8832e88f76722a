"""The fanotify backend's state directory: one place that names every file in it.

    DIR/supervisor.sock   control + worker socket (0600)     DIR/keeper.sock    keeper socket (0600)
    DIR/supervisor.lock   held by the live supervisor        DIR/keeper.lock    held by the live keeper
    DIR/journal           pending-event journal (journal.py) DIR/blobs/*.json   registered blobs
    DIR/supervisor.log, DIR/keeper.log
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from afsd.errors import AfsdError

_SUN_PATH_MAX = 107


class StateDirError(AfsdError):
    """The fanotify backend's state directory cannot be used."""


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def supervisor_socket(self) -> Path:
        return self.root / "supervisor.sock"

    @property
    def keeper_socket(self) -> Path:
        return self.root / "keeper.sock"

    @property
    def supervisor_lock(self) -> Path:
        return self.root / "supervisor.lock"

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
    def supervisor_log(self) -> Path:
        return self.root / "supervisor.log"

    @property
    def keeper_log(self) -> Path:
        return self.root / "keeper.log"

    def blob_record(self, name: str) -> Path:
        return self.blobs / f"{name}.json"

    def ensure(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.blobs.mkdir(mode=0o700, exist_ok=True)
        if len(os.fsencode(self.supervisor_socket)) > _SUN_PATH_MAX:
            raise StateDirError(f"fanotify state directory {self.root} is too long for a unix socket path "
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
