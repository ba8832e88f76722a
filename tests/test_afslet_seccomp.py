"""Docker's default seccomp profile, resolved for a container the way Docker resolves it (capabilities,
architecture, kernel version), plus afsd's one amendment (ptrace needs CAP_SYS_PTRACE)."""

from __future__ import annotations

from afsd.afslet.bundle import DEFAULT_CAPABILITIES, Isolation
from afsd.afslet.seccomp import runtime_seccomp


def _allowed(seccomp: dict) -> set[str]:
    return {name for rule in seccomp["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" and "args" not in rule
            for name in rule["names"]}


def test_the_default_capabilities_get_dockers_rules() -> None:
    caps = Isolation().capabilities
    assert "CAP_NET_RAW" not in caps and len(caps) == len(DEFAULT_CAPABILITIES) - 1
    seccomp = runtime_seccomp(caps, machine="x86_64", kernel=(6, 18))
    assert seccomp["defaultAction"] == "SCMP_ACT_ERRNO" and seccomp["defaultErrnoRet"] == 1
    assert seccomp["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    allowed = _allowed(seccomp)
    assert {"read", "write", "execve", "chroot", "arch_prctl", "modify_ldt"} <= allowed
    for refused in ("mount", "unshare", "setns", "init_module", "finit_module", "bpf", "keyctl", "ptrace",
                    "process_vm_readv", "reboot", "kexec_load", "open_by_handle_at"):
        assert refused not in allowed, refused
    (clone3,) = [r for r in seccomp["syscalls"] if r["names"] == ["clone3"]]
    assert clone3 == {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}  # ENOSYS: libc falls back
    (clone,) = [r for r in seccomp["syscalls"] if r["names"] == ["clone"]]
    assert clone["args"][0]["op"] == "SCMP_CMP_MASKED_EQ"  # no namespace flags


def test_capabilities_and_architectures_switch_rules_as_in_docker() -> None:
    with_admin = _allowed(runtime_seccomp([*Isolation().capabilities, "CAP_SYS_ADMIN", "CAP_SYS_PTRACE"],
                                          machine="x86_64", kernel=(6, 18)))
    assert {"mount", "unshare", "setns", "clone3", "ptrace", "process_vm_readv"} <= with_admin
    arm = runtime_seccomp(Isolation().capabilities, machine="aarch64", kernel=(6, 18))
    assert arm["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert "arch_prctl" not in _allowed(arm)
