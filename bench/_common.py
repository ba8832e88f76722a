"""Helpers shared by the benchmarks in bench/: tables, JSON results, machine facts, test images.

Nothing here measures anything; it only keeps the two benchmark scripts short. Every benchmark
reports ratios against a baseline measured in the same run, so the helpers carry no thresholds.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Make `import afsd` work when a script is run as `.venv/bin/python bench/<name>.py` from anywhere.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MIB = 1 << 20
MB = 1_000_000


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between the closest ranks (`fraction` 0.5: the median, 0.95: p95)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * fraction
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine_facts() -> dict[str, Any]:
    """What a reader needs to judge the numbers: cores, load, kernel, Python."""
    return {"cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in load_average()],
            "kernel": platform.release(), "python": platform.python_version()}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain text table, right-aligned except the first column."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def write_json(path: Path | None, document: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nJSON result written to {path}")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks clean up (processes, namespaces, temp dirs)."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (run scripts/setup.sh)")


def write_random_file(path: Path, size: int) -> Path:
    """`size` bytes from /dev/urandom: incompressible file content for big test layers."""
    with open("/dev/urandom", "rb") as source, open(path, "wb") as out:
        left = size
        while left:
            chunk = source.read(min(left, 4 * MIB))
            out.write(chunk)
            left -= len(chunk)
    return path


def push_single_file_image(registry_address: str, workdir: Path, name: str, content: Path,
                           compression: str = "none") -> tuple[str, int]:
    """Push an image whose one layer holds `content` as /data/<name>.bin; returns (reference, layer bytes).

    The OCI layout is written under `workdir` and removed after the push (the registry keeps a copy).
    """
    return push_files_image(registry_address, workdir, name, {f"data/{name}.bin": content}, compression)


def push_files_image(registry_address: str, workdir: Path, name: str, files: dict[str, Path],
                     compression: str = "none") -> tuple[str, int]:
    """Push an image of one layer holding `files` (path in the image -> file with its content) as
    `bench/<name>:v1`; returns (reference, layer bytes)."""
    from afsd.lab.layers import Entry, LayerSpec
    from afsd.lab.oci_layout import ImageSpec, write_oci_layout
    from afsd.lab.skopeo import push_layout

    entries = tuple(Entry(path, "file", source=source) for path, source in files.items())  # type: ignore[arg-type]
    layer = LayerSpec(entries, compression)  # type: ignore[arg-type]
    layout_dir = workdir / f"layout-{name}"
    try:
        layout = write_oci_layout(layout_dir, "v1", ImageSpec((layer,)))
        pushed = push_layout(layout, registry_address, f"bench/{name}", "v1")
        layer_size = layout.manifests[0].layers[0].size
    finally:
        shutil.rmtree(layout_dir, ignore_errors=True)
    return pushed.reference, layer_size


def drop_caches() -> None:
    """Write back dirty pages and drop the page cache (root): the next read of any file comes from disk
    or, on a lazily filled mount, from its providers."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(path: Path, block: int = 4 * MIB) -> tuple[float, int]:
    """(seconds, bytes) of reading `path` start to end in `block`-sized reads."""
    started, total = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(block):
            total += len(chunk)
    return time.perf_counter() - started, total


def run_quiet(argv: Sequence[str]) -> None:
    """Run a setup command; raise with its stderr if it fails."""
    result = subprocess.run(list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
