"""Row 3: cold sequential reads through fscache (cachefiles on-demand) against a local erofs mount, in the
lab VM (this host's kernel has no cachefiles): bench/fscache_bench.py run by scripts/vm-test.sh, which
boots the lab kernel under qemu (TCG: absolute numbers mean little, the ratio is what counts).

The VM costs minutes of both cores. `mode`: "auto" runs it when the lab kernel is already built, "yes"
builds the kernel first if needed (about 6 minutes on 2 cores), "no" skips it.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from bench._common import REPO
from bench.datapath._report import Row, Section
from bench.fscache_bench import vm_pytest_args

JSON_PREFIX = "fscache-bench-json: "


def measure(quick: bool, mode: str) -> Section:
    section = Section("cold sequential read through fscache, in the VM")
    if mode == "no":
        section.skipped = "skipped (--vm no)"
        return section
    built = subprocess.run([str(REPO / "scripts" / "kernel-setup.sh"), "path"], capture_output=True).returncode == 0
    if not built and mode == "auto":
        section.skipped = "the lab kernel is not built (scripts/kernel-setup.sh build, or --vm yes)"
        return section
    print(f"\n{section.title}: booting the lab VM (minutes under TCG) ...", flush=True)
    result = subprocess.run([str(REPO / "scripts" / "vm-test.sh"), *vm_pytest_args("quick" if quick else "full")],
                            capture_output=True, text=True, timeout=4000,
                            env={**os.environ, "AFSD_VM_TIMEOUT": os.environ.get("AFSD_VM_TIMEOUT", "3900")})
    lines = [line for line in result.stdout.splitlines() if JSON_PREFIX in line]
    if result.returncode != 0 or not lines:
        section.skipped = f"the VM run failed ({result.returncode}): {(result.stdout + result.stderr).strip()[-400:]}"
        return section
    report: dict[str, Any] = json.loads(lines[-1].split(JSON_PREFIX, 1)[1])
    speeds = report["sequential"]["mb_per_s"]
    ratio = report["sequential"]["ratios"]["fscache cold / local cold"]
    print(f"  {report['size_mib']} MiB, medians of {report['runs']} (MB/s): "
          + ", ".join(f"{case} {value:,.0f}" for case, value in speeds.items()))
    section.rows.append(Row("cold sequential read, fscache in the VM (local source)",
                            f"{speeds['fscache cold']:,.0f} MB/s", f"{speeds['local cold']:,.0f} MB/s local erofs in the VM",
                            ratio, "≥ 0.6", details=report))
    return section
