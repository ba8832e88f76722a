"""deploy/kubernetes's pods run without a kubelet: each pod's containers from the built afsd image under
runc, in a network namespace of the pod's own, with what the manifest says translated the way a kubelet
and containerd's CRI plugin translate it.

What is translated: `args` after the image's entrypoint with `$(VAR)` expanded; `env` with the downward
API (pod IP, node name, pod name); volumes (hostPath under a stand-in host root, except /dev and
/sys/fs/cgroup which are the real ones; emptyDir; a Secret the cluster holds, written as the kubelet
writes it — `..data` symlinks, `items`, `defaultMode`, the pod's `fsGroup`, read-only — and one that is
absent: an empty directory if optional, else the pod does not start); `mountPropagation`
(Bidirectional: rshared, HostToContainer: rslave, over a host root that is a shared mount, as a kubelet
requires); the security context (privileged: every capability, no
seccomp, /sys writable, the host's /dev; otherwise the default capabilities less `drop` plus `add`,
RuntimeDefault = Docker's seccomp profile, runAsUser/runAsGroup, allowPrivilegeEscalation: false =
noNewPrivileges, readOnlyRootFilesystem); memory limits; the pod's /etc/resolv.conf (cluster DNS with
the namespace's search path), /etc/hosts and host name; init containers in order (a plain one runs to
completion, exit 0, before the next starts; one with `restartPolicy: Always` is a sidecar: the next starts
once its startup probe passes, and it stops after the main containers); HTTP probes.

What is not: scheduling (every pod runs on this machine), Services' virtual IPs (every Service name
resolves to its pods' IPs, as a headless Service does), kube-proxy, CPU requests, image pulls.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

from afsd.afslet import cgroups
from afsd.afslet.bundle import DEFAULT_CAPABILITIES, READONLY_PATHS, masked_paths
from afsd.afslet.seccomp import runtime_seccomp
from afsd.net import BridgeNetwork, BridgeSpec, Namespace, create_namespace, delete_namespace, open_links, pick_subnet
from afsd.net.bridge import host_network_lock
from tests.support.cluster import unmount_everything_under
from tests.support.dns import DnsServer
from tests.support.manifests import REPO, Container, Workload

NAMESPACE = "afsd"
CLUSTER_DOMAIN = "cluster.local"
REAL_HOST_PATHS = ("/dev", "/sys/fs/cgroup")   # shared with the real host, as on a node
# Capability names by bit number (linux/capability.h).
_CAPABILITY_BITS = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE NET_BIND_SERVICE "
    "NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT "
    "SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
    "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE").split()


def all_capabilities() -> list[str]:
    """Every capability this process may give (a privileged container gets the runtime's bounding set)."""
    with open("/proc/self/status") as status:
        bounding = int(next(line for line in status if line.startswith("CapBnd:")).split()[1], 16)
    return sorted(f"CAP_{name}" for bit, name in enumerate(_CAPABILITY_BITS) if bounding >> bit & 1)


_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def built_image(output: Path) -> tuple[Path, str]:
    """scripts/build-image.sh into `output` (a cache hit unless the image's inputs changed): (layout, digest)."""
    result = subprocess.run([str(REPO / "scripts" / "build-image.sh"), "--output", str(output), "--print-digest"],
                            capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"scripts/build-image.sh failed:\n{result.stderr[-3000:]}")
    return output, result.stdout.strip()


def unpacked_image(layout: Path, digest: str) -> tuple[Path, list[str]]:
    """The image's root filesystem (unpacked once per digest with umoci, kept in the image cache; used
    read-only, below each container's own overlay) and its environment."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "afsd" / "image"
    bundle = cache / f"rootfs-{digest.removeprefix('sha256:')[:16]}"
    if not (bundle / "config.json").exists():
        partial = cache / f"{bundle.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:afsd", str(partial)], check=True,
                       capture_output=True, timeout=600)
        try:
            partial.rename(bundle)
        except OSError:  # another run got there first
            shutil.rmtree(partial, ignore_errors=True)
    config = json.loads((bundle / "config.json").read_text())
    return bundle / "rootfs", config["process"]["env"]


def _bytes(quantity: str) -> int:
    for suffix, factor in _UNITS.items():
        if quantity.endswith(suffix):
            return int(quantity[:-len(suffix)]) * factor
    return int(quantity)


@dataclass
class RunningContainer:
    container: Container
    runc_id: str
    bundle: Path
    log_path: Path
    process: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Pod:
    cluster: PodCluster
    workload: Workload
    name: str
    ip: str
    directory: Path
    extra_args: dict[str, list[str]]
    running: dict[str, RunningContainer] = field(default_factory=dict)

    @property
    def netns(self) -> str:
        return f"{self.cluster.token}{self.name[-6:]}"

    @property
    def fields(self) -> dict[str, str]:
        return {"status.podIP": self.ip, "spec.nodeName": self.cluster.node_name, "metadata.name": self.name}

    def container(self, name: str) -> Container:
        return next(c for c in self.workload.containers if c.name == name)

    def start(self) -> None:
        """Init containers one by one (each to completion, or a sidecar until its startup probe passes),
        then the main containers, then wait until every container is ready: the kubelet's order."""
        for container in self.workload.containers:
            if container.init and not container.sidecar:
                self.run_to_completion(container.name)
                continue
            self.start_container(container.name)
            if container.sidecar:
                self.wait_probe(container.name, "startupProbe")
        for container in self.workload.containers:
            if container.name in self.running:
                self.wait_probe(container.name, "readinessProbe")

    def run_to_completion(self, name: str, timeout: float = 180.0) -> None:
        """A plain init container: it must exit 0 (the kubelet would restart the pod otherwise)."""
        running = self.start_container(name)
        try:
            running.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        code = self.stop_container(name, grace=0)
        if code != 0:
            raise RuntimeError(f"{self.name}/{name}: init container exited with {code}; log:\n{running.log()[-3000:]}")

    def start_container(self, name: str) -> RunningContainer:
        container = self.container(name)
        runc_id = f"{self.netns}-{name}"
        bundle = self.directory / "containers" / name
        rootfs, upper, work = bundle / "rootfs", bundle / "upper", bundle / "work"
        if rootfs.is_mount():
            subprocess.run(["umount", "-l", str(rootfs)], check=False)
        shutil.rmtree(bundle, ignore_errors=True)
        for path in (rootfs, upper, work):
            path.mkdir(parents=True)
        # The container's writable layer over the shared image, as a CRI snapshotter gives it.
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.cluster.image_rootfs},upperdir={upper},workdir={work}", str(rootfs)],
                       check=True)
        (bundle / "config.json").write_text(json.dumps(self._oci_config(container, rootfs), indent=1))
        log_path = self.directory / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(["runc", "--root", str(self.cluster.runc_root), "run", "--bundle", str(bundle),
                                        runc_id], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.running[name] = RunningContainer(container, runc_id, bundle, log_path, process)
        return self.running[name]

    def stop_container(self, name: str, grace: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after the pod's grace period; the container and its overlay removed."""
        running = self.running.pop(name, None)
        if running is None:
            return None
        grace = grace if grace is not None else self.workload.pod.get("terminationGracePeriodSeconds", 30)
        runc = ["runc", "--root", str(self.cluster.runc_root)]
        subprocess.run([*runc, "kill", running.runc_id, "TERM"], capture_output=True)
        try:
            running.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            subprocess.run([*runc, "kill", running.runc_id, "KILL"], capture_output=True)
            running.process.wait(timeout=60)
        subprocess.run([*runc, "delete", "--force", running.runc_id], capture_output=True)
        subprocess.run(["umount", "-l", str(running.bundle / "rootfs")], capture_output=True)
        return running.process.returncode

    def stop(self) -> dict[str, int | None]:
        """Main containers first, then the sidecars in reverse order: the kubelet's termination order."""
        order = [c.name for c in self.workload.containers if not c.sidecar] + \
                [c.name for c in reversed(self.workload.containers) if c.sidecar]
        return {name: self.stop_container(name) for name in order if name in self.running}

    def exec(self, name: str, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`kubectl exec POD -c NAME -- ARGV`."""
        return subprocess.run(["runc", "--root", str(self.cluster.runc_root), "exec", self.running[name].runc_id,
                               *argv], capture_output=True, text=True, timeout=timeout)

    def probe(self, name: str, kind: str) -> tuple[int, str]:
        """One HTTP probe of the container, as the kubelet sends it (to the pod IP)."""
        container = self.container(name)
        spec = container.spec[kind]["httpGet"]
        url = f"http://{self.ip}:{container.port(spec['port'])}{spec['path']}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError as error:
            return 0, str(error)

    def wait_probe(self, name: str, kind: str, timeout: float = 180.0) -> None:
        if kind not in self.container(name).spec:
            return
        deadline = time.monotonic() + timeout
        while (answer := self.probe(name, kind))[0] != 200:
            running = self.running[name]
            if running.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}/{name}: {kind} never passed ({answer}); exit "
                                   f"{running.process.poll()}; log:\n{running.log()[-3000:]}")
            time.sleep(0.2)

    # -- the translation ------------------------------------------------------------------------------

    def _oci_config(self, container: Container, rootfs: Path) -> dict[str, object]:
        spec = container.spec
        security = {**self.workload.pod.get("securityContext", {}), **spec.get("securityContext", {})}
        privileged = security.get("privileged", False)
        if privileged:
            capabilities = all_capabilities()
        else:
            caps = security.get("capabilities", {})
            dropped = {f"CAP_{c}" for c in caps.get("drop", [])}
            base = [] if "CAP_ALL" in dropped else [c for c in DEFAULT_CAPABILITIES if c not in dropped]
            base = [c for c in base if c in all_capabilities()]
            capabilities = sorted({*base, *(f"CAP_{c}" for c in caps.get("add", []))})
        env = {**dict(item.split("=", 1) for item in self.cluster.image_env), "HOSTNAME": self.name,
               **container.env_values(self.fields)}
        mounts, propagations = self._mounts(container, privileged)
        linux: dict[str, object] = {
            "cgroupsPath": f"/{self.cluster.token}-k8s/{self.name}-{container.name}",
            "resources": {"devices": [{"allow": privileged, "access": "rwm"}]},
            "namespaces": [{"type": "mount"}, {"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "network", "path": f"/run/netns/{self.netns}"}],
        }
        limit = spec.get("resources", {}).get("limits", {}).get("memory")
        if limit:
            linux["resources"]["memory"] = {"limit": _bytes(limit)}  # type: ignore[index]
        if "Bidirectional" in propagations:
            linux["rootfsPropagation"] = "rshared"
        elif "HostToContainer" in propagations:
            linux["rootfsPropagation"] = "rslave"
        if not privileged:
            linux.update(maskedPaths=masked_paths(), readonlyPaths=READONLY_PATHS)
            if security.get("seccompProfile", {}).get("type") == "RuntimeDefault":
                linux["seccomp"] = runtime_seccomp(capabilities)
        args = [*spec.get("command", ["/usr/local/bin/afsd"]), *container.argv(self.fields),
                *self.extra_args.get(container.name, [])]
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": security.get("runAsUser", 0), "gid": security.get("runAsGroup", 0)},
                "args": args, "env": [f"{k}={v}" for k, v in env.items()], "cwd": "/",
                "capabilities": {key: capabilities for key in ("bounding", "effective", "permitted")},
                "noNewPrivileges": security.get("allowPrivilegeEscalation", True) is False,
            },
            "root": {"path": str(rootfs), "readonly": bool(security.get("readOnlyRootFilesystem"))},
            "hostname": self.name,
            "mounts": mounts,
            "linux": linux,
        }

    def _mounts(self, container: Container, privileged: bool) -> tuple[list[dict[str, object]], set[str]]:
        mounts: list[dict[str, object]] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "rw" if privileged else "ro"]},
        ]
        if privileged:  # containerd gives a privileged container the host's devices
            mounts[1] = {"destination": "/dev", "type": "bind", "source": "/dev", "options": ["rbind"]}
            del mounts[2:5]
        for name in ("resolv.conf", "hosts", "hostname"):
            mounts.append({"destination": f"/etc/{name}", "type": "bind", "source": str(self.directory / name),
                           "options": ["rbind", "ro"]})
        propagations = set()
        for mount in container.spec.get("volumeMounts", []):
            propagation = mount.get("mountPropagation", "None")
            propagations.add(propagation)
            options = ["rbind", {"Bidirectional": "rshared", "HostToContainer": "rslave"}.get(propagation, "rprivate")]
            if mount.get("readOnly") or "secret" in self.workload.volume(mount["name"]):
                options.append("ro")
            mounts.append({"destination": mount["mountPath"], "type": "bind",
                           "source": str(self._volume_source(mount["name"])), "options": options})
        return mounts, propagations

    def _volume_source(self, name: str) -> Path:
        volume = self.workload.volume(name)
        if "hostPath" in volume:
            path = volume["hostPath"]["path"]
            if path in REAL_HOST_PATHS:
                return Path(path)
            source = self.cluster.host_root / path.lstrip("/")
        else:  # emptyDir, or a Secret: a directory of the pod
            source = self.directory / "volumes" / name
        if "secret" in volume and not source.exists():
            self._write_secret(volume["secret"], source)
        source.mkdir(parents=True, exist_ok=True)
        return source

    def _write_secret(self, secret: dict[str, object], target: Path) -> None:
        """As the kubelet's atomic writer lays a Secret volume out: the files in a timestamped directory,
        `..data` pointing at it, each top-level name a symlink through `..data`; modes from the item or
        `defaultMode` (0644); with the pod's fsGroup, group-owned by it and group-readable."""
        data = self.cluster.secrets.get(str(secret["secretName"]))
        if data is None:
            if secret.get("optional"):
                return   # an empty directory
            raise RuntimeError(f"{self.name}: Secret {secret['secretName']} does not exist: the kubelet would "
                               "not start this pod")
        items = secret.get("items") or [{"key": key, "path": key} for key in data]
        fs_group = self.workload.pod.get("securityContext", {}).get("fsGroup")
        payload = target / "..2025_01_01_00_00_00.000000001"
        payload.mkdir(parents=True)
        for item in items:  # type: ignore[union-attr]
            path = payload / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[item["key"]])
            mode = item.get("mode", secret.get("defaultMode", 0o644))
            if fs_group is not None:
                os.chown(path, 0, fs_group)
                mode |= 0o440
            path.chmod(mode)
        (target / "..data").symlink_to(payload.name)
        for top in {str(item["path"]).split("/")[0] for item in items}:  # type: ignore[union-attr]
            (target / top).symlink_to(f"..data/{top}")


class PodCluster:
    """The cluster around the pods: a pod network (a bridge, a /24 of 10.214.0.0/16), cluster DNS
    (dnsmasq at the bridge's address, Services' names to their pods' IPs), a stand-in host root for
    hostPath volumes (a shared mount), the namespace's Secrets, runc state of its own. `close()` removes all of it."""

    def __init__(self, workdir: Path, image_rootfs: Path, image_env: list[str], node_name: str = "worker-1",
                 secrets_by_name: dict[str, dict[str, bytes]] | None = None) -> None:
        self.token = "k8" + secrets.token_hex(3)
        self.workdir, self.image_rootfs, self.image_env, self.node_name = workdir, image_rootfs, image_env, node_name
        self.secrets = secrets_by_name or {}   # the namespace's Secrets: name -> key -> bytes
        self.runc_root = workdir / "runc"
        self.host_root = workdir / "host"
        self.pods: list[Pod] = []
        self.records: dict[str, list[str]] = {}
        self.host_root.mkdir(parents=True)
        # A kubelet needs the host's side of a Bidirectional mount to be shared: a peer group of its own.
        subprocess.run(["mount", "--bind", str(self.host_root), str(self.host_root)], check=True)
        subprocess.run(["mount", "--make-private", str(self.host_root)], check=True)
        subprocess.run(["mount", "--make-shared", str(self.host_root)], check=True)
        with host_network_lock():
            with open_links() as links:
                taken = links.ipv4_networks()
            subnet = pick_subnet(IPv4Network("10.214.0.0/16"), 24, taken, first=secrets.randbelow(256))
            self.network = BridgeNetwork(BridgeSpec(bridge=f"{self.token}b", subnet=subnet, table=f"{self.token}",
                                                    veth_prefix=f"{self.token}v", sandboxed=False))
            self.network.up()
        self.gateway = str(self.network.spec.gateway.ip)
        self.dns = DnsServer(workdir / "dns", address=self.gateway)

    def run_pod(self, workload: Workload, extra_args: dict[str, list[str]] | None = None) -> Pod:
        index = len(self.pods) + 2
        name = f"{workload.name}-{secrets.token_hex(3)}"
        pod = Pod(self, workload, name, str(self.network.spec.address(index).ip), self.workdir / "pods" / name,
                  extra_args or {})
        pod.directory.mkdir(parents=True)
        search = f"{NAMESPACE}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}"
        (pod.directory / "resolv.conf").write_text(f"search {search}\nnameserver {self.gateway}\noptions ndots:5\n")
        (pod.directory / "hosts").write_text(f"127.0.0.1\tlocalhost\n{pod.ip}\t{name}\n")
        (pod.directory / "hostname").write_text(f"{name}\n")
        create_namespace(pod.netns)
        self.pods.append(pod)
        self.network.attach(Namespace.named(pod.netns), index)
        pod.start()
        return pod

    def publish(self, service: str, pods: list[Pod]) -> None:
        """The Service's DNS name resolves to these pods' IPs (a headless Service's records)."""
        self.dns.set(f"{service}.{NAMESPACE}.svc.{CLUSTER_DOMAIN}", [pod.ip for pod in pods])

    def leftovers(self) -> list[str]:
        """What this cluster still holds on the host: runc containers, mounts, namespaces, processes."""
        found: list[str] = []
        listed = subprocess.run(["runc", "--root", str(self.runc_root), "list", "-q"], capture_output=True, text=True)
        found += [f"runc container {c}" for c in listed.stdout.split()]
        with open("/proc/self/mounts") as table:
            found += [f"mount {line.split()[1]}" for line in table if str(self.workdir) in line.split()[1]]
        found += [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(self.token)] \
            if os.path.isdir("/run/netns") else []
        for directory in cgroups.directories(f"/{self.token}-k8s"):
            procs = directory / "cgroup.procs"
            if procs.exists():
                for path in directory.rglob("cgroup.procs"):
                    found += [f"process {pid} in {path.parent}" for pid in path.read_text().split()]
        return found

    def close(self) -> None:
        """Stop every pod (kubelet order), then remove the network, DNS, mounts and cgroups; every step
        runs even when an earlier one failed (the first failure is raised at the end)."""
        failures: list[BaseException] = []

        def step(work) -> None:
            try:
                work()
            except BaseException as error:  # noqa: BLE001 - reported after the remaining steps
                failures.append(error)

        for pod in reversed(self.pods):
            step(pod.stop)
        step(self.network.down)   # veths first: a namespace's removal takes its veth asynchronously
        for pod in self.pods:
            step(lambda pod=pod: delete_namespace(pod.netns))
        step(self.dns.stop)
        step(lambda: unmount_everything_under(self.workdir))
        step(lambda: subprocess.run(["umount", "-l", str(self.host_root)], capture_output=True))
        for directory in cgroups.directories(f"/{self.token}-k8s"):
            for child in sorted(directory.glob("**/"), key=lambda p: len(str(p)), reverse=True):
                step(child.rmdir)
        if failures:
            raise failures[0]
