"""Network namespaces: named ones pinned under /run/netns (the same place and layout as `ip netns`, so
`ip netns exec NAME` works on them), a process's own, and running a function inside one.

Switching namespaces is per thread (setns(2) with CLONE_NEWNET changes only the calling thread), so
`run_in` does it in a short-lived thread of its own: the caller's threads, and the sockets they open,
stay where they are, and nothing is forked (afsd daemons are multi-threaded gRPC processes).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]

T = TypeVar("T")


class NamespaceError(OSError):
    """A namespace could not be created, entered or removed."""


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise NamespaceError(code, f"{what}: {os.strerror(code)}")


@dataclass(frozen=True)
class Namespace:
    """A network namespace, by the path of a file that refers to it."""

    path: Path

    @classmethod
    def named(cls, name: str) -> Namespace:
        return cls(NETNS_DIR / name)

    @classmethod
    def of_process(cls, pid: int) -> Namespace:
        return cls(Path(f"/proc/{pid}/ns/net"))

    @property
    def name(self) -> str:
        return self.path.name if self.path.parent == NETNS_DIR else str(self.path)


def run_in(namespace: Namespace | None, work: Callable[[], T]) -> T:
    """`work()` run with `namespace` as its network namespace (None: right here, in the caller's)."""
    if namespace is None:
        return work()
    outcome: list[object] = []

    def enter_and_work() -> None:
        try:
            fd = os.open(namespace.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _check(_libc.setns(fd, CLONE_NEWNET), f"entering network namespace {namespace.name}")
            finally:
                os.close(fd)
            outcome.append(work())
        except BaseException as error:  # handed to the caller's thread
            outcome.append(error)

    thread = threading.Thread(target=enter_and_work, name=f"netns {namespace.name}")
    thread.start()
    thread.join()
    (result,) = outcome
    if isinstance(result, BaseException):
        raise result
    return result  # type: ignore[return-value]


def _share_netns_dir() -> None:
    """/run/netns as a shared mount point of its own, as iproute2 makes it: a namespace pinned later is
    visible in mount namespaces cloned from this one (e.g. those of `ip netns exec`)."""
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    target = os.fsencode(NETNS_DIR)
    if _libc.mount(b"none", target, None, MS_SHARED | MS_REC, None) == 0:
        return
    _check(_libc.mount(target, target, b"none", MS_BIND | MS_REC, None), f"bind-mounting {NETNS_DIR} on itself")
    _check(_libc.mount(b"none", target, None, MS_SHARED | MS_REC, None), f"making {NETNS_DIR} shared")


def create_namespace(name: str) -> Namespace:
    """A new, empty network namespace pinned at /run/netns/NAME (FileExistsError if the name is taken)."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad network namespace name {name!r}")
    _share_netns_dir()
    namespace = Namespace.named(name)
    os.close(os.open(namespace.path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
    failure: list[BaseException] = []

    def unshare_and_pin() -> None:
        # The thread gets the new namespace and ends; the bind mount is what keeps the namespace alive.
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            _check(_libc.mount(f"/proc/self/task/{threading.get_native_id()}/ns/net".encode(),
                               os.fsencode(namespace.path), b"none", MS_BIND, None),
                   f"pinning network namespace {name}")
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=unshare_and_pin, name=f"netns create {name}")
    thread.start()
    thread.join()
    if failure:
        namespace.path.unlink(missing_ok=True)
        raise failure[0]
    return namespace


def delete_namespace(name: str) -> bool:
    """Unpin /run/netns/NAME; the namespace goes away with the last process in it. False if absent."""
    namespace = Namespace.named(name)
    if not os.path.lexists(namespace.path):
        return False
    if _libc.umount2(os.fsencode(namespace.path), MNT_DETACH) != 0 and ctypes.get_errno() not in (errno.EINVAL,
                                                                                                  errno.ENOENT):
        code = ctypes.get_errno()
        raise NamespaceError(code, f"unpinning network namespace {name}: {os.strerror(code)}")
    namespace.path.unlink(missing_ok=True)
    return True


def list_namespaces(prefix: str = "") -> list[str]:
    """Names of the pinned namespaces that start with `prefix`."""
    try:
        return sorted(name for name in os.listdir(NETNS_DIR) if name.startswith(prefix))
    except FileNotFoundError:
        return []
