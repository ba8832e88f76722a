"""The runc command line, as afslet uses it: its own state root (so `runc list` shows only afslet's
containers and crash recovery may delete all of them), JSON logs in a file (so runc's own errors are
not mixed into the container's stderr), each runc process in its own process group.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from afsd.afslet.reaper import Subreaper

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True)
class RuncResult:
    returncode: int
    stdout: str
    stderr: str


class Runc:
    def __init__(self, binary: str, root: Path, reaper: Subreaper) -> None:
        self.binary = binary
        self.root = root
        self.reaper = reaper

    def argv(self, *args: str, log_file: Path | None = None) -> list[str]:
        argv = [self.binary, "--root", str(self.root)]
        if log_file is not None:
            argv += ["--log", str(log_file), "--log-format", "json"]
        return [*argv, *args]

    async def call(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> RuncResult:
        process = await self.reaper.spawn(*self.argv(*args), stdin=asyncio.subprocess.DEVNULL,
                                          stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                          start_new_session=True)
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except BaseException:
            kill_group(process.pid)
            await asyncio.shield(process.wait())
            raise
        return RuncResult(process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))

    async def kill(self, container_id: str) -> None:
        result = await self.call("kill", container_id, "KILL")
        if result.returncode != 0 and "not exist" not in result.stderr and "not running" not in result.stderr \
                and "stopped" not in result.stderr:
            log.warning("runc kill %s: %s", container_id, result.stderr.strip())

    async def delete(self, container_id: str) -> bool:
        result = await self.call("delete", "--force", container_id)
        if result.returncode != 0 and "not exist" not in result.stderr:
            log.warning("runc delete %s: %s", container_id, result.stderr.strip())
            return False
        return True

    async def list_ids(self) -> list[str]:
        if not self.root.exists():
            return []
        result = await self.call("list", "--quiet")
        return [line for line in result.stdout.split() if line]


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def runc_error(log_file: Path, fallback: str) -> str:
    """The last error runc logged (its JSON log file), or `fallback`."""
    message = ""
    try:
        for line in log_file.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("level") in ("error", "fatal"):
                message = str(record.get("msg", ""))
    except OSError:
        pass
    return message or fallback.strip() or "runc failed without a message"
