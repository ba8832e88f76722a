"""TCP ports the lab launchers hold for the daemons they start, so no other process can take them.

Picking a port by binding to port 0, closing it and passing the number on is a race: until the daemon
binds it, any outgoing connection on the machine may get that port as its ephemeral source port. Here the
launcher keeps a socket bound to the port (never listening, so connections to it are refused until the
daemon listens) for as long as the daemon may need it, restarts included. The socket has SO_REUSEPORT
and SO_REUSEADDR set, so the daemon can still bind the same port: gRPC servers bind with SO_REUSEPORT,
asyncio's and Python's HTTP servers with SO_REUSEADDR. The kernel never hands a held port to bind(0) or
to connect().

Daemons that need no fixed port get `HOST:0` instead and report what they bound (afsd/readiness.py).
"""

from __future__ import annotations

import socket


class PortReservation:
    """A TCP port held on one address; `close()` gives it back."""

    def __init__(self, host: str, port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._socket.bind((host, port))
        except OSError:
            self._socket.close()
            raise
        self.host = host
        self.port: int = self._socket.getsockname()[1]

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reserve_port(host: str = "127.0.0.1") -> PortReservation:
    """A free port on `host`, held until closed."""
    return PortReservation(host)


def reserve_shared_port(hosts: list[str], attempts: int = 50) -> list[PortReservation]:
    """One port held on every address of `hosts` (daemons behind one DNS name share a port)."""
    for _ in range(attempts):
        first = PortReservation(hosts[0])
        held = [first]
        try:
            for host in hosts[1:]:
                held.append(PortReservation(host, first.port))
        except OSError:
            for reservation in held:
                reservation.close()
            continue
        return held
    raise OSError(f"found no port free on all of {', '.join(hosts)} in {attempts} attempts")
