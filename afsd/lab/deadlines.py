"""How long the lab (launchers, the demo, the tests' cluster helpers) waits for things, in one place.

A deadline is how long something may take on a slow machine before waiting longer is pointless, not how
long it usually takes: start-up waits on the readiness a daemon reports (afsd/readiness.py), so the start
deadline only bounds a daemon that hangs. Everything scales with `AFSD_DEADLINE_SCALE` (default 1):
scripts/vm-test.sh sets it for the software-emulated VM, where a Python daemon takes seconds to import
and three start at once on one or two emulated CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace


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


@dataclass(frozen=True)
class SimDeadlines:
    """The simulated cluster's waits (afsd/sim): dozens of Python daemons starting at once on a 2-core host
    that other work shares take minutes, not seconds. Say when to give up, never how fast it should be."""
    daemon_start: float = 300.0      # a batch of daemons spawned at once, until all listen
    registered: float = 300.0        # every layerstore listed by discovery
    mount: float = 1800.0            # one `afsd mount` during a burst of all nodes
    read: float = 3600.0             # reading a whole image through one node's mount
    pull: float = 1800.0             # one node's plain registry pull + unpack (baseline)
    stop: float = 60.0               # one daemon's SIGTERM until it exits
    command: float = 120.0           # small CLI calls (`afsd mounts`, `umount`)
    small_burst_test: float = 1800.0 # the whole of a test that starts, bursts and tears down a few nodes

    def scaled(self, factor: float) -> SimDeadlines:
        return replace(self, **{f.name: getattr(self, f.name) * factor for f in fields(self)})


def sim_deadlines() -> SimDeadlines:
    """The simulation's deadlines, stretched by AFSD_DEADLINE_SCALE like every other."""
    return SimDeadlines().scaled(SCALE)
