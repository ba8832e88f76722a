"""A real containerd (Debian's 1.6, CRI plugin included) wired to `afsd snapshotter`: for the tests
and the benchmarks.

`start_containerd` runs containerd as a child process with everything private to its caller: root,
state, sockets, runc's state and the IO fifos under a short directory of its own (unix socket paths
are limited to 108 bytes), containers' cgroups under a parent named after a random token. Its CRI
plugin uses the afsd snapshotter (a proxy plugin) with `disable_snapshot_annotations = false` (or
another snapshotter, for comparisons), pulls from the lab registry over plain HTTP and runs pods with
runc. `Containerd.stop()` removes what containerd leaves by design when it stops (shims, their
containers, rootfs and shm mounts, cgroups).

`CriClient` is a kubelet's view of it: the CRI `runtime.v1` RuntimeService and ImageService over the
containerd socket. `snapshotter_daemon` launches `afsd snapshotter` like the other lab daemons.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from afsd.afslet import cgroups
from afsd.api import cri_runtime_pb2 as cri
from afsd.api import cri_runtime_pb2_grpc as cri_grpc
from afsd.lab import deadlines
from afsd.lab.daemons import Daemon
from afsd.lab.processes import terminate
from afsd.node.records import mounted_paths

SNAPSHOTTER = "afsd"
CRI_NAMESPACE = "k8s.io"
START_TIMEOUT = deadlines.CONTAINERD_START


def snapshotter_daemon(workdir: Path, name: str, node_socket: Path, *, host: str = "127.0.0.1") -> Daemon:
    """`afsd snapshotter` with its socket and root under `workdir/name`, attaching layers through the
    node daemon on `node_socket`."""
    home = workdir / name
    socket_path = home / "snapshotter.sock"
    args = ["snapshotter", "--address", str(socket_path), "--root", str(home / "root"),
            "--node-socket", str(node_socket), "--metrics-listen", f"{host}:0"]
    return Daemon(name, args, host, 0, workdir / f"{name}.log", socket_path=socket_path)


def snapshotter_root(daemon: Daemon) -> Path:
    return Path(daemon.args[daemon.args.index("--root") + 1])


def _config(home: Path, *, snapshotter: str, snapshotter_socket: Path, registry: str, sandbox_image: str) -> str:
    return f"""version = 2
root = "{home}/root"
state = "{home}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{home}/containerd.sock"
[ttrpc]
  address = "{home}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{home}/opt"

[proxy_plugins.{SNAPSHOTTER}]
  type = "snapshot"
  address = "{snapshotter_socket}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  # Without CAP_SYS_RESOURCE (as on the lab machine) runc cannot give a pod sandbox its -998 OOM score.
  restrict_oom_score_adj = {"true" if _lacks_sys_resource() else "false"}
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    disable_snapshot_annotations = false
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{home}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{home}/cni/bin"
    conf_dir = "{home}/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry}"]
    endpoint = ["http://{registry}"]
"""


@dataclass
class Containerd:
    home: Path
    process: subprocess.Popen
    log_path: Path
    token: str = field(default_factory=lambda: secrets.token_hex(4))

    @property
    def address(self) -> Path:
        return self.home / "containerd.sock"

    @property
    def runc_root(self) -> Path:
        return self.home / "runc"

    @property
    def fifo_dir(self) -> Path:
        return self.home / "fifo"

    @property
    def cgroup_parent(self) -> str:
        """Where this test's pods and `ctr run` containers get their cgroups."""
        return f"/afsd-test-containerd-{self.token}"

    def ctr(self, *args: str, namespace: str = CRI_NAMESPACE, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "--address", str(self.address), "--namespace", namespace, *args],
                              capture_output=True, text=True, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def leftovers(self) -> list[str]:
        """What this containerd's pods and containers still hold: [] once every one is removed."""
        found = [f"shim {pid}" for pid in self._shims()]
        found += [f"runc container {container}" for _, container in self._runc_containers()]
        found += [f"mount {point}" for point in self._mounts()]
        found += [f"cgroup {child}" for child in cgroups.children(self.cgroup_parent)]
        return found

    def stop(self) -> None:
        """Stop containerd and remove by force what it leaves behind by design (shims, containers,
        rootfs and shm mounts, cgroups), then its home."""
        for pid, argv in self._shims().items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _shim_socket(argv).unlink(missing_ok=True)   # a shim removes it itself only when it exits
        terminate(self.process, 30)
        for root, container in self._runc_containers():
            subprocess.run(["runc", "--root", str(root), "delete", "--force", container], capture_output=True)
        for point in self._mounts():
            subprocess.run(["umount", "-l", point], capture_output=True)
        for child in cgroups.children(self.cgroup_parent):
            cgroups.remove(child)
        cgroups.remove_if_empty(self.cgroup_parent)
        if not self._mounts():
            shutil.rmtree(self.home, ignore_errors=True)

    def _runc_containers(self) -> list[tuple[Path, str]]:
        found = []
        for root in sorted(self.runc_root.iterdir()) if self.runc_root.exists() else []:
            listed = subprocess.run(["runc", "--root", str(root), "list", "--quiet"], capture_output=True, text=True)
            found += [(root, container) for container in listed.stdout.split()]
        return found

    def _mounts(self) -> list[str]:
        return sorted((p for p in mounted_paths() if p.startswith(f"{self.home}/")), key=len, reverse=True)

    def _shims(self) -> dict[int, list[bytes]]:
        """containerd-shim-runc-v2 processes of this containerd (they outlive it by design): pid -> argv."""
        found = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and os.fsencode(self.address) in argv:
                found[int(proc.name)] = argv
        return found


def _shim_socket(argv: list[bytes]) -> Path:
    """Where a shim listens: /run/containerd/s/<sha256 of address/namespace/id> (containerd's
    runtime/v2/shim.SocketAddress)."""
    def flag(name: bytes) -> str:
        return os.fsdecode(argv[argv.index(name) + 1]) if name in argv else ""
    key = os.path.join(flag(b"-address"), flag(b"-namespace"), flag(b"-id"))
    return Path("/run/containerd/s") / hashlib.sha256(key.encode()).hexdigest()


def start_containerd(*, snapshotter_socket: Path, registry: str, sandbox_image: str,
                     snapshotter: str = SNAPSHOTTER) -> Containerd:
    """containerd with a private home under /tmp (short socket paths), ready to serve CRI calls; its CRI
    plugin uses `snapshotter` (the afsd one on `snapshotter_socket` by default)."""
    home = Path(tempfile.mkdtemp(prefix="afsd-ctd-", dir="/tmp"))
    config = home / "config.toml"
    config.write_text(_config(home, snapshotter=snapshotter, snapshotter_socket=snapshotter_socket,
                              registry=registry, sandbox_image=sandbox_image))
    for directory in ("cni/bin", "cni/conf", "fifo", "runc"):
        (home / directory).mkdir(parents=True)
    log_path = home / "containerd.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["containerd", "--config", str(config), "--log-level", "debug"],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    containerd = Containerd(home, process, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            tail = containerd.log()[-3000:]
            shutil.rmtree(home, ignore_errors=True)
            raise RuntimeError(f"containerd exited with {process.returncode} at startup:\n{tail}")
        listed = containerd.ctr("plugins", "ls", timeout=30) if containerd.address.exists() else None
        if listed is not None and listed.returncode == 0 and _plugin_ok(listed.stdout, "cri") \
                and _plugin_ok(listed.stdout, snapshotter):
            return containerd
        if time.monotonic() > deadline:
            containerd.stop()
            raise RuntimeError(f"containerd did not load its CRI plugin and the {snapshotter} snapshotter "
                               f"within {START_TIMEOUT}s")
        time.sleep(0.2)


def _lacks_sys_resource() -> bool:
    """This process cannot lower OOM scores (no CAP_SYS_RESOURCE, bit 24)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return not int(line.split()[1], 16) & (1 << 24)
    return True


def _plugin_ok(listing: str, plugin_id: str) -> bool:
    return any(line.split()[1:2] == [plugin_id] and line.split()[-1] == "ok"
               for line in listing.splitlines() if len(line.split()) >= 3)


CALL_TIMEOUT = 120.0


def container_output(pod: cri.PodSandboxConfig, name: str) -> list[str]:
    """A container's output lines from its CRI log file (`<time> <stream> <tag> <line>`), as `kubectl
    logs` shows them."""
    path = Path(pod.log_directory) / f"{name}.log"
    if not path.exists():
        return []
    return [line.split(" ", 3)[3] for line in path.read_text().splitlines() if line.count(" ") >= 3]


class CriClient:
    """The CRI runtime.v1 API a kubelet uses, on containerd's socket, with the calls it makes to run a pod."""

    def __init__(self, containerd: Containerd) -> None:
        self.containerd = containerd
        self.channel = grpc.aio.insecure_channel(f"unix:{containerd.address}")
        self.runtime = cri_grpc.RuntimeServiceStub(self.channel)
        self.images = cri_grpc.ImageServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    def pod_config(self, name: str, log_directory: Path) -> cri.PodSandboxConfig:
        """A host-network pod (no hostname: a kubelet sends none for those) in this containerd's cgroup parent."""
        log_directory.mkdir(parents=True, exist_ok=True)
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=f"{name}-{self.containerd.token}", namespace="default"),
            log_directory=str(log_directory),
            linux=cri.LinuxPodSandboxConfig(
                cgroup_parent=self.containerd.cgroup_parent,
                security_context=cri.LinuxSandboxSecurityContext(
                    namespace_options=cri.NamespaceOption(network=cri.NODE))))

    async def pull(self, image: str) -> str:
        response = await self.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)),
                                               timeout=CALL_TIMEOUT)
        return response.image_ref

    async def run_pod(self, pod: cri.PodSandboxConfig) -> str:
        response = await self.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod), timeout=CALL_TIMEOUT)
        return response.pod_sandbox_id

    async def start_container(self, pod_id: str, pod: cri.PodSandboxConfig, name: str, image: str,
                              command: list[str]) -> str:
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=image),
                                     command=command, log_path=f"{name}.log", linux=cri.LinuxContainerConfig())
        created = await self.runtime.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod), timeout=CALL_TIMEOUT)
        await self.runtime.StartContainer(cri.StartContainerRequest(container_id=created.container_id),
                                          timeout=CALL_TIMEOUT)
        return created.container_id

    async def running_pid(self, container_id: str) -> int:
        """The container's init process; AssertionError unless the container is running."""
        status = await self.runtime.ContainerStatus(
            cri.ContainerStatusRequest(container_id=container_id, verbose=True), timeout=CALL_TIMEOUT)
        assert status.status.state == cri.CONTAINER_RUNNING, status.status
        return int(json.loads(status.info["info"])["pid"])

    async def remove_pod(self, pod_id: str, container_ids: list[str]) -> None:
        """Stop and remove the containers, then the pod, in a kubelet's order: a container is removed
        once its status says it exited (the CRI plugin learns of an exit asynchronously)."""
        for container_id in container_ids:
            deadline = time.monotonic() + CALL_TIMEOUT
            while (state := await self._state(container_id)) != cri.CONTAINER_EXITED:
                try:
                    if state == cri.CONTAINER_RUNNING:
                        await self.runtime.StopContainer(
                            cri.StopContainerRequest(container_id=container_id, timeout=0), timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError:
                    # A container that exits as it is stopped can make the kill fail ("ttrpc: closed");
                    # a kubelet tries again on its next sync, and so do we, until the deadline.
                    if time.monotonic() > deadline:
                        raise
                if time.monotonic() > deadline:
                    raise RuntimeError(f"container {container_id} did not exit within {CALL_TIMEOUT:g}s")
                await asyncio.sleep(0.1)
            await self.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=container_id),
                                               timeout=CALL_TIMEOUT)
        await self.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT)
        await self.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT)

    async def _state(self, container_id: str) -> int:
        status = await self.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id),
                                                    timeout=CALL_TIMEOUT)
        return status.status.state

    async def remove_image(self, image: str) -> None:
        await self.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=image)), timeout=CALL_TIMEOUT)
