"""Small durable-file helpers shared by everything that publishes files other processes may read."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from afsd.errors import AfsdError

log = logging.getLogger(__name__)
T = TypeVar("T")


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomically(path: Path, document: Any, *, indent: int | None = None, durable: bool = True) -> None:
    """Write `document` to `path` so readers see the old file or the new one, never a torn one. With
    `durable=False` it is not fsynced: for a record that only has to outlive a process, not the machine
    (what it describes is gone after a reboot anyway), where an fsync would cost a journal commit."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "w") as handle:
            handle.write(json.dumps(document, indent=indent))
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(path.parent)


def load_json_records(directory: Path, parse: Callable[[Any], T], what: str) -> list[T]:
    """Every `*.json` file of `directory` (written with `write_json_atomically`) through `parse`, in name
    order. One that cannot be read or parsed is logged as an unreadable `what` and skipped."""
    found = []
    for path in sorted(directory.glob("*.json")):
        try:
            found.append(parse(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError, AfsdError) as error:
            log.warning("ignoring unreadable %s %s: %s", what, path, error)
    return found
