"""Stopping a child process the way every lab daemon is stopped: SIGTERM (what a service manager sends,
handled like Ctrl-C), then SIGKILL when it has not exited in time."""

from __future__ import annotations

import subprocess


def terminate(process: subprocess.Popen, timeout: float) -> int:
    """SIGTERM `process` unless it has exited, wait up to `timeout` s, then SIGKILL it; its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
