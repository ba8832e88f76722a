"""A real afslet for tests, and the published afs-sdk client to drive it.

`start_afslet_cluster` starts, as separate processes on loopback: a docker-registry, discovery, a
layerstore, a node daemon (`afsd node`, mounts with the eager backend) and an afslet (`afsd let`,
runc under cgroup limits); it pushes the test images: `tools` and `appuser` (busybox with users,
groups, files to change and a runtime config) and `debian` (the realistic bookworm image, built once
into the image cache; `debian_source` says whether it is the real one). One cluster serves a whole test
module: `afslet_cluster = module_cluster("name", ...)` in the module, plus the fixture
`nothing_left_behind` (used by the whole module), which checks after every test that every afslet is idle and the node clean.
Afslets started here stop commands with short staged-abort stages (`SHORT_STOP_TIMEOUTS`: 1, 1 and 2 s);
a test that needs others passes its own `--stop-*-timeout` flags, which win.

Calls go through `tests/support/sdk_client.py` in a separate Python process (afs-sdk's protos clash with
afsd's): `sdk_execute(...)` runs one call to the end, `SdkCall` watches one in progress and can kill it
(a client that disconnects). `leftovers(cluster)` lists anything a call left on the node: runc
containers, cgroups, mounts, session directories, processes, children of afslet.

What afs-sdk cannot see or send (execution ids in `accepted`, `Result.stop_stage`, `StartRequest.gpus`,
GetRuntimeStatus' GPU and draining fields) is reached with afsd's own protos: `direct_execute(...)`
(`DirectCall`), `list_executions(...)`; the `afsd` command line itself with `afsd_cli(...)`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from afsd.afslet import cgroups
from afsd.afslet.network import instance_names, remove_instance_network
from afsd.api import afslet_pb2, afslet_pb2_grpc, executions_pb2, executions_pb2_grpc
from afsd.lab.catalogue import busybox_layers
from afsd.lab.daemons import (
    SHORT_STOP_TIMEOUTS,
    Daemon,
    afslet_daemon,
    discovery_daemon,
    layerstore_daemon,
    node_daemon,
    start_all,
    stop_daemon,
)
from afsd.lab.debian import debian_layout
from afsd.lab.layers import Entry, LayerSpec
from afsd.lab.oci_layout import ImageSpec, write_oci_layout
from afsd.lab.registry import RegistryProcess, start_registry
from afsd.lab.skopeo import push_layout
from afsd.net.links import open_links
from afsd.node.records import mounted_paths
from tests.support.cluster import unmount_everything_under

SDK_CLIENT = Path(__file__).with_name("sdk_client.py")
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

PASSWD = (b"root:x:0:0:root:/root:/bin/sh\n"
          b"app:x:1000:1000:App User:/home/app:/bin/sh\n"
          b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
GROUP = b"root:x:0:\napp:x:1000:\nstaff:x:50:app\naudio:x:29:app,nobody\nnogroup:x:65534:\n"


def tools_layer() -> LayerSpec:
    """Users and groups, and files a command can modify and delete."""
    return LayerSpec((
        Entry.file("etc/passwd", PASSWD),
        Entry.file("etc/group", GROUP),
        Entry.dir("home/app", mode=0o750, uid=1000, gid=1000),
        Entry.file("srv/data/keep.txt", b"keep me\n"),
        Entry.file("srv/data/modify-me.txt", b"original\n"),
        Entry.file("srv/data/delete-me.txt", b"doomed\n"),
        Entry.dir("srv/data/old-dir"),
        Entry.file("srv/data/old-dir/inside.txt", b"in a directory that gets replaced\n"),
    ))


@dataclass
class AfsletCluster:
    workdir: Path
    registry: RegistryProcess
    daemons: list[Daemon]
    afslet: Daemon
    node: Daemon
    images: dict[str, str] = field(default_factory=dict)
    debian_source: str = ""  # "debootstrap", or why a busybox stand-in was built instead
    extra_afslets: list[Daemon] = field(default_factory=list)
    host: str = "127.0.0.1"  # where every daemon listens

    @property
    def discovery(self) -> Daemon:
        return self.daemons[0]

    def start_afslet(self, name: str, *, extra_args: list[str] = (), limit_cpu: int = 2,
                     limit_memory_mb: int = 1024, workdir: Path | None = None) -> Daemon:
        """Another afslet on the same node daemon (stopped with the cluster); its work dir under `workdir`
        (default: the cluster's)."""
        daemon = afslet_daemon(workdir or self.workdir, name, self.node, [self.discovery.address],
                               limit_cpu=limit_cpu, limit_memory_mb=limit_memory_mb, host=self.host,
                               stop_timeouts=SHORT_STOP_TIMEOUTS, extra_args=["--mount-backend", "eager", *extra_args])
        self.extra_afslets.append(daemon)
        daemon.start()
        return daemon

    def runtime_status(self, afslet: Daemon | None = None) -> afslet_pb2.GetRuntimeStatusResponse:
        with grpc.insecure_channel((afslet or self.afslet).address) as channel:
            return afslet_pb2_grpc.AfsletStub(channel).GetRuntimeStatus(afslet_pb2.GetRuntimeStatusRequest(),
                                                                         timeout=10)

    def wait_until_status(self, predicate: Callable[[afslet_pb2.GetRuntimeStatusResponse], bool],
                          afslet: Daemon | None = None, timeout: float = 60.0) -> afslet_pb2.GetRuntimeStatusResponse:
        deadline = time.monotonic() + timeout
        while True:
            status = self.runtime_status(afslet)
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"afslet status did not get there within {timeout}s: {status}")
            time.sleep(0.1)

    def wait_idle(self, afslet: Daemon | None = None, timeout: float = 60.0) -> afslet_pb2.GetRuntimeStatusResponse:
        """Until no call holds a share (teardown releases it last) and nothing runs."""
        return self.wait_until_status(
            lambda s: s.used_cpu_cores == 0 and s.used_memory_mb == 0 and s.running_containers == 0, afslet, timeout)

    def stop(self) -> None:
        afslets = [*self.extra_afslets, self.afslet]
        for daemon in afslets:
            daemon.stop()
        for daemon in afslets:  # an afslet a failed test left killed did not clean up after itself
            sweep_afslet(daemon)
            daemon.release()
        for daemon in reversed(self.daemons):
            stop_daemon(daemon)
        self.registry.stop()
        unmount_everything_under(self.workdir)


def _push(workdir: Path, registry: str, name: str, spec: ImageSpec, tag: str = "v1") -> str:
    layout = write_oci_layout(workdir / "layouts" / name, tag, spec)
    return push_layout(layout, registry, f"afsd-test/{name}", tag).reference


def start_afslet_cluster(workdir: Path, *, afslet_args: list[str] = (), limit_cpu: int = 2,
                         limit_memory_mb: int = 1024, with_debian: bool = False,
                         host: str = "127.0.0.1") -> AfsletCluster:
    """`host`: where the daemons listen (0.0.0.0: on every address of the host)."""
    registry = start_registry(workdir / "registry")
    registry_args = ["--insecure-registry", registry.address]
    discovery = discovery_daemon(workdir, "discovery0", registry_args=registry_args, host=host)
    daemons: list[Daemon] = [discovery]
    afslet: Daemon | None = None
    try:
        start_all([discovery])
        layerstore = layerstore_daemon(workdir, "store0", [discovery.address], heartbeat_period=1.0,
                                       registry_args=registry_args, host=host)
        if host == "0.0.0.0":  # a layerstore advertises where peers reach it, which a wildcard is not
            layerstore.args += ["--advertise", f"127.0.0.1:{layerstore.port}"]
        daemons.append(layerstore)
        start_all([layerstore])
        node = node_daemon(workdir, "node0", [discovery.address], layerstore=layerstore, host=host)
        daemons.append(node)
        node.start()
        afslet = afslet_daemon(workdir, "afslet0", node, [discovery.address], limit_cpu=limit_cpu,
                               limit_memory_mb=limit_memory_mb, stop_timeouts=SHORT_STOP_TIMEOUTS, host=host,
                               extra_args=["--mount-backend", "eager", *afslet_args])
        afslet.start()
        cluster = AfsletCluster(workdir, registry, daemons, afslet, node, host=host)

        scratch = workdir / "busybox-scratch"
        scratch.mkdir()
        try:  # the busybox layers read their files from `scratch` when written
            base = (*busybox_layers(scratch), tools_layer())
            env = (DEFAULT_PATH, "GREETING=from-image", "KEEP=image-only")
            cluster.images["tools"] = _push(workdir, registry.address, "tools", ImageSpec(
                base, env=env, cmd=("/bin/sh", "-c", "echo default command in $(pwd) as $(id -un)"),
                working_dir="/srv"))
            cluster.images["appuser"] = _push(workdir, registry.address, "appuser", ImageSpec(
                base, env=env, entrypoint=("/bin/sh", "-c"), cmd=("echo from-image-cmd",), working_dir="srv/data",
                user="app"))
        finally:
            shutil.rmtree(scratch)
        if with_debian:
            cached = debian_layout()
            cluster.debian_source = cached.source if cached.source == "debootstrap" else \
                f"{cached.source}: {cached.fallback_reason}"
            cluster.images["debian"] = push_layout(cached.layout, registry.address, "afsd-test/debian",
                                                   "bookworm").reference
        return cluster
    except BaseException:
        for daemon in [*([afslet] if afslet else []), *reversed(daemons)]:
            stop_daemon(daemon)
        registry.stop()
        unmount_everything_under(workdir)
        raise


# -- the SDK client, in its own process ---------------------------------------------------------------


def file_entry(path: str, content: bytes, **fields: object) -> dict:
    return {"kind": "file", "path": path, "content_b64": base64.b64encode(content).decode(), **fields}


@dataclass
class CallResult:
    """Everything one Execute call returned, as the SDK reported it."""

    events: list[dict]

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]

    @property
    def error(self) -> dict | None:
        errors = self.of("error")
        return errors[0] if errors else None

    @property
    def result(self) -> dict:
        (result,) = self.of("result")
        return result

    def lines(self, source: str) -> list[str]:
        return [e["message"] for e in self.of("log") if e["source"] == source]

    @property
    def stdout(self) -> list[str]:
        return self.lines("runc:stdout")

    @property
    def stderr(self) -> list[str]:
        return self.lines("runc:stderr")

    @property
    def kinds(self) -> list[str]:
        """The event kinds in order, with consecutive repeats collapsed (log, log, log -> log)."""
        kinds: list[str] = []
        for event in self.events:
            if not kinds or kinds[-1] != event["event"]:
                kinds.append(event["event"])
        return kinds

    def files(self) -> dict[str, bytes]:
        """Regular files of the returned tar, as the SDK parsed them."""
        return {e["path"]: base64.b64decode(e["data_b64"]) for e in self.of("tar_file")}

    def tar_members(self) -> dict[str, tarfile.TarInfo]:
        """Members of the raw tar.gz (op "raw" only), by name without trailing slash."""
        (raw,) = self.of("tar_bytes")
        with tarfile.open(fileobj=io.BytesIO(base64.b64decode(raw["data_b64"])), mode="r:gz") as archive:
            return {m.name.rstrip("/"): m for m in archive.getmembers()}


def _next_matching(items: queue.Queue, seen: list, predicate: Callable[[object], bool], timeout: float,
                   why_ended: Callable[[], str]) -> object:
    """The next item from `items` (a reader thread's, None when its stream ended) matching `predicate`;
    every item taken is appended to `seen`. AssertionError if the stream ends or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            item = items.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"nothing matching within {timeout}s; got {seen}") from None
        if item is None:
            items.put(None)  # the end stays visible to the next caller
            raise AssertionError(f"the call ended without a matching item: {seen}; {why_ended()}")
        seen.append(item)
        if predicate(item):
            return item


class SdkCall:
    """One sdk_client.py process (or another script speaking its protocol); its events are collected by
    a thread as they arrive."""

    def __init__(self, request: dict, script: Path = SDK_CLIENT, prefix: list[str] = ()) -> None:
        """`prefix`: a command the client runs under (e.g. afsd.lab.daemons.with_resolv_conf)."""
        self.process = subprocess.Popen([*prefix, sys.executable, str(script)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request))
        self.process.stdin.close()
        self.events: list[dict] = []
        self._queue: queue.Queue[dict | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(json.loads(line))
        self._queue.put(None)

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 120.0) -> dict:
        """The first event (from now on) matching `predicate`; AssertionError if the call ends first."""
        return _next_matching(self._queue, self.events, predicate, timeout,  # type: ignore[return-value]
                              lambda: f"stderr: {self.stderr()}")

    def finish(self, timeout: float = 300.0) -> CallResult:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()  # a hung client must not outlive the test
            raise AssertionError(f"sdk_client.py did not finish within {timeout}s; got {self.events}") from None
        self._reader.join(timeout=10)
        while True:
            event = self._queue.get_nowait() if not self._queue.empty() else None
            if event is None:
                break
            self.events.append(event)
        if self.process.returncode != 0:
            raise AssertionError(f"sdk_client.py failed ({self.process.returncode}): {self.stderr()}")
        return CallResult(self.events)

    def kill(self) -> None:
        """Disconnect the way a crashing client does: its process dies, the kernel closes the socket."""
        self.process.kill()
        self.process.wait()

    def stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read()[-3000:]


def sdk_execute_call(afslet: Daemon, *, extra_entries: list[dict] = (), **fields: object) -> SdkCall:
    return SdkCall({"address": afslet.address, "op": "execute", "input": fields,
                    "extra_entries": list(extra_entries)})


def sdk_execute(afslet: Daemon, *, extra_entries: list[dict] = (), **fields: object) -> CallResult:
    """One Execute through AfsClient.execute, to the end. `fields` are ExecuteInput's."""
    return sdk_execute_call(afslet, extra_entries=extra_entries, **fields).finish()


def sdk_raw(afslet: Daemon, frames: list[dict]) -> CallResult:
    """One Execute through AfsClient.raw_execute with exactly these frames (protobuf JSON)."""
    return SdkCall({"address": afslet.address, "op": "raw", "frames": frames}).finish()


def sdk_status(afslet: Daemon) -> dict:
    (status,) = SdkCall({"address": afslet.address, "op": "status"}).finish().of("status")
    return status


# -- afsd's own protos and command line ---------------------------------------------------------------


class DirectCall:
    """One Execute with afsd's protos (a thread reads the responses as they arrive)."""

    def __init__(self, address: str, start: afslet_pb2.StartRequest, hold: threading.Event | None = None) -> None:
        """`hold`: keep the upload open (no half-close) until it is set, so the execution stays preparing."""
        self._channel = grpc.insecure_channel(address)
        stub = afslet_pb2_grpc.AfsletStub(self._channel)

        def frames() -> Iterator[afslet_pb2.ExecuteRequest]:
            yield afslet_pb2.ExecuteRequest(start=start)
            if hold is not None:
                hold.wait()

        self._call = stub.Execute(frames())
        self.responses: list[afslet_pb2.ExecuteResponse] = []
        self.error: grpc.RpcError | None = None
        self._queue: queue.Queue[afslet_pb2.ExecuteResponse | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self._queue.put(response)
        except grpc.RpcError as error:
            self.error = error
        finally:
            self._queue.put(None)

    def wait_for(self, predicate: Callable[[afslet_pb2.ExecuteResponse], bool],
                 timeout: float = 120.0) -> afslet_pb2.ExecuteResponse:
        """The first response (from now on) matching `predicate`; AssertionError if the call ends first."""
        return _next_matching(self._queue, self.responses, predicate, timeout,  # type: ignore[return-value]
                              lambda: f"error: {self.error}")

    def wait_for_line(self, message: str, timeout: float = 120.0) -> None:
        self.wait_for(lambda r: r.WhichOneof("payload") == "log" and r.log.message == message, timeout)

    @property
    def execution_id(self) -> str:
        accepted = next(r.accepted for r in self.responses if r.WhichOneof("payload") == "accepted")
        return accepted.execution_id

    def finish(self, timeout: float = 300.0) -> DirectCall:
        self._reader.join(timeout)
        assert not self._reader.is_alive(), "the call did not end"
        while (response := self._queue.get_nowait()) is not None:
            self.responses.append(response)
        self._channel.close()
        return self

    def of(self, kind: str) -> list:
        return [getattr(r, kind) for r in self.responses if r.WhichOneof("payload") == kind]

    @property
    def result(self) -> afslet_pb2.Result:
        (result,) = self.of("result")
        return result

    def lines(self, source: str) -> list[str]:
        return [log.message for log in self.of("log") if log.source == source]

    def cancel(self) -> None:
        self._call.cancel()
        self._reader.join(30)
        self._channel.close()


def direct_execute(afslet: Daemon, *, hold: threading.Event | None = None, **fields: object) -> DirectCall:
    """Start one Execute with afsd's protos; `fields` are StartRequest's (defaults: 1 core, 64 MB, 60 s)."""
    start = afslet_pb2.StartRequest(**{"cpu_cores": 1, "memory_mb": 64, "timeout_ms": 60_000, **fields})
    return DirectCall(afslet.address, start, hold)


def list_executions(afslet: Daemon, include_finished: bool = False) -> list[executions_pb2.Execution]:
    with grpc.insecure_channel(afslet.address) as channel:
        response = executions_pb2_grpc.ExecutionsStub(channel).List(
            executions_pb2.ListRequest(include_finished=include_finished), timeout=30)
    return list(response.executions)


def afsd_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """The `afsd` command line, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "afsd", *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


# -- what a call may leave behind ---------------------------------------------------------------------


def _afslet_arg(afslet: Daemon, flag: str) -> str:
    return afslet.args[afslet.args.index(flag) + 1]


def child_pids(pid: int) -> list[int]:
    found: list[int] = []
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.exists():
        return found
    for task in tasks.iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return found


def processes_in_cgroup_tree(parent: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            text = (proc / "cgroup").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if any(line.split(":", 2)[-1].startswith(parent + "/") for line in text.splitlines()):
            pids.append(int(proc.name))
    return pids


def sweep_afslet(afslet: Daemon) -> None:
    """Remove the containers and cgroups of a stopped afslet (test clean-up of last resort)."""
    runc_root = Path(_afslet_arg(afslet, "--work-dir")) / "runc"
    if runc_root.exists():
        listed = subprocess.run(["runc", "--root", str(runc_root), "list", "--quiet"], capture_output=True,
                                text=True, check=False)
        for container in listed.stdout.split():
            subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", container], capture_output=True,
                           check=False)
    parent = _afslet_arg(afslet, "--cgroup-parent")
    for child in cgroups.children(parent):
        cgroups.remove(child)
    cgroups.remove_if_empty(parent)
    remove_instance_network(Path(_afslet_arg(afslet, "--work-dir")))


def leftovers(cluster: AfsletCluster, afslet: Daemon | None = None) -> list[str]:
    """Everything an idle afslet should not have: [] when the node is clean."""
    afslet = afslet or cluster.afslet
    work = Path(_afslet_arg(afslet, "--work-dir"))
    parent = _afslet_arg(afslet, "--cgroup-parent")
    found = []
    listed = subprocess.run(["runc", "--root", str(work / "runc"), "list", "--quiet"], capture_output=True,
                            text=True, check=True).stdout.split()
    found += [f"runc container {c}" for c in listed]
    found += [f"cgroup {c}" for c in cgroups.children(parent)]
    found += [f"process {p} in {parent}" for p in processes_in_cgroup_tree(parent)]
    found += [f"mount {m}" for m in mounted_paths() if m.startswith(str(work) + "/")]
    sessions = work / "sessions"
    found += [f"session dir {s}" for s in (sessions.iterdir() if sessions.exists() else [])]
    with open_links() as host:
        found += [f"veth {name}" for name in host.names(instance_names(work).veth_prefix)]
    assert afslet.process is not None
    found += [f"afslet child process {p} ({Path(f'/proc/{p}/comm').read_text().strip()})"
              for p in child_pids(afslet.process.pid) if os.path.exists(f"/proc/{p}")]
    mounts = subprocess.run([sys.executable, "-m", "afsd", "mounts", "--json", "--socket",
                             str(cluster.node.socket_path)], capture_output=True, text=True, check=True)
    found += [f"node mount {m['target']}" for m in json.loads(mounts.stdout).get("mounts", [])]
    return found


def assert_nothing_left(cluster: AfsletCluster, afslet: Daemon | None = None, timeout: float = 15.0) -> None:
    """Wait until the afslet is idle and `leftovers` is empty; fail with what stayed.

    Waiting matters only where afslet cannot reap itself: processes orphaned to PID 1 when an afslet
    was SIGKILLed die when its successor kills them, but PID 1 reaps them on its own schedule.
    """
    cluster.wait_idle(afslet)
    deadline = time.monotonic() + timeout
    while (found := leftovers(cluster, afslet)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert found == []


# -- fixtures for test modules -----------------------------------------------------------------------


def module_cluster(name: str, **options: object) -> Callable[..., Iterator[AfsletCluster]]:
    """A module-scoped `afslet_cluster` fixture: `afslet_cluster = module_cluster("name", limit_cpu=2)`
    in a test module; `options` go to `start_afslet_cluster`."""

    @pytest.fixture(scope="module")
    def afslet_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AfsletCluster]:
        cluster = start_afslet_cluster(tmp_path_factory.mktemp(name), **options)  # type: ignore[arg-type]
        try:
            yield cluster
        finally:
            cluster.stop()

    return afslet_cluster


@pytest.fixture
def nothing_left_behind(afslet_cluster: AfsletCluster) -> Iterator[None]:
    """After every test of a module that uses it (`pytestmark = pytest.mark.usefixtures("nothing_left_behind")`):
    every afslet idle, and nothing left on the node."""
    yield
    for afslet in [afslet_cluster.afslet, *afslet_cluster.extra_afslets]:
        assert_nothing_left(afslet_cluster, afslet)
