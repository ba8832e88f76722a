"""How long the lab (launchers, the demo, the tests' cluster helpers) waits for things, in one place.

A deadline is how long something may take on a slow machine before waiting longer is pointless, not how
long it usually takes: start-up waits on the readiness a daemon reports (afsd/readiness.py), so the start
deadline only bounds a daemon that hangs. Everything scales with `AFSD_DEADLINE_SCALE` (default 1):
scripts/vm-test.sh sets it for the software-emulated VM, where a Python daemon takes seconds to import
and three start at once on one or two emulated CPUs.
"""

from __future__ import annotations

import os


def _scale() -> float:
    try:
        value = float(os.environ.get("AFSD_DEADLINE_SCALE", "") or 1.0)
    except ValueError:
        return 1.0
    return value if value >= 1.0 else 1.0


SCALE = _scale()


def scaled(seconds: float) -> float:
    """`seconds` on an ordinary machine, stretched for a slow one."""
    return seconds * SCALE


DAEMON_START = scaled(120.0)    # an afsd daemon from exec to its ready file
DAEMON_STOP = scaled(15.0)      # SIGTERM to exit, before SIGKILL
REGISTRY_START = scaled(60.0)   # docker-registry from exec to "listening on"
CONTAINERD_START = scaled(60.0) # containerd until its CRI plugin and the afsd snapshotter are loaded
CLI_COMMAND = scaled(600.0)     # one `afsd ...` command run by the lab (mount, run, mounts)
