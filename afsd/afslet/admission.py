"""CPU/memory admission: each Execute reserves whole cores and megabytes out of this afslet's limits
for as long as its call lasts (upload, mount, run and the tar download). No queueing: a request that
does not fit is refused at once with RESOURCE_EXHAUSTED, so a dispatcher can try another afslet.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from afsd.afslet.errors import AdmissionError

REJECTIONS = Counter("afsd_let_admission_rejections_total", "Execute calls refused for lack of CPU/memory share",
                     ["reason"])
RESERVED_CPU = Gauge("afsd_let_reserved_cpu_cores", "CPU cores reserved by running Execute calls")
RESERVED_MEMORY = Gauge("afsd_let_reserved_memory_mb", "Memory (MB) reserved by running Execute calls")


@dataclass(frozen=True)
class Usage:
    limit_cpu_cores: int
    limit_memory_mb: int
    used_cpu_cores: int
    used_memory_mb: int

    @property
    def available_cpu_cores(self) -> int:
        return max(0, self.limit_cpu_cores - self.used_cpu_cores)

    @property
    def available_memory_mb(self) -> int:
        return max(0, self.limit_memory_mb - self.used_memory_mb)


class Reservation:
    def __init__(self, admission: Admission, cpu_cores: int, memory_mb: int) -> None:
        self._admission = admission
        self.cpu_cores = cpu_cores
        self.memory_mb = memory_mb
        self._released = False

    def release(self) -> None:
        """Give the share back; safe to call more than once."""
        if not self._released:
            self._released = True
            self._admission._give_back(self)


class Admission:
    """The ledger. Used only from the event loop, so no lock is needed."""

    def __init__(self, limit_cpu_cores: int, limit_memory_mb: int) -> None:
        if limit_cpu_cores <= 0 or limit_memory_mb <= 0:
            raise ValueError("admission limits must be > 0")
        self.limit_cpu_cores = limit_cpu_cores
        self.limit_memory_mb = limit_memory_mb
        self._used_cpu = 0
        self._used_memory = 0

    def usage(self) -> Usage:
        return Usage(self.limit_cpu_cores, self.limit_memory_mb, self._used_cpu, self._used_memory)

    def reserve(self, cpu_cores: int, memory_mb: int) -> Reservation:
        if cpu_cores > self.limit_cpu_cores or memory_mb > self.limit_memory_mb:
            REJECTIONS.labels("exceeds_limit").inc()
            raise AdmissionError(
                f"request for cpu_cores={cpu_cores} memory_mb={memory_mb} exceeds this afslet's limits "
                f"cpu_cores={self.limit_cpu_cores} memory_mb={self.limit_memory_mb}")
        usage = self.usage()
        if cpu_cores > usage.available_cpu_cores or memory_mb > usage.available_memory_mb:
            REJECTIONS.labels("insufficient").inc()
            raise AdmissionError(
                f"insufficient resources: requested cpu_cores={cpu_cores} memory_mb={memory_mb}, available "
                f"cpu_cores={usage.available_cpu_cores} memory_mb={usage.available_memory_mb} (limits "
                f"cpu_cores={self.limit_cpu_cores} memory_mb={self.limit_memory_mb}, in use "
                f"cpu_cores={usage.used_cpu_cores} memory_mb={usage.used_memory_mb}); retry later or elsewhere")
        self._used_cpu += cpu_cores
        self._used_memory += memory_mb
        self._publish()
        return Reservation(self, cpu_cores, memory_mb)

    def _give_back(self, reservation: Reservation) -> None:
        self._used_cpu -= reservation.cpu_cores
        self._used_memory -= reservation.memory_mb
        self._publish()

    def _publish(self) -> None:
        RESERVED_CPU.set(self._used_cpu)
        RESERVED_MEMORY.set(self._used_memory)
