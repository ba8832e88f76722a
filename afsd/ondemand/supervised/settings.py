"""A supervisor's settings and its command line, in one place for both supervised backends.

Each backend declares its settings as a frozen dataclass that mixes in `SupervisorSettings` (a field per
setting, a help line per field): the node daemon's client starts the supervisor with `daemon_command`,
the supervisor parses the same flags back (`supervisor_parser`), and hands them on to whoever restarts it
or its workers (`to_arguments`), so no option is spelled twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self

from afsd.ondemand.sources import FILE_SOURCES


class SupervisorSettings:
    """Mixin for a frozen dataclass of a supervisor's settings: one `--flag-name` per field, and back."""

    HELP: ClassVar[dict[str, str]] = {}     # field name -> its flag's help line

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for item in dataclasses.fields(cls):  # type: ignore[arg-type]
            parser.add_argument(_flag(item.name), type=type(item.default), default=item.default,
                                help=cls.HELP[item.name])

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> Self:
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        return cls(**{item.name: getattr(args, item.name) for item in fields})

    def to_arguments(self) -> list[str]:
        arguments = []
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            arguments += [_flag(item.name), str(getattr(self, item.name))]
        return arguments


@dataclass(frozen=True)
class SourceSettings(SupervisorSettings):
    """The settings every supervised backend has: where its workers' sources come from (injected:
    afsd/ondemand/sources.py)."""

    sources: str = FILE_SOURCES
    sources_path: str = ""

    HELP: ClassVar[dict[str, str]] = {
        "sources": "module:callable making the workers' SourceFactory (the node daemon names the cluster's)",
        "sources_path": "a directory the workers import the source factory from first ('' for none)",
    }


def daemon_command(module: str, state_dir: Path, settings: SupervisorSettings, *options: str,
                       metrics_listen: str | None = None, daemon: bool = False) -> list[str]:
    """`python -m MODULE --state-dir DIR [OPTIONS] <settings> [--metrics-listen A] [--daemon]`."""
    command = [sys.executable, "-m", module, "--state-dir", str(state_dir), *options, *settings.to_arguments()]
    if metrics_listen:
        command += ["--metrics-listen", metrics_listen]
    if daemon:
        command.append("--daemon")
    return command


def supervisor_parser(module: str, description: str, settings_type: type[SupervisorSettings], *,
                      daemon_help: str) -> argparse.ArgumentParser:
    """The parser for what `daemon_command` writes; a backend adds its own options (--cache-dir, ...) to it."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--state-dir", required=True, type=Path)
    settings_type.add_arguments(parser)
    parser.add_argument("--metrics-listen", help="HOST:PORT for a Prometheus /metrics endpoint")
    parser.add_argument("--daemon", action="store_true", help=daemon_help)
    return parser


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
