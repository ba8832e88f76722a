"""The OCI runtime bundle (config.json) runc runs: one container per Execute call.

Terminal off (stdout/stderr are pipes to afslet), an absolute `linux.cgroupsPath` (runc 1.1 on this
host's hybrid cgroups needs it), CPU quota = cores x 100 ms per 100 ms period, a memory limit, a pids
limit, Docker's default capability set, masked and read-only /proc paths, and the host's
/etc/resolv.conf bind-mounted read-only. Namespaces: mount, pid, ipc, uts; the network namespace is
the host's unless the afslet runs with `--network none` (then a private one with only loopback).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from afsd.afslet.users import ExecUser

CPU_PERIOD_US = 100_000
HOSTNAME = "afslet"

# Docker's default capabilities (moby oci/caps/defaults.go).
DEFAULT_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
MASKED_PATHS = [
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


@dataclass(frozen=True)
class ContainerLimits:
    cpu_cores: int
    memory_mb: int
    pids: int


def oci_config(*, rootfs: Path, args: list[str], env: list[str], cwd: str, user: ExecUser, cgroups_path: str,
               limits: ContainerLimits, private_network: bool, resolv_conf: Path | None) -> dict[str, object]:
    capabilities = list(DEFAULT_CAPABILITIES)
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
    namespaces = [{"type": "mount"}, {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}]
    if private_network:
        namespaces.append({"type": "network"})
    process: dict[str, object] = {
        "terminal": False,
        "user": {"uid": user.uid, "gid": user.gid,
                 **({"additionalGids": list(user.additional_gids)} if user.additional_gids else {})},
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": {key: capabilities for key in ("bounding", "effective", "permitted")},
        "noNewPrivileges": False,
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
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }


def write_bundle(bundle: Path, config: dict[str, object]) -> Path:
    bundle.mkdir(parents=True, exist_ok=True)
    path = bundle / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path
