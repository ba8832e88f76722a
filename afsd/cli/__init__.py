"""The `afsd` command line: one subcommand per module in this package.

Each subcommand module has `register(subparsers)`, which adds its parser and sets `handler` to a
function taking the parsed arguments and returning an exit code (a coroutine function is run with
asyncio). Errors meant for users (`AfsdError`) are printed as one line without a traceback.

Every command treats SIGTERM (a service manager, `kill`) as Ctrl-C: what it started is stopped and cleaned
up the same way (daemons handle both themselves, see afsd/rpc.py). Output into a closed pipe
(`afsd mounts --json | head`) ends the command quietly, as it would any Unix tool.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from afsd import __version__
from afsd.cli import (certs, convert, demo, discovery, executions, layerstore, let, node, proxy, run, sim, snapshotter,
                      trace)
from afsd.errors import AfsdError

_SUBCOMMANDS = (convert, discovery, layerstore, node, snapshotter, let, executions, proxy, run, trace, certs, demo, sim)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="afsd",
        description="Agent File System: cluster-wide container images on erofs, fetched on demand.",
    )
    parser.add_argument("--version", action="version", version=f"afsd {__version__}")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"],
                        help="log verbosity on stderr (default: warning)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _SUBCOMMANDS:
        module.register(subparsers)
    return parser


class _Termination:
    """SIGTERM handled like Ctrl-C: passed to whatever handles SIGINT right now (asyncio's runner cancels
    its main task; plain code gets KeyboardInterrupt), also when SIGINT is ignored (a background job)."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received = True
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)
            return
        raise KeyboardInterrupt


def _quiet_stdout() -> None:
    """The reader of our output went away: drop what is left instead of failing again at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        # Output to a pipe is block-buffered (unless PYTHONUNBUFFERED): a reader that went away shows up
        # at this flush, not in print(); flushing here keeps it from failing again at interpreter exit.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 128 + signal.SIGPIPE


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    termination = _Termination()
    signal.signal(signal.SIGTERM, termination)
    try:
        result = args.handler(args)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except AfsdError as exc:
        print(f"afsd {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"afsd {args.command}: {'terminated' if termination.received else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if termination.received else signal.SIGINT)
