"""Helpers for the fscache backend's kernel-level tests (tests/vm/test_cachefiles_*.py); no tests here.

`FscacheLab` runs afsd's real fscache supervisor and worker on a state directory on the VM's ext4 scratch
disk, mounts registered blobs with `-o fsid=...`, and on close unmounts everything and stops the
supervisor, so /dev/cachefiles (one opener per machine) is free for the next test. `Reader` reads a file
in a separate process (`python -c`), so a read the kernel keeps waiting can be killed instead of hanging
the test run, and can pause mid-file while the test breaks something.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afsd.erofs.convert import convert_layer
from afsd.ondemand.cachefiles import FscacheClient, Settings, fscache_mounts, mount_fscache
from afsd.ondemand.spec import BlobSpec
from afsd.ondemand.supervised.status import BlobStatus, SupervisorStatus, WorkerStatus
from tests.support.tars import Layer

CHECKOUT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


@dataclass(frozen=True)
class LocalBlob:
    spec: BlobSpec
    path: Path                  # the complete blob: what a "file" source serves
    files: dict[str, str]       # path in the image -> sha256 of its contents

    def source(self) -> dict[str, Any]:
        return {"kind": "file", "path": str(self.path)}


def build_blob(directory: Path, files: dict[str, bytes]) -> LocalBlob:
    """An erofs blob made by afsd's converter from a layer holding `files`."""
    directory.mkdir(parents=True, exist_ok=True)
    layer = Layer().dir("./")
    for name, data in files.items():
        layer.file(name, data)
    layer_file = layer.write(directory / "layer.tar", "none")
    path = directory / "blob.erofs"
    info = convert_layer(layer_file.path, "none", layer_file.digest, path)  # type: ignore[arg-type]
    spec = BlobSpec(layer_digest=info.layer_digest, blob_digest=info.digest, size=info.size,
                    chunk_size=info.chunk_size, chunk_digests=tuple(info.chunk_digests), data_map=tuple(info.data_map))
    return LocalBlob(spec, path, {name: hashlib.sha256(data).hexdigest() for name, data in files.items()})


def spec_for_file(path: Path, name: str, chunk_size: int = MIB) -> BlobSpec:
    """A BlobSpec named `name` for any file (e.g. an image mkfs.erofs made directly)."""
    data = path.read_bytes()
    chunks = tuple(hashlib.sha256(data[at:at + chunk_size]).digest() for at in range(0, len(data), chunk_size))
    return BlobSpec(layer_digest=f"test:{name}", blob_digest="sha256:" + hashlib.sha256(data).hexdigest(),
                    size=len(data), chunk_size=chunk_size, chunk_digests=chunks, data_map=())


def renamed(spec: BlobSpec, label: str) -> BlobSpec:
    """The same blob under another name, so independent tests never share a cache object."""
    return dataclasses.replace(spec, layer_digest=f"test:{label}-{spec.name[:16]}")


def tree_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def gated_source(name: str, path: str, gate: str, open_fetches: int = 0) -> dict[str, Any]:
    """A source config: blob `path`, whose fetches after the first `open_fetches` (per worker) wait until
    the file `gate` exists (tests/vm/test_cachefiles_sources.py)."""
    return {"kind": "gated", "path": path, "gate": gate, "open_fetches": open_fetches}


def lab_settings(settings: Settings | None = None) -> Settings:
    """`settings` with the test source factory (tests/vm/test_cachefiles_sources.py) for the workers."""
    return dataclasses.replace(settings or Settings(), sources="tests.vm.test_cachefiles_sources:TestSources",
                               sources_path=str(CHECKOUT))


def worker_of(status: SupervisorStatus) -> WorkerStatus | None:
    """The supervisor's one kernel worker (None between two workers)."""
    return status.workers[0] if status.workers else None


@dataclass
class FscacheLab:
    root: Path
    client: FscacheClient
    mounts: list[Path] = field(default_factory=list)
    made: int = 0

    @classmethod
    async def start(cls, root: Path, settings: Settings | None = None) -> FscacheLab:
        client = FscacheClient(root / "state", settings=lab_settings(settings))
        await client.ensure_running()
        return cls(root, client)

    async def serve(self, spec: BlobSpec, source: dict[str, Any], *, prefetch: bool = False) -> None:
        await self.client.register(spec, source, prefetch=prefetch)

    async def mount(self, fsid: str, *, domain_id: str = "", devices: tuple[str, ...] = ()) -> Path:
        self.made += 1
        target = self.root / "mnt" / f"{self.made}"
        target.mkdir(parents=True)
        # In a thread: mount(2) waits until the worker has answered the OPEN.
        await asyncio.to_thread(mount_fscache, fsid, target, domain_id=domain_id, devices=devices)
        self.mounts.append(target)
        return target

    async def unmount(self, target: Path) -> None:
        await asyncio.to_thread(subprocess.run, ["umount", str(target)], check=True, timeout=120)
        self.mounts.remove(target)

    async def status(self) -> SupervisorStatus:
        return await self.client.status()

    async def counters(self) -> dict[str, float]:
        return (await self.status()).counters

    async def blob(self, name: str) -> BlobStatus:
        found = await self.client.blob_status(name)
        assert found is not None, f"blob {name} is not registered"
        return found

    async def wait_status(self, predicate: Callable[[SupervisorStatus], bool], what: str,
                          timeout: float = 60.0) -> SupervisorStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = await self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; last status: {status}")
            await asyncio.sleep(0.1)

    def log(self) -> str:
        log = self.client.paths.supervisor_log
        return log.read_text(errors="replace") if log.exists() else ""

    async def close(self) -> None:
        """Unmount what is left, stop the supervisor, and check its log shows no unexpected exception."""
        for target in reversed(list(self.mounts)):
            await asyncio.to_thread(subprocess.run, ["umount", "-l", str(target)], timeout=120)
        self.mounts.clear()
        await self.client.shutdown(force=True)
        assert not any(point.startswith(str(self.root)) for points in fscache_mounts().values() for point in points)
        assert "Traceback" not in self.log(), self.log()


READER = r"""
import hashlib, os, sys
path, pause_at = sys.argv[1], int(sys.argv[2])
digest, done = hashlib.sha256(), 0
try:
    fd = os.open(path, os.O_RDONLY)
    while True:
        if pause_at and done >= pause_at:
            print("paused", flush=True)
            sys.stdin.readline()
            pause_at = 0
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        digest.update(chunk)
        done += len(chunk)
    print("ok", digest.hexdigest(), done, flush=True)
except OSError as error:
    print("error", error.errno, done, flush=True)
"""


@dataclass
class ReadOutcome:
    ok: bool
    sha256: str = ""
    errno: int = 0
    size: int = 0          # bytes read (before the error, if any)


class Reader:
    """`python -c READER FILE` in its own process: the read may block in the kernel; the test never does."""

    def __init__(self, path: Path, *, pause_at: int = 0) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", READER, str(path), str(pause_at)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    async def paused(self, timeout: float = 120.0) -> None:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), timeout)
        assert line.strip() == "paused", line

    def resume(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    async def outcome(self, timeout: float = 180.0) -> ReadOutcome:
        """The read's outcome; a reader still blocked after `timeout` s is killed and the test fails."""
        try:
            out, _ = await asyncio.to_thread(self.process.communicate, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the reader was still blocked after {timeout} s") from None
        words = out.split()[-3:]
        if words[0] == "ok":
            return ReadOutcome(True, sha256=words[1], size=int(words[2]))
        return ReadOutcome(False, errno=int(words[1]), size=int(words[2]))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


async def read_file(path: Path, timeout: float = 180.0) -> ReadOutcome:
    return await Reader(path).outcome(timeout)
