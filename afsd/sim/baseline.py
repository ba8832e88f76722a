"""The baseline the burst is compared with, on the same simulated network: every node pulls the image
from the registry itself, as `docker pull` does (all layer blobs downloaded at once, then unpacked in
order), and then runs the same task from the unpacked tree.

Unpacking is `tar` (gzip/zstd/plain) without overlay whiteout handling: a little less work than a
container runtime does, so the baseline is, if anything, flattered. Times are seconds from the common
start, as for the burst (`NodeTimings`): `mounted` is when the tree was unpacked.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from afsd.sim.burst import ImageTask, NodeTimings, run_task
from afsd.sim.cluster import SimCluster, SimNode

_TAR_FLAGS = {"gzip": "-xzf", "zstd": "--zstd -xf", "none": "-xf"}


@dataclass(frozen=True)
class BlobToPull:
    digest: str
    compression: str  # "gzip", "zstd" or "none"


def pull_script(registry: str, repository: str, blobs: Sequence[BlobToPull], into: str) -> str:
    """A shell script that downloads every blob at once (curl) and waits for each; then, separately,
    `unpack_script` extracts them."""
    lines = ["set -e", f"mkdir -p {shlex.quote(into)}", f"cd {shlex.quote(into)}"]
    for i, blob in enumerate(blobs):
        url = f"http://{registry}/v2/{repository}/blobs/{blob.digest}"
        lines.append(f"curl -sSf -o blob{i} {shlex.quote(url)} & p{i}=$!")
    lines += [f"wait $p{i}" for i in range(len(blobs))]
    return "\n".join(lines)


def unpack_script(blobs: Sequence[BlobToPull], into: str) -> str:
    lines = ["set -e", f"cd {shlex.quote(into)}", "mkdir -p rootfs"]
    for i, blob in enumerate(blobs):
        lines.append(f"tar {_TAR_FLAGS[blob.compression]} blob{i} -C rootfs --numeric-owner -p && rm blob{i}")
    return "\n".join(lines)


def registry_pull_burst(sim: SimCluster, repository: str, blobs: Sequence[BlobToPull],
                        task: ImageTask) -> list[NodeTimings]:
    """Every node pulls and unpacks the image at once, then starts the task and reads the whole tree;
    each node's copy is deleted after it is read."""
    assert sim.registry is not None
    registry = sim.registry.address
    barrier = threading.Barrier(len(sim.nodes) + 1)
    started: list[float] = []

    def one(node: SimNode) -> NodeTimings:
        timings = NodeTimings(node.name)
        into = node.workdir / "baseline"
        barrier.wait()
        t0 = started[0]
        try:
            for script in (pull_script(registry, repository, blobs, str(into)), unpack_script(blobs, str(into))):
                ran = subprocess.run([*node.member.enter(), "sh", "-c", script], capture_output=True, text=True,
                                     timeout=sim.limits.pull)
                if ran.returncode != 0:
                    raise RuntimeError(f"registry pull: {ran.stderr.strip()[-400:]}")
            root = into / "rootfs"
            timings.mounted = time.monotonic() - t0
            run_task(root, task, timings, t0, sim.limits.read)
        except Exception as error:
            timings.error = str(error) or type(error).__name__
        finally:
            shutil.rmtree(into, ignore_errors=True)
        return timings

    with ThreadPoolExecutor(max_workers=len(sim.nodes)) as pool:
        futures = [pool.submit(one, node) for node in sim.nodes]
        started.append(time.monotonic())
        barrier.wait()
        return [future.result() for future in futures]
