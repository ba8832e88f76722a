"""One Execute call of afsd's afslet API (to an afslet or through the proxy), timed, with the afslet's
phase timings: shared by bench/afslet_bench.py and the data-path bench (bench/datapath/task.py)."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from afsd.api import afslet_pb2, afslet_pb2_grpc

TIMING_LINE = re.compile(r"phase=(\w+) ms=([0-9.]+)")
MOUNT_LINE = re.compile(r"backend (\w+), (\d+) of (\d+) bytes on this node")


@dataclass
class ExecuteTiming:
    milliseconds: float                       # first frame sent to `done` received, client side
    phases: dict[str, float] = field(default_factory=dict)   # the afslet's timing frames, ms
    backend: str = ""
    bytes_on_node_at_mount: int = 0
    bytes_total: int = 0


def execute(stub: afslet_pb2_grpc.AfsletStub, image: str, command: Sequence[str], *, cpu_cores: int,
            memory_mb: int, timeout_ms: int = 60_000) -> ExecuteTiming:
    """One Execute of `command`: start frame, half-close, read until `done`; RuntimeError unless exit 0."""
    start = afslet_pb2.StartRequest(image=image, command=list(command), cpu_cores=cpu_cores, memory_mb=memory_mb,
                                    timeout_ms=timeout_ms)
    timing = ExecuteTiming(0.0)
    result: afslet_pb2.Result | None = None
    output: list[str] = []
    started = time.perf_counter()
    for response in stub.Execute(iter([afslet_pb2.ExecuteRequest(start=start)]), timeout=timeout_ms / 1000 + 600):
        kind = response.WhichOneof("payload")
        if kind == "done":
            timing.milliseconds = (time.perf_counter() - started) * 1000
        elif kind == "result":
            result = response.result
        elif kind == "log" and response.log.source == "timing":
            if match := TIMING_LINE.search(response.log.message):
                timing.phases[match[1]] = float(match[2])
        elif kind == "log" and response.log.source == "mount" and (match := MOUNT_LINE.search(response.log.message)):
            timing.backend = match[1]
            timing.bytes_on_node_at_mount, timing.bytes_total = int(match[2]), int(match[3])
        elif kind == "log":
            output.append(response.log.message)
    if result is None or result.exit_code != 0 or not timing.milliseconds:
        raise RuntimeError(f"Execute of {list(command)} in {image} did not succeed: {result}; "
                           f"output: {' | '.join(output)[-1000:]}")
    return timing
