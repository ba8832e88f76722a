"""What to run: the request's command and env merged with the image's runtime config, the way
`docker run` does it.

- args: the image's Entrypoint followed by the request's command; without a command, Entrypoint + Cmd.
- env: the image's Env, each request `KEY=VALUE` replacing the same key in place or appended; PATH gets
  Docker's default when neither sets it (HOME is added later, from the user's passwd entry).
- working dir: the image's WorkingDir, `/` when empty, made absolute.
- user: the image's User (resolved against the rootfs by users.py once it is mounted).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from afsd.afslet.errors import SetupError
from afsd.afslet.request import ExecuteSpec
from afsd.api import discovery_pb2 as dpb

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ProcessPlan:
    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    user: str


def merge_env(image_env: list[str], request_env: list[str]) -> list[str]:
    """Request entries override image entries of the same key (in the image's position)."""
    merged: list[str] = []
    position: dict[str, int] = {}
    for entry in [*image_env, *request_env]:
        key = entry.partition("=")[0]
        if key in position:
            merged[position[key]] = entry
        else:
            position[key] = len(merged)
            merged.append(entry)
    return merged


def with_default(env: list[str], key: str, value: str) -> list[str]:
    if any(entry.partition("=")[0] == key for entry in env):
        return env
    return [*env, f"{key}={value}"]


def plan_process(spec: ExecuteSpec, config: dpb.ImageRuntimeConfig) -> ProcessPlan:
    entrypoint, cmd = list(config.entrypoint), list(config.cmd)
    args = entrypoint + (list(spec.command) if spec.command else cmd)
    if not args:
        raise SetupError(f"no command to run: the request has none and image {spec.reference} has neither "
                         "Entrypoint nor Cmd")
    image_env = [entry for entry in config.env if "=" in entry]
    env = with_default(merge_env(image_env, list(spec.env)), "PATH", DEFAULT_PATH)
    cwd = posixpath.normpath("/" + config.working_dir.lstrip("/")) if config.working_dir else "/"
    return ProcessPlan(args=tuple(args), env=tuple(env), cwd=cwd, user=config.user)
