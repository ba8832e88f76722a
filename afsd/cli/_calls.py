"""Why a call from the command line to an afslet or a proxy (`--target`) failed, in one line.

The server's own answer (a refusal carries afsd.rpc.REFUSAL_KEY) is shown as it said it, whatever its
status: UNAVAILABLE from a proxy with no afslet that has room, or from a draining afslet, is not an
unreachable server. Only a call nothing answered is "cannot reach", with what to check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

    from afsd.trust.tls import TlsConfig


def call_failure(error: grpc.aio.AioRpcError, target: str, tls: TlsConfig | None) -> str:
    """The line to print for `error`, a call to `target` that failed (`tls`: the settings it was made with)."""
    from afsd.rpc import daemon_did_not_answer, failure_cause, unreachable_hint

    if daemon_did_not_answer(error):
        return (f"cannot reach {target}: {failure_cause(error.code(), error.details())}; is an afslet (afsd let) "
                "or a proxy listening there? (--target HOST:PORT)" + unreachable_hint(error, tls))
    return f"{target}: {error.details() or error.code().name}"
