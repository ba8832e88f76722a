"""`afsd trace show IMAGE`: what the cluster learned tasks of an image read first from each of its layers
(learned prefetch: docs/learned-prefetch.md), as discovery merged the runs nodes reported."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from afsd.cli._options import add_platform_option, add_tls_options, platform_from, tls_from


def register(subparsers: argparse._SubParsersAction) -> None:
    trace = subparsers.add_parser(
        "trace", help="what the cluster learned tasks read first (learned prefetch)",
        description="Node daemons record which bytes of each layer tasks read first after a mount and report "
                    "them to discovery, which merges the runs; the next node to mount the layer fetches those "
                    "bytes before the task asks.")
    verbs = trace.add_subparsers(dest="verb", metavar="VERB", required=True)
    show = verbs.add_parser("show", help="print what the cluster learned for an image's layers",
                            description="Print, per layer of IMAGE, the merged trace discovery holds: how many runs "
                                        "it merges, and its first ranges in first-read order.")
    show.add_argument("image", metavar="IMAGE")
    show.add_argument("--discovery-endpoint", action="append", default=[], metavar="HOST:PORT", required=True,
                      help="a discovery replica (repeatable)")
    add_platform_option(show)
    show.add_argument("--ranges", type=int, default=10, metavar="N",
                      help="ranges to list per layer (default %(default)s; --json lists all)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    add_tls_options(show)
    show.set_defaults(handler=run_show)


async def run_show(args: argparse.Namespace) -> int:
    from afsd.api import discovery_pb2 as pb
    from afsd.cluster.discovery_client import DiscoveryClient, DiscoveryUnavailableError
    from afsd.errors import AfsdError
    from afsd.oci.reference import parse_reference
    from afsd.rpc import ChannelPool

    reference, platform = parse_reference(args.image), platform_from(args)
    channels = ChannelPool(tls_from(args))
    discovery = DiscoveryClient(args.discovery_endpoint, channels)
    try:
        resolved = await discovery.resolve_image(pb.ResolveImageRequest(
            image=str(reference), platform_os=platform.os, platform_arch=platform.architecture,
            platform_variant=platform.variant))
        blobs = {}   # layer digest -> (blob digest, size), as a holder advertises them
        for layer in resolved.layers:
            for service in await discovery.find_provider(layer.digest):
                stat = next((s for s in service.layer_stats if s.digest == layer.digest and s.blob_digest), None)
                if stat is not None:
                    blobs[layer.digest] = (stat.blob_digest, stat.afs_size)
                    break
        traces = await discovery.access_traces([blob for blob, _ in blobs.values()], resolved.manifest_digest)
    except DiscoveryUnavailableError as error:
        raise AfsdError(str(error)) from None
    finally:
        await channels.close()
    by_blob = {trace.blob_digest: trace for trace in traces}
    layers = []
    for layer in resolved.layers:
        blob, size = blobs.get(layer.digest, ("", 0))
        layers.append({"layer_digest": layer.digest, "blob_digest": blob, "blob_size": size,
                       "trace": _trace_json(by_blob[blob]) if blob in by_blob else None})
    if args.json:
        json.dump({"image": str(reference), "manifest_digest": resolved.manifest_digest, "layers": layers},
                  sys.stdout, indent=2)
        print()
    else:
        _print(str(reference), resolved.manifest_digest, layers, args.ranges)
    return 0


def _trace_json(trace: Any) -> dict[str, Any]:
    return {"runs": trace.runs, "images": trace.images, "same_image": trace.same_image,
            "updated_unix": trace.updated_unix, "bytes": sum(r.length for r in trace.ranges),
            "ranges": [[r.offset, r.length, r.first_read_ms] for r in trace.ranges]}


def _print(image: str, manifest_digest: str, layers: list[dict[str, Any]], shown: int) -> None:
    from afsd.cli.node import _size

    print(f"{image} ({manifest_digest}), {len(layers)} layers")
    for layer in layers:
        head = f"layer {layer['layer_digest']}"
        trace = layer["trace"]
        if not layer["blob_digest"]:
            print(f"{head}: no layerstore holds it")
            continue
        head += f" (blob {layer['blob_digest']}, {_size(layer['blob_size'])})"
        if trace is None:
            print(f"{head}: nothing learned yet")
            continue
        whose = "this image" if trace["same_image"] else f"{trace['images']} other image(s)"
        print(f"{head}: {len(trace['ranges'])} ranges, {_size(trace['bytes'])}, merged from {trace['runs']} "
              f"run(s) of {whose}")
        if shown > 0 and trace["ranges"]:
            print(f"  {'FIRST READ':>10}  {'OFFSET':>14}  {'LENGTH':>10}")
            for offset, length, ms in trace["ranges"][:shown]:
                print(f"  {ms / 1000:>9.3f}s  {offset:>#14x}  {_size(length):>10}")
            if len(trace["ranges"]) > shown:
                print(f"  ... {len(trace['ranges']) - shown} more (--ranges N, or --json)")
