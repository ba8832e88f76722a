"""The `afsd` command line: one subcommand per module in this package.

Each subcommand module has `register(subparsers)`, which adds its parser and sets `handler` to a
function taking the parsed arguments and returning an exit code (a coroutine function is run with
asyncio). Errors meant for users (`AfsdError`) are printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import sys
from collections.abc import Sequence

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = args.handler(args)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except AfsdError as exc:
        print(f"afsd {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"afsd {args.command}: interrupted", file=sys.stderr)
        return 130
