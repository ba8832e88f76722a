"""How afsd may talk to registries: plain-HTTP exceptions, mirrors, credentials, retry and timeouts.

Built once from command-line options (`RegistryConfig.from_options`) and handed to the
`RegistryClient`. Credentials are bound to one exact host: the client asks `credential_for` with the
host it is about to contact, so a mirror never sees the origin's password and vice versa.

Docker config files: `RegistryConfig(docker_config=None)` reads no file at all (library users and
tests see no ambient credentials); `from_options(docker_config=None)`, the user-facing constructor,
follows Docker's lookup: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, if it exists.
Only inline `auths` entries are used (`auth`, `username`/`password`, `identitytoken`); credential
helpers (`credsStore`, `credHelpers`) are not run.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from afsd.errors import AfsdError, InvalidReferenceError
from afsd.oci.reference import canonical_registry, is_valid_host


@dataclass(frozen=True)
class Credential:
    """A login for one registry host.

    `token` is a Docker identity token (config.json `identitytoken`): an OAuth2 refresh token that
    the client exchanges at the registry's token server for an access token, instead of sending
    username and password.
    """

    username: str = ""
    password: str = ""
    token: str = ""

    def __repr__(self) -> str:  # never print secrets in logs or tracebacks
        return (f"Credential(username={self.username!r}, password=<{len(self.password)} chars>, "
                f"token=<{len(self.token)} chars>)")


def _host_from_config_key(key: str) -> str:
    """`https://index.docker.io/v1/` -> `docker.io`; `http://host:5000/v2/` -> `host:5000`."""
    key = key.strip()
    if "://" in key:
        key = key.split("://", 1)[1]
    return canonical_registry(key.split("/", 1)[0])


def default_docker_config_path() -> Path | None:
    """Docker's own lookup: `$DOCKER_CONFIG/config.json`, then `~/.docker/config.json`."""
    directory = os.environ.get("DOCKER_CONFIG")
    candidate = Path(directory) / "config.json" if directory else Path.home() / ".docker" / "config.json"
    return candidate if candidate.is_file() else None


def read_docker_config(path: Path) -> dict[str, Credential]:
    """The inline credentials of a Docker config.json, by canonical host."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise AfsdError(f"Docker config {path} does not exist (check --docker-config)") from None
    except (OSError, ValueError) as exc:
        raise AfsdError(f"cannot read Docker config {path}: {exc}") from None
    auths = document.get("auths") if isinstance(document, dict) else None
    if auths is None:
        return {}
    if not isinstance(auths, dict):
        raise AfsdError(f"Docker config {path}: 'auths' must be an object")
    credentials: dict[str, Credential] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            raise AfsdError(f"Docker config {path}: entry {key!r} must be an object")
        username = str(entry.get("username") or "")
        password = str(entry.get("password") or "")
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise AfsdError(f"Docker config {path}: 'auth' of {key!r} is not base64 of user:password") from None
            username, sep, password = decoded.partition(":")
            if not sep:
                raise AfsdError(f"Docker config {path}: 'auth' of {key!r} is not base64 of user:password")
        credential = Credential(username, password, str(entry.get("identitytoken") or ""))
        if credential != Credential():
            credentials[_host_from_config_key(key)] = credential
    return credentials


def _check_host(text: str, what: str) -> str:
    host = text.strip()
    if not is_valid_host(host):
        raise InvalidReferenceError(f"invalid {what} {text!r}: expected HOST or HOST:PORT, without scheme or path")
    return canonical_registry(host)


@dataclass
class RegistryConfig:
    """Registry access settings; see the module docstring for how credentials are found."""

    insecure_hosts: frozenset[str] = frozenset()
    mirrors: dict[str, list[str]] = field(default_factory=dict)
    credentials: dict[str, Credential] = field(default_factory=dict)
    docker_config: Path | None = None
    max_attempts: int = 4
    backoff_base: float = 0.2
    connect_timeout: float = 10
    read_timeout: float = 60
    _docker_credentials: dict[str, Credential] | None = field(default=None, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def is_insecure(self, host: str) -> bool:
        """Whether plain HTTP is allowed to `host[:port]`: listed with that port, or listed without one."""
        host = canonical_registry(host)
        insecure = {canonical_registry(h) for h in self.insecure_hosts}
        return host in insecure or _strip_port(host) in insecure

    def mirrors_for(self, registry: str) -> list[str]:
        for key, hosts in self.mirrors.items():
            if canonical_registry(key) == canonical_registry(registry):
                return [canonical_registry(h) for h in hosts]
        return []

    def load_docker_config(self) -> dict[str, Credential]:
        """Read the Docker config once (blocking file I/O: async callers run this in a thread)."""
        with self._lock:
            if self._docker_credentials is None:
                self._docker_credentials = read_docker_config(self.docker_config) if self.docker_config else {}
            return self._docker_credentials

    def credential_for(self, host: str) -> Credential | None:
        """The credential for exactly this `host[:port]`: explicit ones first, then the Docker config."""
        host = canonical_registry(host)
        for key, credential in self.credentials.items():
            if canonical_registry(key) == host:
                return credential
        return self.load_docker_config().get(host)

    @classmethod
    def from_options(cls, *, insecure: list[str], mirrors: list[str], auth: list[str],
                     docker_config: str | None) -> "RegistryConfig":
        """Build from `--insecure-registry HOST[:PORT]`, `--registry-mirror REGISTRY=MIRROR[,MIRROR]`,
        `--registry-auth HOST=USER:PASSWORD` and `--docker-config PATH` (see the module docstring)."""
        insecure_hosts = frozenset(_check_host(h, "--insecure-registry host") for h in insecure)
        mirror_map: dict[str, list[str]] = {}
        for option in mirrors:
            registry, sep, hosts = option.partition("=")
            if not sep or not hosts.strip():
                raise InvalidReferenceError(
                    f"invalid --registry-mirror {option!r}: expected REGISTRY=MIRROR[,MIRROR], "
                    "e.g. docker.io=127.0.0.1:5001")
            key = _check_host(registry, "--registry-mirror registry")
            mirror_map.setdefault(key, []).extend(
                _check_host(h, "--registry-mirror mirror") for h in hosts.split(","))
        credentials: dict[str, Credential] = {}
        for option in auth:
            host, sep, userpass = option.partition("=")
            username, colon, password = userpass.partition(":")
            if not sep or not colon or not username:
                raise InvalidReferenceError(
                    f"invalid --registry-auth for {host.strip() or option!r}: expected HOST=USER:PASSWORD")
            credentials[_check_host(host, "--registry-auth host")] = Credential(username, password)
        if docker_config is None:
            config_path = default_docker_config_path()
        else:
            config_path = Path(docker_config).expanduser()
            if not config_path.is_file():
                raise AfsdError(f"Docker config {config_path} does not exist (check --docker-config)")
        return cls(insecure_hosts=insecure_hosts, mirrors=mirror_map, credentials=credentials,
                   docker_config=config_path)


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host[: host.index("]") + 1]
    return host.rsplit(":", 1)[0] if ":" in host else host
