"""The `start` frame of an Execute call, validated into an `ExecuteSpec`.

Where it sits: the first thing `session.py` does with a call. Everything a client can get wrong in
`start` is found here and reported as one `RequestError` (INVALID_ARGUMENT) naming the field.
Fields the reference used for its own in-process FUSE mount or its proxy (`fuse_max_read_ahead_bytes`,
`force_local_fetch`, `node_id`, `proxy_dispatch_*`, `discovery_addr`) are accepted and ignored: this
afslet mounts through the node daemon, which uses its own discovery.
"""

from __future__ import annotations

from dataclasses import dataclass

from afsd.afslet.errors import RequestError
from afsd.api import afslet_pb2 as pb
from afsd.errors import InvalidReferenceError
from afsd.oci.platform import Platform, parse_platform
from afsd.oci.reference import ImageReference, parse_reference


@dataclass(frozen=True)
class TimeoutPolicy:
    default_ms: int
    max_ms: int


@dataclass(frozen=True)
class RequestBounds:
    """How long and how big one Execute call may be (`afsd let --first-frame-timeout` ...)."""

    first_frame_timeout: float = 30.0      # seconds from the call's start to its start frame
    upload_timeout: float = 600.0          # seconds from `accepted` to the client's half-close
    max_extra_bytes: int = 1 << 30         # bytes of extra files in one call
    max_extra_entries: int = 100_000       # extra-file entries in one call
    max_upper_bytes: int = 1 << 30         # bytes the writable layer's files may hold to be returned


@dataclass(frozen=True)
class ExecuteSpec:
    reference: ImageReference
    platform: Platform
    command: tuple[str, ...]
    env: tuple[str, ...]
    cpu_cores: int
    memory_mb: int
    timeout_ms: int
    timeout_is_default: bool
    gpus: int = 0


def resource_problem(start: pb.StartRequest) -> str | None:
    """What is wrong with the resources a start frame asks for, or None (checked by the proxy too,
    before it places the call)."""
    if start.cpu_cores <= 0:
        return f"start.cpu_cores must be a whole number > 0 (got {start.cpu_cores})"
    if start.memory_mb <= 0:
        return f"start.memory_mb must be > 0 (got {start.memory_mb})"
    if start.gpus < 0:
        return f"start.gpus must be >= 0 (got {start.gpus})"
    return None


def _check_strings(values: list[str], field: str) -> None:
    for value in values:
        if "\x00" in value:
            raise RequestError(f"start.{field} entry {value!r} contains a NUL byte")


def parse_start(start: pb.StartRequest, timeouts: TimeoutPolicy) -> ExecuteSpec:
    if not start.image.strip():
        raise RequestError("start.image is required")
    try:
        reference = parse_reference(start.image, start.tag or None)
        platform = parse_platform(os=start.platform_os, architecture=start.platform_arch,
                                  variant=start.platform_variant)
    except InvalidReferenceError as error:
        raise RequestError(str(error)) from None
    if problem := resource_problem(start):
        raise RequestError(problem)
    if start.timeout_ms < 0:
        raise RequestError(f"start.timeout_ms must be >= 0 (got {start.timeout_ms}; 0 means the server default "
                           f"of {timeouts.default_ms} ms)")
    if start.timeout_ms > timeouts.max_ms:
        raise RequestError(f"start.timeout_ms {start.timeout_ms} exceeds this afslet's maximum of "
                           f"{timeouts.max_ms} ms")
    if start.fuse_max_read_ahead_bytes < 0:
        raise RequestError(f"start.fuse_max_read_ahead_bytes must be >= 0 (got {start.fuse_max_read_ahead_bytes})")
    command, env = list(start.command), list(start.env)
    _check_strings(command, "command")
    _check_strings(env, "env")
    for entry in env:
        key, sep, _ = entry.partition("=")
        if not sep or not key:
            raise RequestError(f"start.env entry {entry!r} is not KEY=VALUE")
    timeout_ms = start.timeout_ms or timeouts.default_ms
    return ExecuteSpec(reference=reference, platform=platform, command=tuple(command), env=tuple(env),
                       cpu_cores=start.cpu_cores, memory_mb=start.memory_mb, timeout_ms=timeout_ms,
                       timeout_is_default=start.timeout_ms == 0, gpus=start.gpus)
