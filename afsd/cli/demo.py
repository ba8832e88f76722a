"""`afsd demo`: run the embedded default: a local registry and the afsd daemons on loopback."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole system on this machine, on loopback",
        description="Start a local OCI registry, push a small image, run discovery and two layerstores, "
                    "pull the image on both (the second copies from the first), mount its rootfs from erofs "
                    "blobs and run a command in it. Needs root (it mounts filesystems).")
    parser.add_argument("--workdir", type=Path, help="keep state and logs here (default: a temporary directory, removed)")
    parser.add_argument("--keep", action="store_true", help="leave everything running until Ctrl-C")
    parser.add_argument("--tls", action="store_true",
                        help="run every daemon and call over mutual TLS, with a throwaway cluster CA")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from afsd.demo import run_demo

    return run_demo(args.workdir, keep=args.keep, tls=args.tls)
