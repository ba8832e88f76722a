"""`afsd demo --tls`: the README's demo flow, every daemon and call over mutual TLS."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from afsd.node.records import mounted_paths

pytestmark = pytest.mark.slow


def test_the_demo_runs_every_step_over_mutual_tls() -> None:
    # A short path: the fanotify supervisor's socket lives under the node's state directory.
    workdir = Path(tempfile.mkdtemp(prefix="afsd-demo-", dir="/var/tmp"))
    try:
        _run_demo(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_demo(workdir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "afsd", "demo", "--tls", "--workdir", str(workdir)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "(mutual TLS)" in result.stdout.splitlines()[0]
    assert "exit code 0" in result.stdout
    assert result.stdout.count("held by node-a, node-b") == 2, result.stdout
    assert "everything stopped and unmounted" in result.stdout
    for log in ("discovery", "node-a", "node-b", "node-b-mounts", "afslet-b", "proxy"):
        text = (workdir / f"{log}.log").read_text()
        assert "mutual TLS as" in text and "WITHOUT TLS" not in text, log
    assert [p for p in mounted_paths() if p.startswith(str(workdir))] == []
