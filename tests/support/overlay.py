"""What the kernel says about an overlay mount (its super options in /proc/self/mountinfo)."""

from __future__ import annotations

from pathlib import Path


def volatile_overlay_options(options: str) -> bool:
    """`volatile` as the kernel shows it: itself (5.10+), or `fsync=volatile` (kernels that have fsync=)."""
    return bool({"volatile", "fsync=volatile"} & set(options.split(",")))


def overlay_is_volatile(target: Path) -> bool:
    """Whether the overlay mounted at `target` (in this mount namespace) is volatile."""
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            if line.split(" ")[4] == str(target):
                return volatile_overlay_options(line.split(" - ", 1)[1].split()[-1])
    raise AssertionError(f"nothing is mounted at {target}")
