"""A throwaway cluster CA for the demo and the tests: certificates made on first use, in a work dir."""

from __future__ import annotations

from pathlib import Path

from afsd.trust.certs import init_ca, issue
from afsd.trust.identity import NODE_ROLE, USER_ROLE


class LabPki:
    """The CA lives in `root`; `node`/`user` return a `--tls-dir` (ca.crt, tls.crt, tls.key)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        if not (root / "ca.crt").exists():
            init_ca(root)

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    def node(self, name: str, *hosts: str) -> Path:
        """A node certificate for `name` covering `hosts` (default 127.0.0.1), in ROOT/NAME."""
        return self._issue(self.root / name, name, NODE_ROLE, list(hosts) or ["127.0.0.1"])

    def user(self, name: str) -> Path:
        """A user certificate for `name`, in ROOT/users/NAME."""
        return self._issue(self.root / "users" / name, name, USER_ROLE, [])

    def _issue(self, out: Path, name: str, role: str, hosts: list[str]) -> Path:
        if not (out / "tls.crt").exists():
            issue(self.root, name, role=role, hosts=hosts, out=out)
        return out
