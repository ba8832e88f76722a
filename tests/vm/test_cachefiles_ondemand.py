"""Smoke test of the lab kernel: erofs images mounted in fscache mode, served by a tiny cachefiles daemon.

Runs inside the lab VM (tests/vm/conftest.py sends it there from the host). The protocol code is small and
local to this test on purpose: afsd's own cachefiles backend (afsd/ondemand/, with the cffi shim in c_ext/)
is tested elsewhere. Wire layouts: include/uapi/linux/cachefiles.h, see docs/kernel-protocols.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import random
import select
import stat
import struct
import subprocess
import threading
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]

MSG_HEADER = struct.Struct("=IIII")  # msg_id, opcode, len, object_id
OPEN_BODY = struct.Struct("=IIII")  # volume_key_size, cookie_key_size, fd, flags
READ_BODY = struct.Struct("=QQ")  # off, len
OPCODE_OPEN, OPCODE_CLOSE, OPCODE_READ = 0, 1, 2
CACHEFILES_IOC_READ_COMPLETE = 0x40049801  # _IOW(0x98, 1, int)
PAGE = 4096

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]


def _round_up(value: int) -> int:
    return -(-value // PAGE) * PAGE


def read_complete(anon_fd: int, msg_id: int) -> None:
    # Not fcntl.ioctl: it raises OverflowError for msg_id >= 2**31, and msg ids cycle up to 2**32 - 1.
    if _libc.ioctl(anon_fd, CACHEFILES_IOC_READ_COMPLETE, msg_id) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"CACHEFILES_IOC_READ_COMPLETE for msg {msg_id}: {os.strerror(err)}")


class TinyCachefilesDaemon:
    """Binds an on-demand cache and serves erofs blobs (fsid -> image file) from a thread until stop()."""

    def __init__(self, cache_dir: Path, blobs: dict[str, Path]) -> None:
        self.blobs = blobs
        self.objects: dict[int, tuple[int, Path, int]] = {}  # object_id -> (anon fd, image, size)
        self.opens: list[tuple[bytes, bytes]] = []  # (volume key, cookie key) of each OPEN
        self.reads: list[tuple[int, int]] = []  # (offset, length) of each READ
        self.closed = threading.Event()
        self.error: BaseException | None = None
        self.device = os.open("/dev/cachefiles", os.O_RDWR)
        self._wake_read, self._wake_write = os.pipe()
        try:
            for command in (f"dir {cache_dir}", "tag afsd-vm-smoke", "bind ondemand"):
                os.write(self.device, command.encode())
        except BaseException:
            self._close_fds()
            raise
        self._thread = threading.Thread(target=self._serve, name="cachefiles-daemon", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        os.write(self._wake_write, b"x")
        self._thread.join(timeout=30)
        self._close_fds()
        if self.error is not None:
            raise self.error

    def _close_fds(self) -> None:
        for anon_fd, _, _ in self.objects.values():
            os.close(anon_fd)
        self.objects.clear()
        for fd in (self.device, self._wake_read, self._wake_write):
            os.close(fd)

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self.device, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        try:
            while True:
                if any(fd == self._wake_read for fd, _ in poller.poll()):
                    return
                self._drain()
        except Exception as e:  # noqa: BLE001 - re-raised by stop(), in the test's thread
            self.error = e

    def _drain(self) -> None:
        while message := os.read(self.device, PAGE):  # 0 bytes: no request pending
            msg_id, opcode, length, object_id = MSG_HEADER.unpack_from(message)
            body = message[MSG_HEADER.size : length]
            if opcode == OPCODE_OPEN:
                self._open(msg_id, object_id, body)
            elif opcode == OPCODE_READ:
                self._read(msg_id, object_id, body)
            elif opcode == OPCODE_CLOSE:
                anon_fd, _, _ = self.objects.pop(object_id)
                os.close(anon_fd)
                self.closed.set()

    def _open(self, msg_id: int, object_id: int, body: bytes) -> None:
        volume_key_size, cookie_key_size, anon_fd, _flags = OPEN_BODY.unpack_from(body)
        keys = body[OPEN_BODY.size :]
        volume_key = keys[:volume_key_size].rstrip(b"\0")
        cookie_key = keys[volume_key_size : volume_key_size + cookie_key_size]
        self.opens.append((volume_key, cookie_key))
        image = self.blobs.get(cookie_key.decode())
        if image is None:
            os.close(anon_fd)
            os.write(self.device, f"copen {msg_id},{-errno.ENOENT}".encode())
            return
        size = image.stat().st_size
        self.objects[object_id] = (anon_fd, image, size)
        os.write(self.device, f"copen {msg_id},{size}".encode())

    def _read(self, msg_id: int, object_id: int, body: bytes) -> None:
        offset, length = READ_BODY.unpack_from(body)
        anon_fd, image, size = self.objects[object_id]
        self.reads.append((offset, length))
        # The kernel writes this into the cache file with direct I/O: page-aligned offset, whole pages, and a
        # page-aligned buffer (an anonymous mmap; a bytes object gives EINVAL).
        start = offset - offset % PAGE
        end = min(_round_up(offset + length), _round_up(size))
        try:
            with mmap.mmap(-1, end - start) as buffer, open(image, "rb") as source:
                view = memoryview(buffer)
                try:
                    source.seek(start)
                    source.readinto(view)  # past the end of the image the buffer stays zero
                    written = 0
                    while written < len(view):
                        written += os.pwrite(anon_fd, view[written:], start + written)
                finally:
                    view.release()
        finally:
            read_complete(anon_fd, msg_id)  # always: an unanswered READ blocks the reader forever


def make_tree(root: Path) -> dict[str, bytes]:
    """A small directory tree with a file spanning several readahead windows and an unaligned tail."""
    rng = random.Random(20261124)
    files = {
        "hello.txt": b"hello from the afsd lab VM\n",
        "data/random.bin": rng.randbytes(3 * 1024 * 1024 + 123),
        "data/empty": b"",
        "deep/a/b/c/small": b"x",
    }
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def mount_and_read(daemon_blobs: dict[str, Path], fsid: str, cache_dir: Path, mountpoint: Path):
    """Serve `daemon_blobs`, mount `fsid` in fscache mode, read every file, unmount; return (files, daemon)."""
    daemon = TinyCachefilesDaemon(cache_dir, daemon_blobs)
    try:
        # The mount blocks until the daemon answers the OPEN: it must not run on the daemon's thread.
        subprocess.run(["mount", "-t", "erofs", "none", str(mountpoint), "-o", f"fsid={fsid}"], check=True, timeout=300)
        try:
            files = read_tree(mountpoint)
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True, timeout=300)
        # umount hands the CLOSE to a kernel worker that waits for the daemon to read it.
        assert daemon.closed.wait(timeout=60), "the kernel sent no CLOSE after umount"
    finally:
        daemon.stop()
    return files, daemon


def smoke_layer(directory: Path) -> tuple[dict[str, bytes], Path, Path, Path]:
    """The test tree's files, its erofs image (mkfs.erofs), an empty cache directory and a mount point."""
    tree = directory / "tree"
    files = make_tree(tree)
    image = directory / "layer.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(tree)], check=True)
    cache_dir = directory / "cache"
    cache_dir.mkdir()
    mountpoint = directory / "mnt"
    mountpoint.mkdir()
    return files, image, cache_dir, mountpoint


def test_dev_cachefiles_is_a_character_device() -> None:
    assert stat.S_ISCHR(os.stat("/dev/cachefiles").st_mode)


def test_erofs_fscache_mount_reads_files_served_by_a_cachefiles_daemon(disk_tmp_path: Path) -> None:
    files, image, cache_dir, mountpoint = smoke_layer(disk_tmp_path)

    got, daemon = mount_and_read({"afsd-smoke-layer": image}, "afsd-smoke-layer", cache_dir, mountpoint)

    assert got == files
    assert daemon.opens == [(b"erofs,afsd-smoke-layer", b"afsd-smoke-layer")]
    # Every byte came through the daemon: the cache was empty, so the file data alone needed READs.
    assert sum(length for _, length in daemon.reads) >= len(files["data/random.bin"])


def test_remount_reads_from_the_filled_cache_without_asking_the_daemon(disk_tmp_path: Path) -> None:
    files, image, cache_dir, mountpoint = smoke_layer(disk_tmp_path)
    mount_and_read({"afsd-smoke-layer": image}, "afsd-smoke-layer", cache_dir, mountpoint)

    # A new daemon on the same cache directory: the blob is already cached in full, so only the OPEN comes.
    got, daemon = mount_and_read({"afsd-smoke-layer": image}, "afsd-smoke-layer", cache_dir, mountpoint)

    assert got == files
    assert daemon.opens == [(b"erofs,afsd-smoke-layer", b"afsd-smoke-layer")]
    assert daemon.reads == []


def test_kernel_setup_check_reports_the_lab_kernel_features() -> None:
    checked = subprocess.run(
        [str(CHECKOUT / "scripts" / "kernel-setup.sh"), "check", "--json"], capture_output=True, text=True, check=True
    )
    report = json.loads(checked.stdout)

    assert report["kernel"].endswith("-afsd")
    assert report["cachefiles_ondemand"]["supported"], report["cachefiles_ondemand"]["evidence"]
    assert any(line.startswith("probe: ok") for line in report["cachefiles_ondemand"]["evidence"])
    assert report["erofs_file_backed"]["supported"], report["erofs_file_backed"]["evidence"]
