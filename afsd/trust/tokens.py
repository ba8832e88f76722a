"""Bearer tokens: how users authenticate to a proxy that serves them without client certificates.

gRPC Python can either require a client certificate or not ask for one at all (no "optional"), so a
port is one or the other: with `afsd proxy --user-token-file FILE` the proxy's port is server-side TLS
only and every call must carry `authorization: Bearer TOKEN` with a token from FILE (one `NAME TOKEN`
per line, `#` comments). Clients that can send call metadata use it (`afsd run --token-file`, gRPC's
access-token call credentials, a grpclib `SendRequest` hook for afs-sdk: docs/security.md).
"""

from __future__ import annotations

import hmac
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from afsd.errors import UsageError

MIN_TOKEN_LENGTH = 16


class BearerTokens:
    def __init__(self, holders: dict[str, str]) -> None:
        """`holders`: token -> the name of whom it belongs to."""
        self._holders = holders

    @classmethod
    def load(cls, path: Path) -> "BearerTokens":
        try:
            info = path.stat()
            lines = path.read_text().splitlines()
        except OSError as error:
            raise UsageError(f"cannot read the token file {path}: {error.strerror}") from None
        if not token_file_mode_is_private(info.st_mode):
            raise UsageError(f"the token file {path} is open to others: chmod 600 {path} (or 640)")
        holders: dict[str, str] = {}
        for number, line in enumerate(lines, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2 or len(fields[1]) < MIN_TOKEN_LENGTH:
                raise UsageError(f"{path}:{number}: expected `NAME TOKEN` with a token of at least "
                                 f"{MIN_TOKEN_LENGTH} characters")
            holders[fields[1]] = fields[0]
        if not holders:
            raise UsageError(f"the token file {path} holds no token")
        return cls(holders)

    def holder(self, metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
        """The name the call's `authorization: Bearer TOKEN` belongs to, or None."""
        presented = next((value for key, value in metadata if key == "authorization"), None)
        if not isinstance(presented, str) or not presented.startswith("Bearer "):
            return None
        token = presented[len("Bearer "):].encode()
        found = None
        for known, name in self._holders.items():  # compare with every token, in constant time each
            if hmac.compare_digest(token, known.encode()):
                found = name
        return found


def token_file_mode_is_private(mode: int) -> bool:
    """Whether a token file with these mode bits is closed enough: no access for others, group read at
    most (a Kubernetes Secret volume gives a non-root reader its files through the pod's fsGroup, as
    root:fsGroup 0440)."""
    return not mode & (stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO)


def read_token(path: Path) -> str:
    """A client's token file: the token alone (surrounding white space ignored)."""
    try:
        token = path.read_text().strip()
    except OSError as error:
        raise UsageError(f"cannot read the token file {path}: {error.strerror}") from None
    if not token or any(c.isspace() for c in token):
        raise UsageError(f"the token file {path} must hold one token")
    return token


def token_file_default() -> Path | None:
    value = os.environ.get("AFSD_TOKEN_FILE")
    return Path(value) if value else None
