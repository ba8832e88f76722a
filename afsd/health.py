"""Health of a daemon process, answered on its metrics listener: `GET /healthz` and `GET /readyz`.

Kubernetes probes (deploy/kubernetes/) and operators read these; every daemon gets them with its
`--metrics-listen` (the proxy on its `--http-listen`). One state per process, set in one place: the
shared serve loop (`afsd.rpc.run_until_signalled`, and afslet's own drain) marks it serving once the
gRPC server accepts calls and draining at SIGTERM.

- `/healthz` (liveness): 200 while the daemon's event loop runs a callback within `LOOP_TIMEOUT`
  seconds; 503 when the loop is wedged (a blocking call, a deadlock) or the daemon has stopped. It does
  not depend on peers: a daemon whose discovery is down is alive, and restarting it would not help.
- `/readyz` (readiness): 200 while serving; 503 while starting or draining, with the state in the body.
"""

from __future__ import annotations

import asyncio
import enum
import threading
from collections.abc import Callable, Iterable
from typing import Any

LOOP_TIMEOUT = 2.0


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class Health:
    """This process's daemon state and the event loop that serves it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = State.STARTING
        self._loop: asyncio.AbstractEventLoop | None = None

    def serving(self) -> None:
        """The daemon accepts calls (call from its event loop)."""
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self.state = State.SERVING

    def draining(self) -> None:
        with self._lock:
            self.state = State.DRAINING

    def stopped(self) -> None:
        with self._lock:
            self.state, self._loop = State.STOPPED, None

    def live(self) -> tuple[bool, str]:
        """(alive, why): the event loop answers, or the daemon is still starting (no loop yet to check)."""
        with self._lock:
            state, loop = self.state, self._loop
        if state is State.STOPPED:
            return False, "stopped"
        if loop is None or loop.is_closed():
            return True, state.value
        answered = threading.Event()
        try:
            loop.call_soon_threadsafe(answered.set)
        except RuntimeError:  # closed meanwhile
            return False, "event loop closed"
        if not answered.wait(LOOP_TIMEOUT):
            return False, f"event loop did not answer within {LOOP_TIMEOUT:g} s"
        return True, state.value

    def ready(self) -> tuple[bool, str]:
        return self.state is State.SERVING, self.state.value


HEALTH = Health()

PATHS = ("/healthz", "/readyz")


def answer(path: str, health: Health = HEALTH) -> tuple[int, bytes]:
    """(HTTP status, body) for `/healthz` or `/readyz`."""
    ok, why = health.live() if path == "/healthz" else health.ready()
    return (200 if ok else 503), f"{'ok' if ok else 'not ok'}: {why}\n".encode()


def wsgi_app(metrics_app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """`metrics_app` (Prometheus' WSGI app) with `/healthz` and `/readyz` in front of it."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in PATHS:
            code, body = answer(path)
            start_response(f"{code} {'OK' if code == 200 else 'Service Unavailable'}",
                           [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
            return [body]
        return metrics_app(environ, start_response)

    return app
