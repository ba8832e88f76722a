"""Benchmark of layer conversion: throughput against tar + mkfs.erofs, and peak memory of `afsd convert`.

What it measures, each part against a baseline taken in the same run (no absolute thresholds):

(a) Throughput. Every layer of the realistic Debian bookworm minbase image (`afsd.lab.debian`,
    three layers: gzip root filesystem, zstd changes, a small uncompressed layer) is converted with
    `afsd.erofs.convert.convert_layer`, in process, from the layer blob on disk. The baseline does
    what a naive converter would: GNU tar extraction of the same blob (`tar --xattrs
    --xattrs-include='*' --numeric-owner -p -xf`, which decompresses too) followed by a plain
    `mkfs.erofs` of the result. The baseline LACKS: whiteout conversion (.wh.* files stay files),
    the unpacker's safety checks (path escapes, links, devices, name lengths) and diff_id check,
    the data map and per-chunk sha256 digests, fsync of the blob, removal of the staging tree, and
    reproducibility (fixed UUID, SOURCE_DATE_EPOCH, xattr order; afsd also uses -Enoinline_data).
    MB/s is of the UNCOMPRESSED layer (tar bytes). Each layer is run `--repeats` times, afsd and
    baseline alternating; the table shows medians. `ratio` = afsd time / baseline time (1.0 = as
    fast as the baseline, 2.0 = twice as slow). The two small layers take milliseconds, so their
    MB/s is dominated by fixed costs (process starts, fsync); the total row is what matters.
    `per-run` is the min-max of the ratio taken within each repeat (afsd and baseline back to back).

(b) Peak memory. `afsd convert IMAGE OUTDIR` runs as a child process against a local
    docker-registry, for an image whose single uncompressed layer holds one file of random bytes:
    `--big-mb` (default 600 MB) and `--small-mb` (default 60 MB). Reported: max RSS from wait4 (the
    largest of afsd's Python process and each of its waited-for children such as mkfs.erofs; taken
    by a small wrapper process so that the child does not inherit this benchmark's own RSS as its
    starting high-water mark), the Python process's own VmHWM (sampled
    from /proc), and the peak of its process tree's summed PSS (sampled every 20 ms). The floor row
    is `afsd convert --help` (interpreter + imports). `big/small` near 1.0 means memory does not grow with layer size.

Run: `.venv/bin/python bench/convert_bench.py [--repeats 3] [--json out.json]` as root (tar -p,
mkfs.erofs). Everything it creates lives in one temp dir and one registry process, removed at exit.
The machine has 2 cores and other work may be running: compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (MB, exit_on_sigterm, machine_facts, median, print_table, push_single_file_image,
                     require, write_json, write_random_file)

TAR_FLAGS = ["--xattrs", "--xattrs-include=*", "--numeric-owner", "-p"]


# ----------------------------------------------------------------------------------------------
# (a) throughput
# ----------------------------------------------------------------------------------------------


def _uncompressed_size(path: Path, compression: str, digest: str) -> int:
    from afsd.erofs.decompress import open_layer

    with open_layer(path, compression, digest) as stream:  # type: ignore[arg-type]
        stream.drain()
        return stream.uncompressed_size


def _warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 22):
            pass


def _time_afsd(layer: Any, path: Path, scratch: Path) -> float:
    from afsd.erofs.convert import convert_layer

    out = scratch / "afsd.erofs"
    started = time.perf_counter()
    convert_layer(path, layer.compression, layer.digest, out, expected_diff_id=layer.diff_id, work_dir=scratch)
    elapsed = time.perf_counter() - started
    out.unlink()
    return elapsed


def _time_baseline(path: Path, scratch: Path) -> tuple[float, float]:
    staging = scratch / "tar-staging"
    image = scratch / "baseline.erofs"
    staging.mkdir()
    try:
        started = time.perf_counter()
        subprocess.run(["tar", *TAR_FLAGS, "-xf", str(path), "-C", str(staging)], check=True,
                       stdin=subprocess.DEVNULL)
        extracted = time.perf_counter()
        subprocess.run(["mkfs.erofs", str(image), str(staging)], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        built = time.perf_counter()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        image.unlink(missing_ok=True)
    return extracted - started, built - extracted


def throughput(repeats: int, scratch_root: Path) -> dict[str, Any]:
    from afsd.erofs.mkfs import erofs_utils_version
    from afsd.lab.debian import debian_layout
    from afsd.lab.oci_layout import blob_path

    cached = debian_layout()
    erofs_utils_version()  # cached after the first call; keep mkfs.erofs --version out of the timings
    layers = cached.layout.manifests[0].layers
    print(f"(a) Debian image ({cached.source}), {len(layers)} layers, {repeats} repeats each ...", flush=True)
    results: list[dict[str, Any]] = []
    for index, layer in enumerate(layers, 1):
        path = blob_path(cached.layout.layout_dir, layer.digest)
        _warm(path)
        results.append({"layer": index, "digest": layer.digest, "compression": layer.compression,
                        "compressed_bytes": layer.size,
                        "uncompressed_bytes": _uncompressed_size(path, layer.compression, layer.digest),
                        "afsd_s": [], "tar_s": [], "mkfs_s": [], "baseline_s": []})
    for _ in range(repeats):
        for layer, result in zip(layers, results):
            path = blob_path(cached.layout.layout_dir, layer.digest)
            scratch = Path(tempfile.mkdtemp(prefix="layer-", dir=scratch_root))
            try:
                result["afsd_s"].append(_time_afsd(layer, path, scratch))
                tar_s, mkfs_s = _time_baseline(path, scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            result["tar_s"].append(tar_s)
            result["mkfs_s"].append(mkfs_s)
            result["baseline_s"].append(tar_s + mkfs_s)
    totals = {key: [sum(r[key][i] for r in results) for i in range(repeats)]
              for key in ("afsd_s", "tar_s", "mkfs_s", "baseline_s")}
    rows_in = results + [{"layer": "total", "compression": "", "compressed_bytes": sum(r["compressed_bytes"] for r in results),
                          "uncompressed_bytes": sum(r["uncompressed_bytes"] for r in results), **totals}]
    table = []
    for r in rows_in:
        afsd_s, base_s = median(r["afsd_s"]), median(r["baseline_s"])
        r["median"] = {"afsd_s": afsd_s, "tar_s": median(r["tar_s"]), "mkfs_s": median(r["mkfs_s"]),
                       "baseline_s": base_s, "afsd_mb_s": r["uncompressed_bytes"] / MB / afsd_s,
                       "baseline_mb_s": r["uncompressed_bytes"] / MB / base_s, "ratio_time_afsd_over_baseline": afsd_s / base_s}
        # Each repeat ran afsd and the baseline back to back: their ratio is less exposed to load swings.
        r["paired_ratios"] = [a / b for a, b in zip(r["afsd_s"], r["baseline_s"])]
        m = r["median"]
        table.append([r["layer"], r["compression"], r["compressed_bytes"] / MB, r["uncompressed_bytes"] / MB,
                      m["afsd_s"], m["afsd_mb_s"], m["tar_s"], m["mkfs_s"], m["baseline_s"], m["baseline_mb_s"],
                      f"{m['ratio_time_afsd_over_baseline']:.2f}x",
                      f"{min(r['paired_ratios']):.2f}-{max(r['paired_ratios']):.2f}"])
    print()
    print_table(["layer", "comp", "MB in", "MB tar", "afsd s", "afsd MB/s", "tar s", "mkfs s", "base s",
                 "base MB/s", "ratio", "per-run"], table)
    print("(medians; MB/s of uncompressed tar bytes; ratio = afsd time / (tar + mkfs.erofs) time;\n"
          " per-run = min-max of that ratio within each repeat)")
    return {"image_source": cached.source, "repeats": repeats, "layers": results,
            "total": rows_in[-1]}


# ----------------------------------------------------------------------------------------------
# (b) peak memory of `afsd convert`
# ----------------------------------------------------------------------------------------------


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _tree_pids(root: int) -> list[int]:
    """`root` and its descendants, leaving out children that have not exec'd yet: a vfork()ed child
    shares its parent's memory, which would otherwise be counted twice."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(child for child in _children(pid) if _exe(child) != _exe(pid))
    return pids


def _status_kib(pid: int, field: str, file: str = "status") -> int:
    try:
        with open(f"/proc/{pid}/{file}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


# A small parent for the measured program: a child forked from this benchmark (tens of MiB by then)
# would inherit our RSS as its starting high-water mark (the kernel records the old mm's peak at
# exec); a child of this bare interpreter (~8 MiB, below afsd's floor) does not distort the max.
# (busybox time is no substitute: v1.35 reports ru_maxrss as pages, 4x too high.)
_WAIT4_WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure_child(argv: list[str], log: Path) -> dict[str, Any]:
    """Run `argv` under a small wait4 wrapper, sampling /proc every 20 ms; returns peaks in KiB."""
    rss_file = log.with_suffix(".maxrss")
    started = time.perf_counter()
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WAIT4_WRAPPER, str(rss_file), *argv],
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    hwm = tree_peak = 0
    try:
        while process.poll() is None:
            for child in _children(process.pid):  # the measured program, under the wrapper
                hwm = max(hwm, _status_kib(child, "VmHWM"))
                # PSS, not RSS: a just-forked child shares its parent's pages, and RSS would count them twice.
                tree_peak = max(tree_peak, sum(_status_kib(p, "Pss", "smaps_rollup") for p in _tree_pids(child)))
            time.sleep(0.02)
    except BaseException:
        process.kill()  # the wrapper; its child then runs to completion on its own, so kill it too
        for child in _children(process.pid):
            os.kill(child, 9)
        process.wait()
        raise
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}:\n{log.read_text()[-2000:]}")
    return {"seconds": elapsed, "wait4_maxrss_kib": int(rss_file.read_text()), "python_vmhwm_kib": hwm,
            "tree_pss_peak_kib": tree_peak}


def memory(big_mb: int, small_mb: int, repeats: int, scratch_root: Path) -> dict[str, Any]:
    from afsd.lab.registry import start_registry

    print(f"\n(b) peak memory of `afsd convert`: {small_mb} MB and {big_mb} MB single-layer images ...", flush=True)
    registry = start_registry(scratch_root / "registry")
    try:
        afsd = [sys.executable, "-m", "afsd"]
        runs: dict[str, dict[str, Any]] = {"floor": {"label": "afsd convert --help", "layer_bytes": 0,
                                                     "runs": [measure_child([*afsd, "convert", "--help"],
                                                                            scratch_root / "help.log")]}}
        for label, size_mb in (("small", small_mb), ("big", big_mb)):
            content = write_random_file(scratch_root / f"{label}.bin", size_mb * MB)
            reference, layer_bytes = push_single_file_image(registry.address, scratch_root, f"mem-{label}", content)
            content.unlink()
            runs[label] = {"label": f"{size_mb} MB layer", "layer_bytes": layer_bytes, "runs": []}
            for attempt in range(repeats):
                out_dir = scratch_root / f"out-{label}-{attempt}"
                try:
                    runs[label]["runs"].append(measure_child(
                        [*afsd, "convert", reference, str(out_dir), "--insecure-registry", registry.address, "--json"],
                        scratch_root / f"convert-{label}.log"))
                finally:
                    shutil.rmtree(out_dir, ignore_errors=True)
    finally:
        registry.stop()
    keys = ("wait4_maxrss_kib", "python_vmhwm_kib", "tree_pss_peak_kib")
    for entry in runs.values():
        entry["max"] = {k: max(r[k] for r in entry["runs"]) for k in keys}
        entry["median_seconds"] = median([r["seconds"] for r in entry["runs"]])
    ratio = {k: runs["big"]["max"][k] / runs["small"]["max"][k] for k in keys}
    size_ratio = runs["big"]["layer_bytes"] / runs["small"]["layer_bytes"]
    table = [[e["label"], e["layer_bytes"] / MB, e["median_seconds"], e["max"]["wait4_maxrss_kib"] / 1024,
              e["max"]["python_vmhwm_kib"] / 1024, e["max"]["tree_pss_peak_kib"] / 1024] for e in runs.values()]
    table.append([f"big/small (layer {size_ratio:.1f}x)", "", "", f"{ratio['wait4_maxrss_kib']:.2f}x",
                  f"{ratio['python_vmhwm_kib']:.2f}x", f"{ratio['tree_pss_peak_kib']:.2f}x"])
    print()
    print_table(["run", "layer MB", "wall s", "maxrss MiB", "py HWM MiB", "tree PSS MiB"], table)
    print(f"(memory: max over {repeats} run(s), wall: median; maxrss = wait4, largest single process of the tree; "
          "tree PSS = peak of the summed PSS sampled every 20 ms)")
    return {"repeats": repeats, "runs": runs, "ratio_big_over_small": ratio, "layer_size_ratio": size_ratio}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per layer in (a) (default %(default)s)")
    parser.add_argument("--memory-repeats", type=int, default=2, help="runs per image in (b) (default %(default)s)")
    parser.add_argument("--big-mb", type=int, default=600, help="big layer's file size in MB (default %(default)s)")
    parser.add_argument("--small-mb", type=int, default=60, help="small layer's file size in MB (default %(default)s)")
    parser.add_argument("--skip-throughput", action="store_true", help="leave out part (a)")
    parser.add_argument("--skip-memory", action="store_true", help="leave out part (b)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the temp dir goes (default: the system temp dir; needs ~4x --big-mb free)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args()
    require("tar", "mkfs.erofs", "docker-registry", "skopeo")
    exit_on_sigterm()
    document: dict[str, Any] = {"benchmark": "convert", "machine_before": machine_facts()}
    scratch_root = Path(tempfile.mkdtemp(prefix="afsd-convert-bench-", dir=args.workdir))
    try:
        if not args.skip_throughput:
            document["throughput"] = throughput(args.repeats, scratch_root)
        if not args.skip_memory:
            document["memory"] = memory(args.big_mb, args.small_mb, args.memory_repeats, scratch_root)
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)
    document["machine_after"] = machine_facts()
    print(f"\nload average before {document['machine_before']['load_average_1_5_15']}, after "
          f"{document['machine_after']['load_average_1_5_15']} on {os.cpu_count()} CPUs: other work may share "
          "the machine; compare ratios, not absolute numbers")
    write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
