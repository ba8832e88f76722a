"""CPU/memory/GPU admission: each Execute reserves whole cores, megabytes and GPUs out of this afslet's
limits for as long as its call lasts (upload, mount, run and the tar download). No queueing: a request
that does not fit is refused at once with RESOURCE_EXHAUSTED, so a dispatcher can try another afslet.

GPUs are an opaque slot count (`--limit-gpus`): admitted and accounted, never assigned to a device. An
afslet without GPUs (the default) and a request without them (every afs-sdk request) say nothing about
GPUs in their messages, which read as they always did.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from afsd.afslet.errors import AdmissionError

REJECTIONS = Counter("afsd_let_admission_rejections_total", "Execute calls refused for lack of CPU/memory share",
                     ["reason"])
RESERVED_CPU = Gauge("afsd_let_reserved_cpu_cores", "CPU cores reserved by running Execute calls")
RESERVED_MEMORY = Gauge("afsd_let_reserved_memory_mb", "Memory (MB) reserved by running Execute calls")
RESERVED_GPUS = Gauge("afsd_let_reserved_gpus", "GPU slots reserved by running Execute calls")


@dataclass(frozen=True)
class Usage:
    limit_cpu_cores: int
    limit_memory_mb: int
    used_cpu_cores: int
    used_memory_mb: int
    limit_gpus: int = 0
    used_gpus: int = 0

    @property
    def available_gpus(self) -> int:
        return max(0, self.limit_gpus - self.used_gpus)

    @property
    def available_cpu_cores(self) -> int:
        return max(0, self.limit_cpu_cores - self.used_cpu_cores)

    @property
    def available_memory_mb(self) -> int:
        return max(0, self.limit_memory_mb - self.used_memory_mb)


class Reservation:
    def __init__(self, admission: Admission, cpu_cores: int, memory_mb: int, gpus: int = 0) -> None:
        self._admission = admission
        self.cpu_cores = cpu_cores
        self.memory_mb = memory_mb
        self.gpus = gpus
        self._released = False

    def release(self) -> None:
        """Give the share back; safe to call more than once."""
        if not self._released:
            self._released = True
            self._admission._give_back(self)


class Admission:
    """The ledger. Used only from the event loop, so no lock is needed."""

    def __init__(self, limit_cpu_cores: int, limit_memory_mb: int, limit_gpus: int = 0) -> None:
        if limit_cpu_cores <= 0 or limit_memory_mb <= 0 or limit_gpus < 0:
            raise ValueError("admission limits must be > 0 (GPUs >= 0)")
        self.limit_cpu_cores = limit_cpu_cores
        self.limit_memory_mb = limit_memory_mb
        self.limit_gpus = limit_gpus
        self._used_cpu = 0
        self._used_memory = 0
        self._used_gpus = 0

    def usage(self) -> Usage:
        return Usage(self.limit_cpu_cores, self.limit_memory_mb, self._used_cpu, self._used_memory,
                     self.limit_gpus, self._used_gpus)

    def reserve(self, cpu_cores: int, memory_mb: int, gpus: int = 0) -> Reservation:
        with_gpus = gpus > 0 or self.limit_gpus > 0

        def amounts(cpu: int, memory: int, gpu: int) -> str:
            return f"cpu_cores={cpu} memory_mb={memory}" + (f" gpus={gpu}" if with_gpus else "")

        if cpu_cores > self.limit_cpu_cores or memory_mb > self.limit_memory_mb or gpus > self.limit_gpus:
            REJECTIONS.labels("exceeds_limit").inc()
            raise AdmissionError(
                f"request for {amounts(cpu_cores, memory_mb, gpus)} exceeds this afslet's limits "
                f"{amounts(self.limit_cpu_cores, self.limit_memory_mb, self.limit_gpus)}")
        usage = self.usage()
        if cpu_cores > usage.available_cpu_cores or memory_mb > usage.available_memory_mb \
                or gpus > usage.available_gpus:
            REJECTIONS.labels("insufficient").inc()
            raise AdmissionError(
                f"insufficient resources: requested {amounts(cpu_cores, memory_mb, gpus)}, available "
                f"{amounts(usage.available_cpu_cores, usage.available_memory_mb, usage.available_gpus)} (limits "
                f"{amounts(self.limit_cpu_cores, self.limit_memory_mb, self.limit_gpus)}, in use "
                f"{amounts(usage.used_cpu_cores, usage.used_memory_mb, usage.used_gpus)}); retry later or elsewhere")
        self._used_cpu += cpu_cores
        self._used_memory += memory_mb
        self._used_gpus += gpus
        self._publish()
        return Reservation(self, cpu_cores, memory_mb, gpus)

    def _give_back(self, reservation: Reservation) -> None:
        self._used_cpu -= reservation.cpu_cores
        self._used_memory -= reservation.memory_mb
        self._used_gpus -= reservation.gpus
        self._publish()

    def _publish(self) -> None:
        RESERVED_CPU.set(self._used_cpu)
        RESERVED_MEMORY.set(self._used_memory)
        RESERVED_GPUS.set(self._used_gpus)
