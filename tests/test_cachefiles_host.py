"""The cachefiles (fscache) backend on the host kernel, which has no cachefiles on-demand mode: every way
in says so in one clear line. Also the C shim (c_ext/) on its own: message parsing, READ_COMPLETE with
message ids past 2^31, page-aligned writes. The backend's kernel-level tests run in the lab VM
(tests/vm/test_cachefiles_*.py)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from afsd.ondemand.cachefiles import _shim
from afsd.ondemand.cachefiles.backend import FscacheBackend
from afsd.ondemand.cachefiles.client import FscacheBackendError, FscacheClient
from tests.support.cluster import LocalCluster

needs_a_kernel_without_cachefiles = pytest.mark.skipif(
    os.path.exists("/dev/cachefiles"), reason="this kernel has cachefiles; the case needs one without")


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@needs_a_kernel_without_cachefiles
def test_the_backend_says_this_kernel_lacks_on_demand_mode_and_how_to_get_it() -> None:
    reason = FscacheBackend.unavailable_reason()

    assert reason is not None
    assert "/dev/cachefiles does not exist" in reason
    assert "CONFIG_CACHEFILES_ONDEMAND" in reason and "CONFIG_EROFS_FS_ONDEMAND" in reason
    assert "scripts/kernel-setup.sh build" in reason


@needs_a_kernel_without_cachefiles
def test_the_supervisor_refuses_to_start_with_one_line_and_leaves_nothing_running(tmp_path: Path) -> None:
    state = tmp_path / "state"
    started = subprocess.run([sys.executable, "-m", "afsd.ondemand.cachefiles.supervisor", "--state-dir", str(state),
                              "--daemon"], capture_output=True, text=True, timeout=60, check=False)

    assert started.returncode == 1
    line = one_line(started.stderr)
    assert line.startswith("afsd fscache: this kernel has no cachefiles on-demand mode"), line
    assert "scripts/kernel-setup.sh build" in line
    assert not (state / "supervisor.sock").exists()
    with open(state / "supervisor.lock", "rb") as lock:   # nobody holds it: no supervisor lives on
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


async def test_watching_for_completions_never_starts_a_supervisor(tmp_path: Path) -> None:
    """The node daemon watches for as long as it runs: a watch that started a missing supervisor brought
    back one that had just been shut down, holding /dev/cachefiles with nobody left to stop it."""
    state = tmp_path / "state"
    client = FscacheClient(state)

    with pytest.raises(FscacheBackendError, match="the fscache supervisor is not running"):
        async for _ in client.watch():
            pass

    assert not state.exists()   # nothing was launched (a launch makes the state directory first)


@needs_a_kernel_without_cachefiles
async def test_afsd_mount_with_the_fscache_backend_says_why_not(cluster: LocalCluster) -> None:
    await cluster.start_discovery(1)
    node = await cluster.start_node(extra_args=["--backend", "fscache", "--backend", "eager"])
    target = cluster.workdir / "rootfs"
    target.mkdir()

    mounted = await cluster.afsd(node, "mount", "registry.invalid/some/image:1", str(target), "--backend", "fscache")

    assert mounted.returncode != 0
    line = one_line(mounted.stderr)
    assert "backend fscache is not available on this node" in line, line
    assert "/dev/cachefiles does not exist" in line and "kernel-setup.sh" in line
    assert list(target.iterdir()) == []


# -- the C shim ---------------------------------------------------------------------------------------

def open_message(msg_id: int, object_id: int, fd: int, volume: bytes, cookie: bytes) -> bytes:
    volume_key = volume + b"\0"
    body = struct.pack("=IIII", len(volume_key), len(cookie), fd, 0) + volume_key + cookie
    return struct.pack("=IIII", msg_id, _shim.OP_OPEN, 16 + len(body), object_id) + body


def test_the_shim_parses_open_read_and_close_messages_as_the_kernel_lays_them_out() -> None:
    opened = _shim.parse_message(open_message(7, 3, 42, b"erofs,domain", b"f" * 64))
    read = _shim.parse_message(struct.pack("=IIIIQQ", 2**32 - 1, _shim.OP_READ, 32, 3, 1 << 40, 131072))
    closed = _shim.parse_message(struct.pack("=IIII", 9, _shim.OP_CLOSE, 16, 3))

    assert (opened.msg_id, opened.opcode, opened.object_id, opened.anon_fd) == (7, _shim.OP_OPEN, 3, 42)
    assert (opened.volume_key, opened.cookie_key) == (b"erofs,domain", b"f" * 64)
    assert (read.msg_id, read.opcode, read.offset, read.length) == (2**32 - 1, _shim.OP_READ, 1 << 40, 131072)
    assert (closed.opcode, closed.object_id, closed.anon_fd) == (_shim.OP_CLOSE, 3, -1)


def test_the_shim_rejects_truncated_messages() -> None:
    whole = open_message(1, 1, 5, b"erofs,x", b"x")
    for broken in (whole[:12], whole[:20], whole[:-1], struct.pack("=IIII", 1, _shim.OP_READ, 24, 1) + b"\0" * 8):
        with pytest.raises(ValueError, match="malformed cachefiles message"):
            _shim.parse_message(broken)


def test_read_complete_takes_message_ids_past_two_to_the_31() -> None:
    # Python's fcntl.ioctl raises OverflowError for such ids; the shim passes them as unsigned long. On a
    # file that is not an anon fd the kernel answers ENOTTY: the call itself went through.
    with open(os.devnull, "rb") as null, pytest.raises(OSError) as raised:
        _shim.read_complete(null.fileno(), 2**32 - 1)
    assert raised.value.errno == errno.ENOTTY
    assert "4294967295" in str(raised.value)


def test_aligned_writes_pad_the_last_page_and_refuse_unaligned_offsets(tmp_path: Path) -> None:
    data = hashlib.shake_256(b"shim").digest(_shim.WRITE_PIECE + 5000)   # more than one piece, ragged end
    path = tmp_path / "cache-file"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert _shim.pwrite_aligned(fd, data, 8192) == len(data)
        with pytest.raises(OSError) as raised:
            _shim.pwrite_aligned(fd, b"x", 100)
        assert raised.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    written = path.read_bytes()
    padded = -(-len(data) // 4096) * 4096
    assert len(written) == 8192 + padded
    assert written[8192:8192 + len(data)] == data
    assert written[8192 + len(data):] == b"\0" * (padded - len(data))


def test_a_malformed_open_closes_its_anon_fd_and_fails_the_open() -> None:
    """An OPEN whose keys run past its end still came with an anon fd (the kernel installed it in the
    reader's fd table) and a mount waiting for its copen: the shim closes the one and fails the other with
    EBADMSG, instead of leaking the fd and leaving the mount hanging. A socket pair stands in for
    /dev/cachefiles (one read() per message, the copen written back on the same fd)."""
    worker_end, kernel_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    anon_fd = os.open(os.devnull, os.O_RDONLY)
    try:
        whole = open_message(7, 3, anon_fd, b"erofs,x", b"blob")
        malformed = whole[:8] + struct.pack("=I", len(whole) - 2) + whole[12:-2]   # keys say 2 bytes more
        kernel_end.send(malformed)
        with pytest.raises(OSError) as raised:
            _shim.RequestReader(worker_end.fileno()).next()
        assert raised.value.errno == errno.EBADMSG
        with pytest.raises(OSError) as closed:
            os.fstat(anon_fd)
        assert closed.value.errno == errno.EBADF, "the anon fd of the malformed OPEN is still open"
        anon_fd = -1
        kernel_end.settimeout(5)
        assert kernel_end.recv(64) == f"copen 7,-{errno.EBADMSG}".encode()
    finally:
        if anon_fd >= 0:
            os.close(anon_fd)
        worker_end.close()
        kernel_end.close()
