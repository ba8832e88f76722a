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
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from afsd.lab.registry import free_port


class DaemonError(RuntimeError):
    pass


def wait_for_port(host: str, port: int, process: subprocess.Popen | None, timeout: float, log: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise DaemonError(f"daemon exited with {process.returncode} at startup:\n{tail}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise DaemonError(f"nothing listened on {host}:{port} within {timeout}s")


def wait_for_unix_socket(path: Path, process: subprocess.Popen | None, timeout: float, log: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise DaemonError(f"daemon exited with {process.returncode} at startup:\n{tail}")
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(0.5)
                sock.connect(str(path))
                return
        except OSError:
            time.sleep(0.05)
    raise DaemonError(f"nothing answered on {path} within {timeout}s")


@dataclass
class Daemon:
    """One afsd daemon process; `start()` again after `stop()`/`kill()` restarts it as it was."""

    name: str
    args: list[str]
    host: str
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)  # e.g. unshare/ip netns exec, to run it elsewhere
    socket_path: Path | None = None                    # ready when this unix socket answers (no TCP port)
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def spawn(self) -> None:
        """Start the process without waiting for it to listen (see `start_all`)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "afsd", "--log-level", "info", *self.args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, **self.env})

    def wait_ready(self, timeout: float = 30.0) -> None:
        if self.socket_path is not None:
            wait_for_unix_socket(self.socket_path, self.process, timeout, self.log_path)
        else:
            wait_for_port(self.host, self.port, self.process, timeout, self.log_path)

    def start(self, timeout: float = 30.0) -> Daemon:
        self.spawn()
        self.wait_ready(timeout)
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

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout`); returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

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


def start_all(daemons: list[Daemon], timeout: float = 30.0) -> None:
    """Start daemons in parallel: each takes about a second to import and bind."""
    for daemon in daemons:
        daemon.spawn()
    for daemon in daemons:
        daemon.wait_ready(timeout)


def _tls_args(tls_dir: Path | None) -> list[str]:
    return ["--tls-dir", str(tls_dir)] if tls_dir is not None else []


def discovery_daemon(workdir: Path, name: str, *, ttl: float = 30.0, registry_args: list[str] = (),
                     host: str = "127.0.0.1", metrics: bool = True, tls_dir: Path | None = None) -> Daemon:
    port = free_port(host)
    args = ["discovery", "--listen", f"{host}:{port}", "--ttl", str(ttl), *registry_args, *_tls_args(tls_dir)]
    if metrics:
        args += ["--metrics-listen", f"{host}:{free_port(host)}"]
    return Daemon(name, args, host, port, workdir / f"{name}.log")


def layerstore_daemon(workdir: Path, name: str, discovery: list[str], *, cache_max_bytes: int = 0,
                      heartbeat_period: float = 10.0, registry_args: list[str] = (),
                      host: str = "127.0.0.1", metrics: bool = True, tls_dir: Path | None = None) -> Daemon:
    port = free_port(host)
    args = ["layerstore", "--listen", f"{host}:{port}", "--node-id", name,
            "--cache-dir", str(workdir / name / "cache"), "--heartbeat-period", str(heartbeat_period),
            "--admin-socket", str(workdir / name / "layerstore.sock"), *registry_args, *_tls_args(tls_dir)]
    for endpoint in discovery:
        args += ["--discovery-endpoint", endpoint]
    if cache_max_bytes:
        args += ["--cache-max-bytes", str(cache_max_bytes)]
    if metrics:
        args += ["--metrics-listen", f"{host}:{free_port(host)}"]
    return Daemon(name, args, host, port, workdir / f"{name}.log")


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
    if metrics:
        args += ["--metrics-listen", f"{host}:{free_port(host)}"]
    return Daemon(name, args, host, 0, workdir / f"{name}.log", socket_path=socket_path)


def stop_node_daemon(node: Daemon) -> None:
    """Stop an `afsd node` daemon and what outlives it by design: unmount what it mounted (while it
    still answers), stop it, then shut down the backend supervisors it started (their keepers and
    workers with them). Without the last step every stopped node leaves its fanotify processes behind."""
    if node.running() and node.socket_path is not None:
        listed = afsd_command("mounts", "--socket", str(node.socket_path), "--json", timeout=120)
        if listed.returncode == 0:
            for mount in json.loads(listed.stdout).get("mounts", []):
                afsd_command("umount", "--socket", str(node.socket_path), mount["target"], timeout=120)
    node.stop()
    state = Path(node.args[node.args.index("--state-dir") + 1])
    _in_fresh_thread(lambda: asyncio.run(_shutdown_supervisors(state)))


def stop_daemon(daemon: Daemon) -> None:
    """`stop_node_daemon` for an `afsd node` daemon, a plain stop for the others."""
    if daemon.args[:1] == ["node"]:
        stop_node_daemon(daemon)
    else:
        daemon.stop()


async def _shutdown_supervisors(state: Path) -> None:
    from afsd.ondemand.cachefiles.client import FscacheClient
    from afsd.ondemand.fanotify.client import SupervisorClient
    if (state / "fanotify").exists():
        await SupervisorClient(state / "fanotify").shutdown(force=True)
    if (state / "fscache").exists():
        await FscacheClient(state / "fscache").shutdown(force=True)


def afsd_command(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
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
    if "--metrics-listen" in daemon.args:
        return daemon.args[daemon.args.index("--metrics-listen") + 1]
    return None


# The staged abort's stages (term, interrupt, kill) the test helpers give their afslets: seconds, not
# afsd let's defaults (10, 5, 5), so a test whose command ignores SIGTERM is not held up for 10 s.
SHORT_STOP_TIMEOUTS = (1.0, 1.0, 2.0)


def afslet_daemon(workdir: Path, name: str, node: Daemon, discovery: list[str], *, limit_cpu: int = 2,
                  limit_memory_mb: int = 1024, extra_args: list[str] = (), metrics: bool = True,
                  host: str = "127.0.0.1", port: int | None = None,
                  stop_timeouts: tuple[float, float, float] | None = None, tls_dir: Path | None = None) -> Daemon:
    """`afsd let` mounting through `node` (an `afsd node` daemon), with its work dir under `workdir/name`
    and its containers under the cgroup `/afsd-let-<name>-<hash of workdir>` (so that two runs, or two
    afslets, never see each other's containers). `port`: a given one (afslets behind a proxy share one
    port on distinct addresses), else a free one. `stop_timeouts`: --stop-term/interrupt/kill-timeout
    (None: afsd let's defaults); `--stop-*` flags in `extra_args` come later and win."""
    assert node.socket_path is not None, "afslet needs a node daemon with a control socket"
    port = port or free_port(host)
    work = workdir / name
    cgroup_parent = f"/afsd-let-{name}-{hashlib.sha256(str(work.absolute()).encode()).hexdigest()[:8]}"
    stages = [] if stop_timeouts is None else [
        arg for flag, seconds in zip(("--stop-term-timeout", "--stop-interrupt-timeout", "--stop-kill-timeout"),
                                     stop_timeouts) for arg in (flag, f"{seconds:g}")]
    args = ["let", "--listen", f"{host}:{port}", "--node-socket", str(node.socket_path),
            "--work-dir", str(work), "--limit-cpu", str(limit_cpu),
            "--limit-memory-mb", str(limit_memory_mb), "--cgroup-parent", cgroup_parent, *stages, *extra_args,
            *_tls_args(tls_dir)]
    for endpoint in discovery:
        args += ["--discovery-addr", endpoint]
    if metrics:
        args += ["--metrics-listen", f"{host}:{free_port(host)}"]
    return Daemon(name, args, host, port, workdir / f"{name}.log")


def free_port_on_all(hosts: list[str]) -> int:
    """A TCP port free on every one of `hosts` (for daemons sharing a port on distinct addresses)."""
    for _ in range(100):
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket() as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return port
    raise DaemonError(f"found no port free on all of {hosts}")


def http_address(daemon: Daemon) -> str:
    """A proxy's `--http-listen` address."""
    return daemon.args[daemon.args.index("--http-listen") + 1]


def proxy_daemon(workdir: Path, name: str, afslet_target: str, *, host: str = "127.0.0.1", port: int | None = None,
                 http_port: int | None = None, discovery_target: str = "", peers_target: str = "",
                 resolv_conf: Path | None = None, extra_args: list[str] = (), tls_dir: Path | None = None) -> Daemon:
    """`afsd proxy` on `host` (gRPC and HTTP); with `resolv_conf`, in a mount namespace whose
    /etc/resolv.conf it is, so that its DNS names resolve through the name server listed there."""
    port = port or free_port(host)
    http_port = http_port or free_port(host)
    args = ["proxy", "--listen", f"{host}:{port}", "--http-listen", f"{host}:{http_port}",
            "--afslet-target", afslet_target, "--node-id", name, *extra_args, *_tls_args(tls_dir)]
    if discovery_target:
        args += ["--discovery-target", discovery_target]
    if peers_target:
        args += ["--proxy-peers-target", peers_target]
    prefix = with_resolv_conf(resolv_conf) if resolv_conf is not None else []
    return Daemon(name, args, host, port, workdir / f"{name}.log", prefix=prefix)
