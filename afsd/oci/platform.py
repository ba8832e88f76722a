"""Platforms (os/architecture/variant) and choosing one manifest out of an image index."""

from __future__ import annotations

import platform as _host_platform
from dataclasses import dataclass

from afsd.errors import InvalidReferenceError

_MACHINE_TO_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
                    "armv7l": "arm", "i686": "386", "i386": "386", "ppc64le": "ppc64le",
                    "s390x": "s390x", "riscv64": "riscv64"}
# Variants that an index may leave out for these architectures (containerd's normalisation).
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text

    def matches(self, other: "Platform") -> bool:
        """Whether an index entry `other` satisfies this requested platform."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        if not self.variant:
            return True
        default = _DEFAULT_VARIANT.get(self.architecture, "")
        return (other.variant or default) == self.variant


def host_platform() -> Platform:
    machine = _host_platform.machine().lower()
    return Platform("linux", _MACHINE_TO_ARCH.get(machine, machine))


def parse_platform(text: str | None = None, *, os: str = "", architecture: str = "",
                   variant: str = "") -> Platform:
    """`linux/arm64/v8` or separate fields (the wire protocols' platform_os/arch/variant).

    Missing parts default to linux and the host's architecture.
    """
    if text:
        parts = text.strip().split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise InvalidReferenceError(f"invalid platform {text!r}: expected os/arch[/variant]")
        os, architecture = parts[0], parts[1]
        variant = parts[2] if len(parts) == 3 else ""
    host = host_platform()
    return Platform((os or host.os).strip().lower(),
                    (architecture or host.architecture).strip().lower(),
                    variant.strip().lower())
