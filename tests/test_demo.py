"""`afsd demo`, the README's first command, as a user or a service manager runs it: the run through the
proxy downloads nothing from the registry, SIGTERM stops `--keep` as Ctrl-C does, a demo that fails
says so in one line and leaves nothing behind, and `--tls` runs every daemon and call over mutual TLS."""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from afsd.lab import deadlines
from afsd.node.records import mounted_paths

pytestmark = pytest.mark.slow


def processes_using(path: Path) -> list[str]:
    """Processes whose command line, working directory or open files are under `path`."""
    root, found = str(path), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            links = [os.readlink(entry / "cwd")]
            links += [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        if root in cmdline or any(link.startswith(root) for link in links):
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def mounts_under(path: Path) -> list[str]:
    return [point for point in mounted_paths() if point.startswith(str(path) + "/")]


def afslet_cgroups(workdir: Path) -> list[Path]:
    """The demo afslet's cgroup parent, in every cgroup hierarchy where it (still) exists."""
    name = f"afsd-let-afslet-b-{hashlib.sha256(str((workdir / 'afslet-b').absolute()).encode()).hexdigest()[:8]}"
    hierarchies = [Path("/sys/fs/cgroup"), *Path("/sys/fs/cgroup").iterdir()]
    return [hierarchy / name for hierarchy in hierarchies if (hierarchy / name).is_dir()]


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short path (the node daemon's sockets live under it, and unix socket paths are short)."""
    path = Path(tempfile.mkdtemp(prefix="afsd-demo-test-"))
    yield path / "demo"
    shutil.rmtree(path, ignore_errors=True)


class Lines:
    """A process's output, line by line, readable with a deadline."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(process,), daemon=True).start()

    def _pump(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def until(self, fragment: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(fragment in line for line in self.seen):
            try:
                line = self._queue.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() > deadline:
                raise AssertionError(f"no {fragment!r} in the demo's output:\n" + "\n".join(self.seen))
            self.seen.append(line)

    def rest(self) -> list[str]:
        while (line := self._queue.get(timeout=60)) is not None:
            self.seen.append(line)
        return self.seen


def test_sigterm_stops_afsd_demo_keep_and_leaves_no_process_mount_or_cgroup(workdir: Path) -> None:
    demo = subprocess.Popen([sys.executable, "-m", "afsd", "demo", "--keep", "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = Lines(demo)
    try:
        output.until("everything is running", deadlines.scaled(600))
        assert mounts_under(workdir), "the demo's mounts should be up while it runs"
        # The run through the proxy on node-b: config, manifests and layers all came from the cluster.
        assert any("exit code 0; registry blob downloads: 0" in line for line in output.seen), output.seen
        demo.send_signal(signal.SIGTERM)
        code = demo.wait(timeout=deadlines.scaled(180))
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    lines = output.rest()
    assert code == 0, "\n".join(lines)
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    assert any("everything stopped and unmounted" in line for line in lines)
    assert processes_using(workdir) == []
    assert mounts_under(workdir) == []
    assert afslet_cgroups(workdir) == []


def test_a_demo_that_fails_says_so_in_one_line_and_stops_everything(tmp_path: Path, workdir: Path) -> None:
    """Without runc on PATH the afslet cannot start: the demo names it, shows its log, stops the rest."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        for tool in Path(directory).iterdir() if Path(directory).is_dir() else ():
            if tool.name != "runc" and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    demo = subprocess.run([sys.executable, "-m", "afsd", "demo", "--workdir", str(workdir)], capture_output=True,
                          text=True, timeout=deadlines.scaled(600), env={**os.environ, "PATH": str(bin_dir)})
    assert demo.returncode == 1, demo.stdout + demo.stderr
    assert "Traceback" not in demo.stdout + demo.stderr
    errors = [line for line in demo.stderr.splitlines() if line.startswith("afsd demo: error:")]
    assert len(errors) == 1, demo.stderr
    assert "afslet-b exited with code" in errors[0] and "runc not found" in errors[0], errors[0]
    assert "    | " in demo.stderr   # the afslet's log tail under it
    assert "everything stopped and unmounted" in demo.stdout
    assert processes_using(workdir) == []
    assert mounts_under(workdir) == []


def test_the_demo_runs_every_step_over_mutual_tls() -> None:
    # A short path: the fanotify supervisor's socket lives under the node's state directory.
    workdir = Path(tempfile.mkdtemp(prefix="afsd-demo-", dir="/var/tmp"))
    try:
        _run_demo(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_demo(workdir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "afsd", "demo", "--tls", "--workdir", str(workdir)],
                            capture_output=True, text=True, timeout=deadlines.scaled(900))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "(mutual TLS)" in result.stdout.splitlines()[0]
    assert "exit code 0" in result.stdout
    assert result.stdout.count("held by node-a, node-b") == 2, result.stdout
    assert "everything stopped and unmounted" in result.stdout
    for log in ("discovery", "node-a", "node-b", "node-b-mounts", "afslet-b", "proxy"):
        text = (workdir / f"{log}.log").read_text()
        assert "mutual TLS as" in text and "WITHOUT TLS" not in text, log
    assert [p for p in mounted_paths() if p.startswith(str(workdir))] == []
