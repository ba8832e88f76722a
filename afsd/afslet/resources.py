"""One execution's resource use, in the three shapes it is reported in: the JSON summary of the final
`resource` log frame, `ResourceUsage` in execution management (`afsd ps`), and the Prometheus
histograms. The numbers come from the container's cgroup (cgroups.usage).

The `resource` frame is one JSON object, e.g.
    {"execution_id": "4f1c...", "cpu_seconds": 1.21, "cpu_user_seconds": 1.1, "cpu_system_seconds": 0.11,
     "wall_seconds": 2.4, "memory_peak_bytes": 220200960, "memory_current_bytes": 0, "oom_kills": 0,
     "io_read_bytes": 0, "io_write_bytes": 4096, "pids_current": 0, "pids_peak": 3}
"""

from __future__ import annotations

import json

from afsd.afslet.cgroups import CgroupUsage
from afsd.afslet.metrics import EXECUTION_CPU_SECONDS, EXECUTION_MEMORY_PEAK_BYTES
from afsd.api import executions_pb2 as epb


def summary(usage: CgroupUsage, wall_seconds: float) -> dict[str, float | int]:
    return {
        "cpu_seconds": round(usage.cpu_ns / 1e9, 6),
        "cpu_user_seconds": round(usage.cpu_user_ns / 1e9, 6),
        "cpu_system_seconds": round(usage.cpu_system_ns / 1e9, 6),
        "wall_seconds": round(wall_seconds, 6),
        "memory_peak_bytes": usage.peak_memory_bytes,
        "memory_current_bytes": usage.memory_current_bytes,
        "oom_kills": usage.oom_kills,
        "io_read_bytes": usage.io_read_bytes,
        "io_write_bytes": usage.io_write_bytes,
        "pids_current": usage.pids_current,
        "pids_peak": usage.pids_peak,
    }


def summary_json(execution_id: str, usage: CgroupUsage, wall_seconds: float) -> str:
    return json.dumps({"execution_id": execution_id, **summary(usage, wall_seconds)})


def to_proto(usage: CgroupUsage, wall_seconds: float) -> epb.ResourceUsage:
    return epb.ResourceUsage(**summary(usage, wall_seconds))


def observe(outcome: str, usage: CgroupUsage) -> None:
    EXECUTION_CPU_SECONDS.labels(outcome).observe(usage.cpu_ns / 1e9)
    EXECUTION_MEMORY_PEAK_BYTES.labels(outcome).observe(usage.peak_memory_bytes)
