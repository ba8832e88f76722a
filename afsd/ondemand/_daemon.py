"""Process plumbing shared by the on-demand backends' daemons (the fanotify supervisor, keeper and fetch
workers; the fscache supervisor and worker): detaching, logging, readiness, locks, limits, and dying
with the parent."""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


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


def detach_if(daemon: bool, log_path: Path) -> Callable[[bool], None]:
    """`detach(log_path)` for a daemon; in the foreground, an announce function that does nothing."""
    return detach(log_path) if daemon else (lambda ready: None)


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
    return logging.getLogger(f"afsd.ondemand.{role}")


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
    """Holders of kernel state readers depend on must be the last processes the OOM killer picks: if the
    fanotify group's holders both die, readers of unfilled ranges see zeros (docs/fanotify-backend.md); if
    the fscache supervisor dies, its mounts lose their cache (docs/cachefiles-backend.md)."""
    try:
        Path("/proc/self/oom_score_adj").write_text("-1000")
    except OSError:
        pass


def set_fd_limit(wanted: int | None = None) -> int:
    """Set RLIMIT_NOFILE's soft limit to `wanted` (capped by the hard limit; None: the hard limit) and
    return it. The fanotify supervisor holds an fd per pending event and its journal needs a bound on fd
    numbers (fanotify/journal.py); the fscache worker holds an anon fd per open blob."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted is None:
        target = hard
    else:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def set_parent_death_signal(signal_number: int) -> None:
    """prctl(PR_SET_PDEATHSIG): the kernel sends `signal_number` to us when our parent dies."""
    if _libc.prctl(_PR_SET_PDEATHSIG, signal_number, 0, 0, 0) < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_PDEATHSIG): {os.strerror(code)}")


def die_with_parent() -> bool:
    """Have the kernel SIGKILL this process when its parent dies (a worker must never outlive the
    supervisor whose kernel state it serves). False when the parent is gone already: exit at once."""
    parent = os.getppid()
    set_parent_death_signal(signal.SIGKILL)
    return os.getppid() == parent
