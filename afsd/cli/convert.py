"""`afsd convert IMAGE OUTDIR`: pull an image and write one erofs blob per layer plus image.json."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from afsd.cli._options import add_platform_option, add_registry_options, platform_from, registry_config

if TYPE_CHECKING:
    from afsd.erofs.convert import BlobInfo
    from afsd.oci.manifest import Descriptor


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="pull an image and convert its layers to erofs blobs",
        description="Pull IMAGE from its registry, verify every blob, convert each layer to an erofs "
                    "blob in OUTDIR and describe the image in OUTDIR/image.json.")
    parser.add_argument("image", metavar="IMAGE", help="image reference, e.g. alpine:3.20 or host:5000/repo@sha256:...")
    parser.add_argument("outdir", metavar="OUTDIR", type=Path, help="directory for the blobs (created if missing)")
    add_platform_option(parser)
    add_registry_options(parser)
    parser.add_argument("--json", action="store_true", help="print the image description as JSON")
    parser.set_defaults(handler=run)


class _ConvertDisplay:
    """`afsd convert`'s progress on stderr: a bar per layer on a terminal, plain lines otherwise."""

    def __init__(self) -> None:
        from afsd.cli._progress import ProgressBoard

        self.board = ProgressBoard(sys.stderr)

    def update(self, descriptor: "Descriptor", stage: str, done: int, total: int) -> None:
        self.board.update(descriptor.digest[:19], stage, done, total)

    def finished(self, descriptor: "Descriptor", blob: "BlobInfo", cached: bool) -> None:
        if cached:
            line = f"cached     {blob.size / 1e6:8.1f} MB erofs"
        else:
            line = f"converted  {descriptor.size / 1e6:8.1f} MB -> {blob.size / 1e6:8.1f} MB erofs"
        self.board.finish(descriptor.digest[:19], line)


async def run(args: argparse.Namespace) -> int:
    from afsd.convert_image import IMAGE_DESCRIPTION, pull_and_convert
    from afsd.oci.client import RegistryClient
    from afsd.oci.reference import parse_reference

    reference = parse_reference(args.image)
    platform = platform_from(args)
    started = time.monotonic()
    display = None if args.json else _ConvertDisplay()
    try:
        async with RegistryClient(registry_config(args)) as client:
            image = await pull_and_convert(reference, platform, args.outdir, client=client, progress=display)
    finally:
        if display is not None:
            display.board.close()
    if args.json:
        json.dump(image.to_json(), sys.stdout, indent=2)
        print()
        return 0
    total = sum(layer.blob.size for layer in image.layers)
    print(f"{image.image.reference}  {image.image.platform}  {image.image.manifest_digest}")
    print(f"{'LAYER':<20} {'BLOB':<20} {'SIZE':>12} {'DATA':>7}")
    for layer in image.layers:
        data = sum(length for _, length in layer.blob.data_map)
        share = f"{100 * data / layer.blob.size:.1f}%" if layer.blob.size else "-"
        print(f"{layer.descriptor.digest[:19]:<20} {layer.blob.digest[:19]:<20} "
              f"{layer.blob.size:>12,} {share:>7}")
    print(f"{len(image.layers)} layers, {total:,} bytes of erofs in {args.outdir} "
          f"({time.monotonic() - started:.1f}s); description: {args.outdir / IMAGE_DESCRIPTION}")
    return 0
