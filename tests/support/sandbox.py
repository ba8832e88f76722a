"""Probing a container's sandbox from inside: `probe_binary()` builds tests/support/sandbox_probe.c
statically (gcc, once per test session) and `probe_entry()` makes it an extra file for an Execute call;
`parse_probe(lines)` turns its output into {probe: "ok ..." | "errno N ..."}."""

from __future__ import annotations

import subprocess
import tempfile
from functools import cache
from pathlib import Path

from tests.support.afslet import file_entry

SOURCE = Path(__file__).with_name("sandbox_probe.c")


@cache
def probe_binary() -> bytes:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "probe"
        subprocess.run(["gcc", "-static", "-O1", "-o", str(out), str(SOURCE)], check=True, capture_output=True)
        return out.read_bytes()


def probe_entry(path: str = "probe", *, mode: int = 0o755, uid: int = 0, gid: int = 0) -> dict:
    return file_entry(path, probe_binary(), mode=mode, uid=uid, gid=gid)


def parse_probe(lines: list[str]) -> dict[str, str]:
    found = {}
    for line in lines:
        name, sep, rest = line.partition(": ")
        if sep:
            found[name] = rest
    return found
