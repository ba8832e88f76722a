"""`afsd run IMAGE [-- COMMAND...]`: run a command in an image through afslet or the proxy.

The same Execute protocol the afs-sdk speaks: a start frame, the files of `--dir` as extra files placed
above the image, a half-close; then the command's output as it happens, its result, and (with
`--save-upper`) the tar.gz of what it wrote. The exit code is the command's.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from afsd.cli._options import add_tls_options, tls_from, token_from
from afsd.errors import AfsdError

FILE_CHUNK = 1 << 20


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="run a command in an image (through afslet or the proxy)",
        description="Run COMMAND (default: the image's entrypoint/cmd) in IMAGE on an afslet, directly or "
                    "through `afsd proxy`, streaming its output. Exits with the command's exit code.")
    parser.add_argument("--target", default="127.0.0.1:62051", metavar="HOST:PORT",
                        help="afslet or proxy gRPC address (default %(default)s)")
    parser.add_argument("--cpu", type=int, default=1, help="CPU cores to reserve (default %(default)s)")
    parser.add_argument("--memory-mb", type=int, default=256, help="memory limit in MB (default %(default)s)")
    parser.add_argument("--timeout-ms", type=int, default=0, help="command timeout; 0: the server's default")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment (repeatable)")
    parser.add_argument("--dir", type=Path, help="upload this directory's contents above the image's root")
    parser.add_argument("--save-upper", type=Path, metavar="FILE", help="save what the command wrote (tar.gz)")
    parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="platform of a multi-platform image")
    parser.add_argument("image", metavar="IMAGE")
    # Not `command`: that is the subcommand's name in the namespace (afsd/cli/__init__.py names errors by it).
    parser.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="command and arguments")
    add_tls_options(parser, client=True)
    parser.set_defaults(handler=run)


def _uploads(root: Path) -> list:
    """Extra-file frames for everything under `root` (dirs, regular files, symlinks), parents first."""
    from afsd.api import afslet_pb2 as pb

    frames = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            path = Path(directory) / name
            info = path.lstat()
            relative = str(path.relative_to(root))
            begin = pb.FileEntryBegin(path=relative, mode=stat.S_IMODE(info.st_mode), uid=info.st_uid,
                                      gid=info.st_gid, mtime_unix=int(info.st_mtime))
            if stat.S_ISDIR(info.st_mode):
                begin.type = pb.FILE_TYPE_DIR
                frames.append((begin, None))
            elif stat.S_ISLNK(info.st_mode):
                begin.type, begin.symlink_target = pb.FILE_TYPE_SYMLINK, os.readlink(path)
                frames.append((begin, None))
            elif stat.S_ISREG(info.st_mode):
                begin.type = pb.FILE_TYPE_FILE
                frames.append((begin, path))
    return frames


async def _requests(start, root: Path | None) -> AsyncIterator:
    import asyncio

    from afsd.api import afslet_pb2 as pb

    yield pb.ExecuteRequest(start=start)
    if root is None:
        return
    for begin, source in await asyncio.to_thread(_uploads, root):
        yield pb.ExecuteRequest(file_begin=begin)
        if source is not None:
            with open(source, "rb") as handle:
                while chunk := await asyncio.to_thread(handle.read, FILE_CHUNK):
                    yield pb.ExecuteRequest(file_chunk=pb.FileChunk(data=chunk))
        yield pb.ExecuteRequest(file_end=pb.FileEntryEnd())


async def run(args: argparse.Namespace) -> int:
    import asyncio

    import grpc

    from afsd.api import afslet_pb2 as pb
    from afsd.api import afslet_pb2_grpc as pb_grpc
    from afsd.oci.platform import parse_platform
    from afsd.cli._calls import call_failure
    from afsd.rpc import open_channel

    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    platform = parse_platform(args.platform) if args.platform else None
    start = pb.StartRequest(image=args.image, command=command, cpu_cores=args.cpu, memory_mb=args.memory_mb,
                            timeout_ms=args.timeout_ms, env=args.env,
                            platform_os=platform.os if platform else "",
                            platform_arch=platform.architecture if platform else "",
                            platform_variant=platform.variant if platform else "")
    if args.dir is not None and not args.dir.is_dir():
        raise AfsdError(f"--dir {args.dir} is not a directory")
    tls = tls_from(args)
    exit_code = 1
    upper = open(args.save_upper, "wb") if args.save_upper else None
    try:
        async with open_channel(args.target, tls, token=token_from(args)) as channel:
            call = pb_grpc.AfsletStub(channel).Execute(_requests(start, args.dir))
            try:
                async for response in call:
                    kind = response.WhichOneof("payload")
                    if kind == "log":
                        source, message = response.log.source, response.log.message
                        if source.endswith("stdout"):
                            print(message, flush=True)
                        elif source.endswith("stderr"):
                            print(message, file=sys.stderr, flush=True)
                    elif kind == "result":
                        exit_code = response.result.exit_code
                        if response.result.error:
                            print(f"afsd run: {response.result.error}", file=sys.stderr)
                    elif kind == "tar_chunk" and upper is not None:
                        await asyncio.to_thread(upper.write, response.tar_chunk.data)
            except grpc.aio.AioRpcError as error:
                raise AfsdError(call_failure(error, args.target, tls)) from None
    finally:
        if upper is not None:
            upper.close()
    return exit_code
