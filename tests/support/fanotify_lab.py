"""Test harness for the fanotify backend (fixtures: tests/support/fanotify.py): a real erofs test blob, a supervisor per test, real mounts,
and readers in subprocesses (a reader blocked in the kernel must never block the test itself).

`FanotifyLab` owns one test's directory (on a filesystem that accepts fanotify marks), starts the
supervisor through the real client, prepares + registers + mounts blobs, and at teardown unmounts,
unregisters, shuts everything down and checks that no process of the test's state dir is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from afsd.erofs.convert import convert_layer
from afsd.erofs.mount import mount_erofs, unmount
from afsd.ondemand.fanotify import _sys
from afsd.ondemand.fanotify.client import SupervisorClient, prepare_blob
from afsd.ondemand.fanotify.settings import Settings
from afsd.ondemand.sources import LocalFileSource
from afsd.ondemand.spec import BlobSpec
from afsd.ondemand.supervised.codec import encode
from afsd.ondemand.supervised.status import SupervisorStatus, WorkerState
from tests.support import fanotify_sources
from tests.support.tars import Layer

MiB = 1 << 20
FILE_COUNT = 24

_READER = r"""
import hashlib, json, sys, time
started = time.monotonic()
try:
    with open(sys.argv[1], "rb") as handle:
        data = handle.read()
except OSError as e:
    print(json.dumps({"ok": False, "errno": e.errno, "seconds": time.monotonic() - started}))
else:
    pages = [data[i:i + 4096] for i in range(0, len(data), 4096)]
    print(json.dumps({"ok": True, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                      "pages": len(pages), "zero_pages": sum(1 for p in pages if not p.strip(b"\0")),
                      "seconds": time.monotonic() - started}))
"""


def markable_temp_root() -> Path:
    """A temp directory on ext4/xfs/btrfs (fanotify pre-content marks are refused on tmpfs/overlayfs)."""
    for candidate in (tempfile.gettempdir(), "/var/tmp"):
        fd = os.open(candidate, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _sys.filesystem_type(fd)[1] in _sys.MARKABLE_FILESYSTEMS.values():
                return Path(candidate)
        finally:
            os.close(fd)
    pytest.fail("neither $TMPDIR nor /var/tmp is on ext4/xfs/btrfs: the fanotify tests need one of them")


@dataclass(frozen=True)
class TestBlob:
    spec: BlobSpec
    full: Path                      # the complete blob, what sources read from
    files: dict[str, str]           # path inside the image -> sha256 of its contents
    sizes: dict[str, int]

    def renamed(self, label: str) -> BlobSpec:
        """The same blob under another layer digest (so one test can register it twice)."""
        digest = "sha256:" + hashlib.sha256(f"{self.spec.layer_digest}/{label}".encode()).hexdigest()
        return dataclasses.replace(self.spec, layer_digest=digest)


def build_test_blob(directory: Path) -> TestBlob:
    """An erofs blob (the real converter) with FILE_COUNT files of 1.2-2.6 MiB of random bytes, so each
    spans chunks of its own, plus a few small entries."""
    rng = random.Random(20261125)
    layer = Layer().dir("./").dir("data").file("etc/hostname", b"lazy\n").symlink("latest", "data/f00")
    files, sizes = {}, {}
    for index in range(FILE_COUNT):
        data = rng.randbytes(int(1.2 * MiB) + rng.randrange(int(1.4 * MiB)))
        name = f"data/f{index:02d}"
        layer.file(name, data)
        files[name] = hashlib.sha256(data).hexdigest()
        sizes[name] = len(data)
    files["etc/hostname"] = hashlib.sha256(b"lazy\n").hexdigest()
    sizes["etc/hostname"] = 5
    layer_file = layer.write(directory / "layer.tar", "none")
    full = directory / "full.erofs"
    info = convert_layer(layer_file.path, "none", layer_file.digest, full)  # type: ignore[arg-type]
    spec = BlobSpec.of_blob(info)
    return TestBlob(spec=spec, full=full, files=files, sizes=sizes)


@dataclass
class ReadResult:
    ok: bool
    sha256: str = ""
    errno: int = 0
    pages: int = 0
    zero_pages: int = 0
    seconds: float = 0.0
    size: int = 0


@dataclass
class ServedBlob:
    spec: BlobSpec
    path: Path
    mount: Path


@dataclass
class FanotifyLab:
    root: Path
    blob: TestBlob
    client: SupervisorClient | None = None
    served: list[ServedBlob] = field(default_factory=list)
    readers: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def markers(self) -> Path:
        path = self.root / "markers"
        path.mkdir(exist_ok=True)
        return path

    async def start(self, settings: Settings, **client_options: Any) -> SupervisorClient:
        """Start the supervisor; its workers' sources are the fault-injecting ones (fanotify_sources.py)."""
        settings = dataclasses.replace(settings, **fanotify_sources.SETTINGS)
        self.client = SupervisorClient(self.state, settings, **client_options)
        await self.client.ensure_running()
        return self.client

    async def serve(self, source: dict[str, Any] | None = None, *, label: str = "", prefetch: bool = False,
                    mount: bool = True, learned: Sequence[tuple[int, int]] = (), record: float = 0.0) -> ServedBlob:
        """Prepare a metadata-only sparse copy of the test blob, register it (`learned`, `record`: as in
        protocol.Register), mount it."""
        assert self.client is not None
        spec = self.blob.renamed(label) if label else self.blob.spec
        path = self.root / f"blob-{label or 'main'}.erofs"
        await prepare_blob(spec, path, LocalFileSource(spec, self.blob.full))
        await self.client.register(spec, path, source or {"kind": "file", "path": str(self.blob.full)},
                                   prefetch=prefetch, learned=learned, record=record)
        target = self.root / f"mnt-{label or 'main'}"
        target.mkdir(exist_ok=True)
        served = ServedBlob(spec, path, target)
        self.served.append(served)
        if mount:
            await asyncio.to_thread(mount_erofs, path, target)
        return served

    def start_reader(self, path: Path) -> subprocess.Popen[str]:
        reader = subprocess.Popen([sys.executable, "-c", _READER, str(path)], stdout=subprocess.PIPE, text=True)
        self.readers.append(reader)
        return reader

    async def finish(self, reader: subprocess.Popen[str], timeout: float = 120.0) -> ReadResult:
        out, _ = await asyncio.to_thread(reader.communicate, timeout=timeout)
        return ReadResult(**json.loads(out))

    async def read(self, path: Path, timeout: float = 120.0) -> ReadResult:
        return await self.finish(self.start_reader(path), timeout)

    async def wait_for_marker(self, seen: set[str], timeout: float = 30.0) -> str:
        """The name of a marker a slow source dropped that is not in `seen` (a fetch has started)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fresh = set(os.listdir(self.markers)) - seen
            if fresh:
                return min(fresh)
            await asyncio.sleep(0.005)
        raise AssertionError("no fetch started")

    async def status(self) -> SupervisorStatus:
        assert self.client is not None
        return await self.client.status()

    async def worker_pids(self) -> list[int]:
        return [w.pid for w in (await self.status()).workers if w.state is not WorkerState.STOPPING]

    async def wait_status(self, predicate: Any, timeout: float = 30.0) -> SupervisorStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = await self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"status never matched: {json.dumps(encode(status))[:2000]}")
            await asyncio.sleep(0.05)

    def processes(self) -> list[tuple[int, str]]:
        """Live (non-zombie) processes whose command line names this test's state directory."""
        found = []
        needle = str(self.state)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if needle in cmdline and state != "Z":
                found.append((int(entry), cmdline.strip()))
        return found

    async def close(self) -> None:
        for reader in self.readers:
            if reader.poll() is None:
                reader.kill()
            reader.communicate()
        for served in self.served:
            with contextlib.suppress(Exception):
                if os.path.ismount(served.mount):
                    await asyncio.to_thread(unmount, served.mount, detach=True)
        if self.client is not None and self.client.paths.supervisor_socket.exists():
            with contextlib.suppress(Exception):
                for served in self.served:
                    with contextlib.suppress(Exception):
                        await self.client.unregister(served.spec.name)
                await self.client.shutdown(timeout=30)
        leftovers = self.processes()
        for pid, _ in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"processes left behind: {leftovers}"


def data_files(blob: TestBlob) -> list[str]:
    return sorted(name for name in blob.files if name.startswith("data/"))
