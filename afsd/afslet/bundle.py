"""The OCI runtime bundle (config.json) runc runs: one container per Execute call.

Terminal off (stdout/stderr are pipes to afslet), an absolute `linux.cgroupsPath` (runc 1.1 on this
host's hybrid cgroups needs it), CPU quota = cores x 100 ms per 100 ms period, a memory limit, a pids
limit, and Docker's isolation: its default capability set less CAP_NET_RAW (unless the afslet keeps it),
`noNewPrivileges`, its default seccomp profile (seccomp.py), its masked and read-only paths; a
resolv.conf bind-mounted read-only. Namespaces: mount, pid, ipc, uts; network: the host's (`--network
host`) or a new one runc creates (`none`: loopback only; `bridge`: afslet attaches it to its bridge
between `runc create` and `runc start`); user: with `--userns`, container ids 0..size-1 are host ids
start..start+size-1.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from afsd.afslet.seccomp import runtime_seccomp
from afsd.afslet.users import ExecUser

CPU_PERIOD_US = 100_000
HOSTNAME = "afslet"

# Docker's default capabilities (moby oci/caps/defaults.go).
DEFAULT_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
# Docker's (moby daemon/pkg/oci/defaults.go), including the per-CPU thermal_throttle directories it adds.
MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/sched_debug", "/proc/scsi", "/proc/timer_list", "/proc/timer_stats", "/sys/devices/virtual/powercap",
    "/sys/firmware",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def masked_paths() -> list[str]:
    return MASKED_PATHS + sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/thermal_throttle"))


@dataclass(frozen=True)
class IdMap:
    """A user namespace's mapping: container ids 0..size-1 are host ids host_start..host_start+size-1."""

    host_start: int
    size: int

    def to_host(self, container_id: int) -> int:
        return self.host_start + container_id

    def to_container(self, host_id: int) -> int | None:
        offset = host_id - self.host_start
        return offset if 0 <= offset < self.size else None


@dataclass(frozen=True)
class BindMount:
    """A host directory every container of the afslet sees (`afsd let --bind SRC:DST[:ro]`)."""

    source: Path
    destination: str
    read_only: bool = False


@dataclass(frozen=True)
class Isolation:
    """What the afslet's flags make of every container: its network namespace, user namespace, NET_RAW."""

    own_network: bool = True           # False: the host's network namespace (`--network host`)
    id_map: IdMap | None = None        # `--userns`
    net_raw: bool = False              # keep CAP_NET_RAW (`--allow-net-raw`)

    @property
    def capabilities(self) -> list[str]:
        return [cap for cap in DEFAULT_CAPABILITIES if self.net_raw or cap != "CAP_NET_RAW"]


@dataclass(frozen=True)
class ContainerLimits:
    cpu_cores: int
    memory_mb: int
    pids: int


def oci_config(*, rootfs: Path, args: list[str], env: list[str], cwd: str, user: ExecUser, cgroups_path: str,
               limits: ContainerLimits, isolation: Isolation, resolv_conf: Path | None,
               binds: tuple[BindMount, ...] = ()) -> dict[str, object]:
    capabilities = isolation.capabilities
    mounts: list[dict[str, object]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]
    if resolv_conf is not None:
        mounts.append({"destination": "/etc/resolv.conf", "type": "bind", "source": str(resolv_conf),
                       "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]})
    for bind in binds:
        mounts.append({"destination": bind.destination, "type": "bind", "source": str(bind.source),
                       "options": ["rbind", "nosuid", "nodev", *(["ro"] if bind.read_only else [])]})
    namespaces = [{"type": "mount"}, {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}]
    if isolation.own_network:
        namespaces.append({"type": "network"})
    id_mappings: dict[str, object] = {}
    if isolation.id_map is not None:
        namespaces.append({"type": "user"})
        mapping = [{"containerID": 0, "hostID": isolation.id_map.host_start, "size": isolation.id_map.size}]
        id_mappings = {"uidMappings": mapping, "gidMappings": mapping}
    process: dict[str, object] = {
        "terminal": False,
        "user": {"uid": user.uid, "gid": user.gid,
                 **({"additionalGids": list(user.additional_gids)} if user.additional_gids else {})},
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": {key: capabilities for key in ("bounding", "effective", "permitted")},
        "noNewPrivileges": True,
    }
    return {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": HOSTNAME,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": {
                "cpu": {"quota": limits.cpu_cores * CPU_PERIOD_US, "period": CPU_PERIOD_US},
                "memory": {"limit": limits.memory_mb * 1024 * 1024},
                "pids": {"limit": limits.pids},
                "devices": [{"allow": False, "access": "rwm"}],
            },
            "namespaces": namespaces,
            **id_mappings,
            "maskedPaths": masked_paths(),
            "readonlyPaths": READONLY_PATHS,
            "seccomp": runtime_seccomp(capabilities),
        },
    }


def write_bundle(bundle: Path, config: dict[str, object]) -> Path:
    bundle.mkdir(parents=True, exist_ok=True)
    path = bundle / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path
