"""A real OCI registry (Debian's `docker-registry`, distribution 2.8) run as a local process.

Used by `afsd demo` and by the tests: one process per registry, filesystem storage under a
directory of the caller's, listening on a loopback port it picks itself (`:0`, read back from its log:
no port is chosen for it and raced for), with optional htpasswd or bearer-token auth. The registry's
JSON log is kept so callers can count which blobs were fetched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from afsd.errors import AfsdError, MissingToolError
from afsd.lab import deadlines
from afsd.lab.processes import terminate

REGISTRY_BINARY = "docker-registry"


@dataclass(frozen=True)
class TokenAuth:
    """Settings of distribution's `auth.token` section (a token server must issue matching JWTs)."""

    realm: str
    service: str
    issuer: str
    root_cert_bundle: Path


@dataclass(frozen=True)
class HtpasswdAuth:
    htpasswd_file: Path
    realm: str = "afsd-test"


@dataclass
class AccessLogEntry:
    method: str
    uri: str
    status: int


@dataclass
class RegistryProcess:
    """A running `docker-registry`. Stop it with `stop()` (or use it as a context manager)."""

    root: Path
    host: str
    port: int
    process: subprocess.Popen
    log_path: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        """`host:port`, the registry part of image references pushed here."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def access_log(self) -> list[AccessLogEntry]:
        """Every request the registry has completed so far, in order."""
        entries: list[AccessLogEntry] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            # Error answers (404, 401, ...) are logged as "response completed with error".
            if not str(record.get("msg", "")).startswith("response completed") or "http.request.uri" not in record:
                continue
            entries.append(AccessLogEntry(record["http.request.method"], record["http.request.uri"],
                                          int(record.get("http.response.status", 0))))
        return entries

    def blob_fetches(self, digest: str) -> int:
        """How many successful GETs of the blob `digest` the registry served."""
        suffix = f"/blobs/{digest}"
        return sum(1 for e in self.access_log()
                   if e.method == "GET" and e.uri.endswith(suffix) and 200 <= e.status < 400)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        terminate(self.process, 10)

    def __enter__(self) -> "RegistryProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _config(root: Path, addr: str, auth: TokenAuth | HtpasswdAuth | None) -> dict:
    config: dict = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")},
                    "delete": {"enabled": True}},
        "http": {"addr": addr, "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }
    if isinstance(auth, HtpasswdAuth):
        config["auth"] = {"htpasswd": {"realm": auth.realm, "path": str(auth.htpasswd_file)}}
    elif isinstance(auth, TokenAuth):
        config["auth"] = {"token": {"realm": auth.realm, "service": auth.service,
                                    "issuer": auth.issuer,
                                    "rootcertbundle": str(auth.root_cert_bundle)}}
    return config


class RegistryStartError(AfsdError):
    pass


_LISTENING = re.compile(r'"msg":"listening on ([^"]+)"')


def _bound_address(log_path: Path) -> str | None:
    match = _LISTENING.search(log_path.read_text(errors="replace"))
    return match.group(1) if match else None


def start_registry(root: Path, *, auth: TokenAuth | HtpasswdAuth | None = None,
                   host: str = "127.0.0.1", port: int = 0, startup_timeout: float = deadlines.REGISTRY_START,
                   prefix: Sequence[str] = ()) -> RegistryProcess:
    """Start `docker-registry` storing under `root` and return once it listens (it logs the address it
    bound). On this machine's network it picks its own port (`port` 0); `prefix` runs it elsewhere (e.g.
    `nsenter --net=...` into a namespace of the caller's, whose `host` and `port` are the caller's own)."""
    binary = shutil.which(REGISTRY_BINARY)
    if binary is None:
        raise MissingToolError(
            f"{REGISTRY_BINARY} is not installed; run scripts/setup.sh (Debian package docker-registry)"
        )
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "config.json"  # YAML is a superset of JSON
    config_path.write_text(json.dumps(_config(root, f"{host}:{port}", auth), indent=2))
    log_path = root / "registry.log"
    log_path.unlink(missing_ok=True)
    log = open(log_path, "ab")
    try:
        process = subprocess.Popen([*prefix, binary, "serve", str(config_path)], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env={**os.environ, "OTEL_TRACES_EXPORTER": "none"})
    finally:
        log.close()
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        address = _bound_address(log_path)
        if address is not None:
            _, _, port = address.rpartition(":")
            return RegistryProcess(root=root, host=host, port=int(port), process=process, log_path=log_path)
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise RegistryStartError(f"docker-registry exited with code {process.returncode} at start-up: "
                                     f"{tail[0]} (log {log_path})")
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RegistryStartError(f"docker-registry did not report listening within {startup_timeout:.0f}s (log {log_path})")
