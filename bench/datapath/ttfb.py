"""Row 5: time to first byte of a small file in a never-seen image a peer holds, for a large image
against an image 16 times smaller.

Two images, each one layer: a 4 KiB file `etc/small.txt` and a file of random bytes (`size_mib` and
`size_mib / 16` MiB). The holder layerstore holds both. Each repeat, for each image in turn (the order
alternates between repeats): a fresh
`afsd node` (new state, no prefetch), page cache dropped, then `afsd mount --backend fanotify` and
reading the small file whole, timed together. Ratio = large ÷ small (1.0: no growth with image size).
"""

from __future__ import annotations

import statistics
import time

from bench._common import MIB, drop_caches, write_random_file
from bench.datapath._lab import BenchLab
from bench.datapath._report import Row, Section

SMALL_FILE = "etc/small.txt"
FACTOR = 16


def measure(lab: BenchLab, size_mib: int, repeats: int) -> Section:
    section = Section("time to first byte, never-seen image a peer holds")
    small = lab.work / "small.txt"
    small.write_bytes(b"first byte\n" * 372)
    sizes = {"large": size_mib * MIB, "small": max(MIB, size_mib * MIB // FACTOR)}
    references = {}
    for name, size in sizes.items():
        data = write_random_file(lab.work / f"ttfb-{name}.bin", size)
        references[name] = lab.push(f"ttfb-{name}", {SMALL_FILE: small, "data/big.bin": data})
        data.unlink()
        lab.hold(references[name])

    seconds: dict[str, list[float]] = {name: [] for name in sizes}
    for index in range(repeats):
        for name, reference in sorted(references.items(), reverse=index % 2 == 1):
            node = lab.node(f"ttfb-{name}-")
            try:
                target = lab.work / f"ttfb-mnt-{name}-{index}"
                drop_caches()
                started = time.perf_counter()
                lab.mount(node, reference, target)
                if not (target / SMALL_FILE).read_bytes().startswith(b"first byte"):
                    raise RuntimeError(f"{SMALL_FILE} in {reference} reads wrong")
                seconds[name].append(time.perf_counter() - started)
            finally:
                lab.stop(node)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"\n{section.title}: {sizes['large'] / MIB:.0f} MiB vs {sizes['small'] / MIB:.0f} MiB image, medians of "
          f"{repeats}: " + ", ".join(f"{name} {value:.3f} s" for name, value in median.items()))
    section.rows.append(Row(
        f"time to first byte, {sizes['large'] / MIB:.0f} MiB image", f"{median['large']:.3f} s",
        f"{median['small']:.3f} s for a {sizes['small'] / MIB:.0f} MiB image", median["large"] / median["small"],
        "≈ 1 (no growth)", details={"sizes": sizes, "seconds": seconds}))
    return section
