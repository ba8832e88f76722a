"""afsd daemons run as real child processes on loopback: for `afsd demo` and the tests.

Each daemon is `python -m afsd <subcommand> ...` with its own log file, started in its own session so
it can be stopped (SIGTERM), killed (SIGKILL) and restarted with the same arguments, exactly as an
operator would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afsd.errors import AfsdError
from afsd.lab import deadlines
from afsd.lab.ports import PortReservation, reserve_port
from afsd.lab.processes import terminate
from afsd.readiness import read_ready


class DaemonError(AfsdError):
    """A daemon the lab started did not come up; the message is one line, `log_tail` the log's last lines."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


def log_tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").rstrip().splitlines()[-lines:])


def _last_words(tail: str) -> str:
    """The line of a log tail that says why a process stopped (the last one, skipping traceback noise)."""
    for line in reversed(tail.splitlines()):
        if line.strip() and not line.startswith((" ", "Traceback")):
            return line.strip()
    return "no output"


@dataclass
class Daemon:
    """One afsd daemon process; `start()` again after `stop()`/`kill()` restarts it as it was.

    Its gRPC port (if any) is held by `reservation` for the Daemon's whole life, so a restart gets the
    same port back; other listeners (metrics, HTTP) are `HOST:0` and read from the ready file (`ready`).
    """

    name: str
    args: list[str]
    host: str
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)  # e.g. unshare/ip netns exec, to run it elsewhere
    socket_path: Path | None = None                    # its control socket (`afsd node`: no TCP port)
    process: subprocess.Popen | None = None
    reservation: PortReservation | None = None        # holds `port` while this Daemon exists
    ready: dict[str, Any] = field(default_factory=dict)  # the daemon's ready file, once it serves

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def ready_path(self) -> Path:
        return self.log_path.with_name(f"{self.log_path.stem}.ready.json")

    def spawn(self) -> None:
        """Start the process without waiting for it to serve (see `start_all`)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.ready_path.unlink(missing_ok=True)
        self.ready = {}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "afsd", "--log-level", "info", *self.args,
                 "--ready-file", str(self.ready_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, **self.env})

    def wait_ready(self, timeout: float = deadlines.DAEMON_START) -> None:
        """Until the daemon has written its ready file; DaemonError if it exits first or hangs."""
        deadline = time.monotonic() + timeout
        while True:
            ready = read_ready(self.ready_path)
            if ready is not None:
                self.ready = ready
                return
            if self.process is not None and self.process.poll() is not None:
                tail = log_tail(self.log_path)
                raise DaemonError(f"{self.name} exited with code {self.process.returncode} while starting: "
                                  f"{_last_words(tail)} (log {self.log_path})", tail)
            if time.monotonic() > deadline:
                raise DaemonError(f"{self.name} did not report ready within {timeout:.0f}s (log {self.log_path})",
                                  log_tail(self.log_path))
            time.sleep(0.05)

    def start(self, timeout: float = deadlines.DAEMON_START) -> Daemon:
        self.spawn()
        try:
            self.wait_ready(timeout)
        except BaseException:
            stop_daemon(self, release=False)
            raise
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            assert self.process is not None
            os.kill(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing gets to clean up."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = deadlines.DAEMON_STOP) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout`); returns the exit code."""
        if self.process is None:
            return None
        return terminate(self.process, timeout)

    def release(self) -> None:
        """Give back the held port (after the last stop)."""
        if self.reservation is not None:
            self.reservation.close()
            self.reservation = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def with_hosts_file(hosts: Path) -> list[str]:
    """A `Daemon.prefix` that runs the daemon in a private mount namespace where `hosts` is /etc/hosts:
    the daemon's name lookups see those entries, nothing else on the machine does."""
    return _with_file_over(hosts, "/etc/hosts")


def with_resolv_conf(resolv_conf: Path) -> list[str]:
    """A `Daemon.prefix` that runs the daemon in a private mount namespace where `resolv_conf` is
    /etc/resolv.conf: its DNS lookups go to the name servers listed there (e.g. a test's dnsmasq)."""
    return _with_file_over(resolv_conf, "/etc/resolv.conf")


def _with_file_over(source: Path, target: str) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount --bind "$0" {target} && exec "$@"', str(source)]


def start_all(daemons: list[Daemon], timeout: float = deadlines.DAEMON_START) -> None:
    """Start daemons in parallel (each takes about a second to import and bind, more on a slow machine);
    if one fails, stop every one of them and raise its DaemonError."""
    try:
        for daemon in daemons:
            daemon.spawn()
        for daemon in daemons:
            daemon.wait_ready(timeout)
    except BaseException:
        for daemon in daemons:
            stop_daemon(daemon, release=False)
        raise


def _listening(host: str, listen: PortReservation | None) -> tuple[PortReservation, list[str]]:
    """The held port a daemon listens on (a fresh one unless the caller holds one) and its `--listen`."""
    reservation = listen or reserve_port(host)
    return reservation, ["--listen", reservation.address]


def _tls_args(tls_dir: Path | None) -> list[str]:
    return ["--tls-dir", str(tls_dir)] if tls_dir is not None else []


def _metrics(host: str, metrics: bool) -> list[str]:
    return ["--metrics-listen", f"[{host}]:0" if ":" in host else f"{host}:0"] if metrics else []


def discovery_daemon(workdir: Path, name: str, *, ttl: float = 30.0, registry_args: list[str] = (),
                     host: str = "127.0.0.1", metrics: bool = True, listen: PortReservation | None = None,
                     extra_args: list[str] = (), tls_dir: Path | None = None) -> Daemon:
    reservation, listen_args = _listening(host, listen)
    args = ["discovery", *listen_args, "--ttl", str(ttl), *registry_args, *_metrics(host, metrics), *extra_args,
            *_tls_args(tls_dir)]
    return Daemon(name, args, host, reservation.port, workdir / f"{name}.log", reservation=reservation)


def layerstore_daemon(workdir: Path, name: str, discovery: list[str], *, cache_max_bytes: int = 0,
                      heartbeat_period: float = 10.0, registry_args: list[str] = (),
                      host: str = "127.0.0.1", metrics: bool = True, listen: PortReservation | None = None,
                      extra_args: list[str] = (), tls_dir: Path | None = None) -> Daemon:
    reservation, listen_args = _listening(host, listen)
    args = ["layerstore", *listen_args, "--node-id", name,
            "--cache-dir", str(workdir / name / "cache"), "--heartbeat-period", str(heartbeat_period),
            "--admin-socket", str(workdir / name / "layerstore.sock"), *registry_args, *_tls_args(tls_dir)]
    for endpoint in discovery:
        args += ["--discovery-endpoint", endpoint]
    if cache_max_bytes:
        args += ["--cache-max-bytes", str(cache_max_bytes)]
    args += [*_metrics(host, metrics), *extra_args]
    return Daemon(name, args, host, reservation.port, workdir / f"{name}.log", reservation=reservation)


def node_daemon(workdir: Path, name: str, discovery: list[str], *, layerstore: Daemon | None = None,
                extra_args: list[str] = (), metrics: bool = True, host: str = "127.0.0.1",
                tls_dir: Path | None = None) -> Daemon:
    """`afsd node` with its state and socket under `workdir/name`; with `layerstore`, that layerstore is
    this node's own (read first, and given the blobs this node assembles)."""
    state = workdir / name
    socket_path = state / "node.sock"
    args = ["node", "--socket", str(socket_path), "--state-dir", str(state / "state"), "--node-id", name,
            *extra_args, *_tls_args(tls_dir)]
    for endpoint in discovery:
        args += ["--discovery-endpoint", endpoint]
    if layerstore is not None:
        args += ["--layerstore", layerstore.address,
                 "--layerstore-admin-socket", layerstore.args[layerstore.args.index("--admin-socket") + 1]]
    args += _metrics(host, metrics)
    return Daemon(name, args, host, 0, workdir / f"{name}.log", socket_path=socket_path)


def stop_node_daemon(node: Daemon) -> None:
    """Stop an `afsd node` daemon and what outlives it by design: unmount what it mounted (while it
    still answers), stop it, then shut down the backend supervisors it started (their keepers and
    workers with them). Without the last step every stopped node leaves its fanotify processes behind."""
    if node.running() and node.socket_path is not None:
        listed = afsd_command("mounts", "--socket", str(node.socket_path), "--json", timeout=deadlines.scaled(120))
        if listed.returncode == 0:
            for mount in json.loads(listed.stdout).get("mounts", []):
                afsd_command("umount", "--socket", str(node.socket_path), mount["target"],
                             timeout=deadlines.scaled(120))
    node.stop()
    state = Path(node.args[node.args.index("--state-dir") + 1])
    _in_fresh_thread(lambda: asyncio.run(_shutdown_supervisors(state)))


def stop_daemon(daemon: Daemon, *, release: bool = True) -> None:
    """Stop a daemon: `stop_node_daemon` for an `afsd node` daemon, a plain stop for the others; then,
    unless it may be started again (`release=False`), give back its port."""
    if daemon.args[:1] == ["node"]:
        stop_node_daemon(daemon)
    else:
        daemon.stop()
    if release:
        daemon.release()


async def _shutdown_supervisors(state: Path) -> None:
    from afsd.ondemand.cachefiles.client import FscacheClient
    from afsd.ondemand.fanotify.client import SupervisorClient
    if (state / "fanotify").exists():
        await SupervisorClient(state / "fanotify").shutdown(force=True)
    if (state / "fscache").exists():
        await FscacheClient(state / "fscache").shutdown(force=True)


def afsd_command(*args: str, timeout: float = deadlines.CLI_COMMAND) -> subprocess.CompletedProcess[str]:
    """`afsd ARGS...` as a user runs it (this Python, output captured, the exit code left to the caller)."""
    return subprocess.run([sys.executable, "-m", "afsd", *args], capture_output=True, text=True, timeout=timeout)


def _in_fresh_thread(work) -> None:
    """Run `work` in a thread of its own, so callers inside a running event loop can use asyncio.run."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as error:  # re-raised in the caller's thread
            failure.append(error)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def metrics_address(daemon: Daemon) -> str | None:
    """Where a started daemon serves /metrics (from its ready file)."""
    return daemon.ready.get("metrics")


# The staged abort's stages (term, interrupt, kill) the test helpers give their afslets: seconds, not
# afsd let's defaults (10, 5, 5), so a test whose command ignores SIGTERM is not held up for 10 s.
SHORT_STOP_TIMEOUTS = (1.0, 1.0, 2.0)


def afslet_daemon(workdir: Path, name: str, node: Daemon, discovery: list[str], *, limit_cpu: int = 2,
                  limit_memory_mb: int = 1024, extra_args: list[str] = (), metrics: bool = True,
                  host: str = "127.0.0.1", listen: PortReservation | None = None,
                  stop_timeouts: tuple[float, float, float] | None = None, tls_dir: Path | None = None) -> Daemon:
    """`afsd let` mounting through `node` (an `afsd node` daemon), with its work dir under `workdir/name`
    and its containers under the cgroup `/afsd-let-<name>-<hash of workdir>` (so that two runs, or two
    afslets, never see each other's containers). `listen`: a port the caller holds (afslets behind a proxy
    share one port on distinct addresses: `reserve_shared_port`), else a fresh one. `stop_timeouts`:
    --stop-term/interrupt/kill-timeout (None: afsd let's defaults); `--stop-*` flags in `extra_args` come
    later and win."""
    assert node.socket_path is not None, "afslet needs a node daemon with a control socket"
    reservation, listen_args = _listening(host, listen)
    work = workdir / name
    cgroup_parent = f"/afsd-let-{name}-{hashlib.sha256(str(work.absolute()).encode()).hexdigest()[:8]}"
    stages = [] if stop_timeouts is None else [
        arg for flag, seconds in zip(("--stop-term-timeout", "--stop-interrupt-timeout", "--stop-kill-timeout"),
                                     stop_timeouts) for arg in (flag, f"{seconds:g}")]
    args = ["let", *listen_args, "--node-socket", str(node.socket_path),
            "--work-dir", str(work), "--limit-cpu", str(limit_cpu),
            "--limit-memory-mb", str(limit_memory_mb), "--cgroup-parent", cgroup_parent, *stages, *extra_args,
            *_tls_args(tls_dir)]
    for endpoint in discovery:
        args += ["--discovery-addr", endpoint]
    args += _metrics(host, metrics)
    return Daemon(name, args, host, reservation.port, workdir / f"{name}.log", reservation=reservation)


def http_address(daemon: Daemon) -> str:
    """Where a started proxy serves HTTP (`--http-listen`, from its ready file)."""
    return daemon.ready["http"]


def proxy_daemon(workdir: Path, name: str, afslet_target: str, *, host: str = "127.0.0.1",
                 listen: PortReservation | None = None, http: PortReservation | None = None,
                 discovery_target: str = "", peers_target: str = "", resolv_conf: Path | None = None,
                 extra_args: list[str] = (), tls_dir: Path | None = None) -> Daemon:
    """`afsd proxy` on `host` (gRPC and HTTP; `http`: a port the caller holds, e.g. shared by proxies on
    several addresses, else any); with `resolv_conf`, in a mount namespace whose /etc/resolv.conf it is,
    so that its DNS names resolve through the name server listed there."""
    reservation, listen_args = _listening(host, listen)
    http_listen = http.address if http is not None else (f"[{host}]:0" if ":" in host else f"{host}:0")
    args = ["proxy", *listen_args, "--http-listen", http_listen,
            "--afslet-target", afslet_target, "--node-id", name, *extra_args, *_tls_args(tls_dir)]
    if discovery_target:
        args += ["--discovery-target", discovery_target]
    if peers_target:
        args += ["--proxy-peers-target", peers_target]
    prefix = with_resolv_conf(resolv_conf) if resolv_conf is not None else []
    return Daemon(name, args, host, reservation.port, workdir / f"{name}.log", prefix=prefix, reservation=reservation)
