"""The fscache supervisor's settings and its command line, in one place: the client starts the
supervisor with these options and the supervisor hands the worker's share on to every worker it starts."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

_HELP = {
    "tag": "name of the cachefiles cache (one per machine)",
    "read_unit": "bytes a READ miss is widened to (aligned; at least 1 MiB by default, never past the blob's end)",
    "prefetch_inflight": "background fill units in flight per blob",
    "writer_threads": "threads writing into cache files (the C shim releases the GIL)",
    "heartbeat": "seconds between worker status reports",
    "worker_timeout": "seconds without a report before a worker is killed and replaced",
    "restart_backoff": "longest wait before restarting a worker that keeps dying (seconds)",
}


@dataclass(frozen=True)
class Settings:
    tag: str = "afsd"
    read_unit: int = 1 << 20
    prefetch_inflight: int = 2
    writer_threads: int = 4
    heartbeat: float = 0.5
    worker_timeout: float = 20.0
    restart_backoff: float = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for item in dataclasses.fields(Settings):
        parser.add_argument("--" + item.name.replace("_", "-"), type=type(item.default), default=item.default,
                            help=_HELP[item.name])


def from_namespace(args: argparse.Namespace) -> Settings:
    return Settings(**{item.name: getattr(args, item.name) for item in dataclasses.fields(Settings)})


def to_arguments(settings: Settings) -> list[str]:
    arguments = []
    for item in dataclasses.fields(Settings):
        arguments += ["--" + item.name.replace("_", "-"), str(getattr(settings, item.name))]
    return arguments


def supervisor_command(state_dir: Path, cache_dir: Path, settings: Settings, *,
                       metrics_listen: str | None = None, daemon: bool = True) -> list[str]:
    command = [sys.executable, "-m", "afsd.ondemand.cachefiles.supervisor", "--state-dir", str(state_dir),
               "--cache-dir", str(cache_dir), *to_arguments(settings)]
    if metrics_listen:
        command += ["--metrics-listen", metrics_listen]
    if daemon:
        command.append("--daemon")
    return command
