"""Every time limit the simulated cluster waits under, in one place.

They are generous on purpose: dozens of Python daemons starting at once on a 2-core host that other
work shares take minutes, not seconds. `AFSD_SIM_DEADLINE_FACTOR` scales them all (a slower host:
2, 3, ...). A deadline says when to give up, never how fast something should be: speed is what the
benchmarks measure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Deadlines:
    daemon_start: float = 300.0      # a batch of daemons spawned at once, until all listen
    registered: float = 300.0        # every layerstore listed by discovery
    mount: float = 1800.0            # one `afsd mount` during a burst of all nodes
    read: float = 3600.0             # reading a whole image through one node's mount
    pull: float = 1800.0             # one node's plain registry pull + unpack (baseline)
    stop: float = 60.0               # one daemon's SIGTERM until it exits
    command: float = 120.0           # small CLI calls (`afsd mounts`, `umount`)
    small_burst_test: float = 1800.0 # the whole of a test that starts, bursts and tears down a few nodes

    def scaled(self, factor: float) -> Deadlines:
        return replace(self, **{f.name: getattr(self, f.name) * factor for f in fields(self)})


def deadlines() -> Deadlines:
    """The defaults, scaled by AFSD_SIM_DEADLINE_FACTOR when set."""
    factor = float(os.environ.get("AFSD_SIM_DEADLINE_FACTOR", "1") or 1)
    if factor <= 0:
        raise ValueError(f"AFSD_SIM_DEADLINE_FACTOR must be > 0 (got {factor})")
    return Deadlines().scaled(factor)
