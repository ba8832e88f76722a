"""Docker's default seccomp profile, turned into the `linux.seccomp` section of a runc config.

The profile is kept as data, unchanged: `profiles/docker-seccomp-default.json` is moby's
`profiles/seccomp/default.json` (github.com/moby/profiles/seccomp v0.2.3, Apache-2.0, as vendored by
moby at commit 35797366d7cd). Its rules are conditional — on capabilities (`includes.caps` /
`excludes.caps`), architectures and kernel versions — and `runtime_seccomp` resolves them the way
Docker does (moby's `setupSeccomp`): for the container's bounding capability set, this machine's
architecture and the running kernel.

One afsd amendment, applied here and not in the data: `ptrace`, `process_vm_readv` and
`process_vm_writev` are allowed only with CAP_SYS_PTRACE (Docker allows them without it on kernels ≥ 4.8,
where seccomp can no longer be bypassed through ptrace). Code in an afslet container is untrusted and
often runs several processes under one uid; reading another process's memory is not something it needs.
Syscall names this runc's libseccomp does not know are skipped by runc itself.
"""

from __future__ import annotations

import json
import os
import platform
from functools import cache
from pathlib import Path

PROFILE = Path(__file__).with_name("profiles") / "docker-seccomp-default.json"
PTRACE_FAMILY = frozenset({"ptrace", "process_vm_readv", "process_vm_writev"})

# Python's machine name -> (Docker's architecture name in includes/excludes.arches, libseccomp's)
_ARCHES = {
    "x86_64": ("amd64", "SCMP_ARCH_X86_64"),
    "aarch64": ("arm64", "SCMP_ARCH_AARCH64"),
    "riscv64": ("riscv64", "SCMP_ARCH_RISCV64"),
    "s390x": ("s390x", "SCMP_ARCH_S390X"),
    "ppc64le": ("ppc64le", "SCMP_ARCH_PPC64LE"),
}


def _kernel_at_least(wanted: str, running: tuple[int, int]) -> bool:
    major, _, minor = wanted.partition(".")
    return running >= (int(major), int(minor or 0))


def running_kernel() -> tuple[int, int]:
    release = os.uname().release
    parts = release.split("-")[0].split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _applies(rule: dict, caps: frozenset[str], arch: str, kernel: tuple[int, int]) -> bool:
    excludes, includes = rule.get("excludes") or {}, rule.get("includes") or {}
    if arch in excludes.get("arches", ()) or caps & set(excludes.get("caps", ())):
        return False
    if excludes.get("minKernel") and _kernel_at_least(excludes["minKernel"], kernel):
        return False
    if includes.get("arches") and arch not in includes["arches"]:
        return False
    if not set(includes.get("caps", ())) <= caps:
        return False
    if includes.get("minKernel") and not _kernel_at_least(includes["minKernel"], kernel):
        return False
    return True


def _amended(rule: dict) -> dict:
    if set(rule.get("names", ())) & PTRACE_FAMILY and not (rule.get("includes") or {}).get("caps"):
        includes = {key: value for key, value in (rule.get("includes") or {}).items() if key != "minKernel"}
        return {**rule, "includes": {**includes, "caps": ["CAP_SYS_PTRACE"]}}
    return rule


@cache
def _profile() -> dict:
    return json.loads(PROFILE.read_text())


def runtime_seccomp(capabilities: list[str], *, machine: str | None = None,
                    kernel: tuple[int, int] | None = None) -> dict[str, object]:
    """The `linux.seccomp` object for a container whose bounding set is `capabilities`."""
    profile = _profile()
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise ValueError(f"no seccomp architecture known for {machine}")
    arch, seccomp_arch = _ARCHES[machine]
    kernel = kernel or running_kernel()
    caps = frozenset(capabilities)
    architectures: list[str] = []
    for entry in profile.get("archMap", ()):
        if entry["architecture"] == seccomp_arch:
            architectures = [entry["architecture"], *entry.get("subArchitectures", ())]
    syscalls = []
    for rule in map(_amended, profile["syscalls"]):
        if not _applies(rule, caps, arch, kernel):
            continue
        syscall: dict[str, object] = {"names": list(rule["names"]), "action": rule["action"]}
        if "errnoRet" in rule:
            syscall["errnoRet"] = rule["errnoRet"]
        if rule.get("args"):
            syscall["args"] = [{"index": a["index"], "value": a["value"], "valueTwo": a.get("valueTwo", 0),
                                "op": a["op"]} for a in rule["args"]]
        syscalls.append(syscall)
    seccomp: dict[str, object] = {"defaultAction": profile["defaultAction"], "architectures": architectures,
                                  "syscalls": syscalls}
    if "defaultErrnoRet" in profile:
        seccomp["defaultErrnoRet"] = profile["defaultErrnoRet"]
    return seccomp
