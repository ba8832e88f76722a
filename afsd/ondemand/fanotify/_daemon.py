"""Process plumbing shared by the supervisor and the keeper: detaching, logging, readiness, locks."""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path


def detach(log_path: Path) -> Callable[[bool], None]:
    """Fork into a new session; the original process exits once the child calls the returned function
    (exit status 0 when told `ready=True`, 1 otherwise or if the child dies first). The child's stdio
    goes to `log_path`, so a launcher that waits for its exit knows the daemon is serving."""
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        status = os.read(read_end, 1)
        os._exit(0 if status == b"1" else 1)
    os.close(read_end)
    os.setsid()
    redirect_stdio(log_path)

    def announce(ready: bool) -> None:
        nonlocal write_end
        if write_end >= 0:
            os.write(write_end, b"1" if ready else b"0")
            os.close(write_end)
            write_end = -1
    return announce


def redirect_stdio(log_path: Path) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)


def setup_logging(role: str, level: str = "INFO") -> logging.Logger:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper(), logging.INFO),
                        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(message)s")
    return logging.getLogger(f"afsd.fanotify.{role}")


def try_lock(path: Path) -> int | None:
    """An exclusive flock held for the caller's lifetime (the kernel drops it when the process dies),
    or None when another live process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def protect_from_oom_killer() -> None:
    """The group's holders must be the last processes the OOM killer picks: if both die, readers of
    unfilled ranges see zeros (docs/fanotify-backend.md)."""
    try:
        Path("/proc/self/oom_score_adj").write_text("-1000")
    except OSError:
        pass


def set_fd_limit(wanted: int) -> int:
    """Set RLIMIT_NOFILE's soft limit to `wanted` (capped by the hard limit) and return it: each pending
    event holds an fd, and the journal needs a bound on fd numbers (see journal.py)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target
