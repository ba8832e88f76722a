"""Benchmark of `afsd let`: warm Execute of `/bin/true` against a bare `runc run`, and cold Execute of
an image only a peer holds against pulling it yourself.

What it measures, in one run on loopback with real daemons (docker-registry, discovery, a *peer*
layerstore, the node's own layerstore, a node daemon, one afslet; mounts with `--backend`, default
auto). Every test image is a busybox root filesystem, an application layer and a layer of
`--data-mib` seeded bytes, each with content of its own, so no two images share a layer.

1. Floor: foreground `runc run` (create + start + wait + delete) of `/bin/true` in the warm image's
   root filesystem, mounted once through the node daemon the way afslet mounts it (layers + a
   mount-stub dir + a writable upper), with the bundle afslet writes (`afsd.afslet.bundle`). The
   first run after each mount fills the page cache and is not counted.
2. Warm Execute of `/bin/true` through the afslet, the image's blobs already on the node (five calls
   warm up first). Each call mounts and unmounts the image itself; no other mount of it is held
   meanwhile, so the floor runs and the warm calls alternate in `--rounds` blocks, not call by call.
   Ratio = warm / floor at p50 and p95.
3. Cold Execute: for each of `--cold-images` images that only the peer layerstore pulled beforehand
   (never seen by this node, its layerstore or the afslet), one Execute of `/bin/true`, first frame to
   `done`. Baselines: the warm p50 (ratio cold / warm), and `PullImage` of the same image on a fresh
   layerstore with no peers (pull + convert from the registry: what "pull it yourself first" costs
   before any container can start; the table adds the warm p50 to it for "pull, then run"). At the
   end it checks that the node's own layerstore holds none of these images (it would, had the node
   had it pull one from the registry instead of reading from the peer).

4. With `--modes bridge,none,host,userns`: warm Executes of `/bin/true` on one more afslet per sandbox
   mode (`userns` = bridge + `--userns`), alternating with a baseline afslet in `--rounds` blocks; ratio
   = mode / baseline at p50 and p95. The baseline is today's afslet: with `--baseline-ref REF` the afslet
   of that git ref (`git archive REF`, run with PYTHONPATH pointing at it; its defaults: host network, no
   seccomp, no no_new_privs), otherwise this code's `--network host`.
5. With `--tls`, the cost of mutual TLS on the Execute path: a second afslet on the same node daemon runs
   with a node certificate of a throwaway cluster CA (and resolves images through a discovery replica that
   runs with TLS too); warm Executes of `/bin/true` through the plaintext afslet and through the TLS one
   (the client presenting a user certificate; a fresh connection each block) alternate in `--rounds`
   blocks. Ratio = TLS / plaintext at p50 and p95.

Phase timings (mount, start, run, teardown ...) come from the afslet's `timing` log frames. Execute
calls use afsd's own protos from this process (start frame, half-close, read until `done`), one at a
time. The machine has 2 cores shared by every daemon and the client, and other work may be running:
compare the ratios, not the milliseconds.

Run as root: `.venv/bin/python bench/afslet_bench.py [--runs 50] [--rounds 5] [--cold-images 5]
[--data-mib 4] [--backend auto] [--tls] [--json PATH] [--keep-logs DIR]`. Everything it starts (daemons, mounts, containers,
cgroups, the temp dir) is stopped and removed at exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from _common import MIB, exit_on_sigterm, machine_facts, percentile, print_table, require, write_json
from _execute import ExecuteTiming, execute

from afsd.afslet import bundle, cgroups
from afsd.afslet.extra_files import add_mount_stubs
from afsd.afslet.users import resolve_user
from afsd.api import afslet_pb2_grpc
from afsd.api import discovery_pb2 as dpb
from afsd.api import discovery_pb2_grpc as dgrpc
from afsd.api import layerstore_pb2 as lpb
from afsd.api import layerstore_pb2_grpc as lgrpc
from afsd.errors import AfsdError
from afsd.lab.catalogue import busybox_layers, seeded_bytes
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
from afsd.lab.layers import Entry, LayerSpec
from afsd.lab.oci_layout import ImageSpec, write_oci_layout
from afsd.lab.pki import LabPki
from afsd.lab.registry import RegistryProcess, start_registry
from afsd.lab.skopeo import push_layout
from afsd.trust.tls import TlsConfig
from tests.support.cluster import unmount_everything_under

COMMAND = ["/bin/true"]
CPU_CORES, MEMORY_MB, PIDS_LIMIT = 1, 256, 4096   # the request's share; afsd let's default pids limit
WARM_UP_CALLS = 5
PHASES = ("admission", "receive", "resolve", "mount", "start", "run", "upload", "teardown", "total")
PROVIDER_TIMEOUT = 60.0


# -- images -------------------------------------------------------------------------------------------


def distinct_image(name: str, base: Sequence[LayerSpec], data_bytes: int) -> ImageSpec:
    """The busybox layers plus a data layer, each made unique to `name` so no layer is shared."""
    marker = Entry.file(f"etc/afsd-bench/{name}", f"{name}\n".encode())
    layers = [dataclasses.replace(layer, entries=(*layer.entries, marker)) for layer in base]
    data = LayerSpec((Entry.file("data/seeded.bin", seeded_bytes(name, data_bytes)),))
    return ImageSpec((*layers, data))


def push_images(registry: RegistryProcess, work: Path, names: Sequence[str], data_bytes: int) -> dict[str, str]:
    """Push one distinct image per name; returns name -> reference."""
    scratch = work / "busybox-scratch"
    scratch.mkdir()
    references = {}
    try:
        base = busybox_layers(scratch)  # its entries read their files from `scratch` when written
        for name in names:
            layout_dir = work / "layouts" / name
            layout = write_oci_layout(layout_dir, "v1", distinct_image(name, base, data_bytes))
            references[name] = push_layout(layout, registry.address, f"bench/{name}", "v1").reference
            shutil.rmtree(layout_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return references


# -- control plane ------------------------------------------------------------------------------------


def pull_image(layerstore: Daemon, reference: str) -> tuple[float, list[str]]:
    """PullImage on `layerstore`: (seconds, layer digests)."""
    with grpc.insecure_channel(layerstore.address) as channel:
        started = time.perf_counter()
        response = lgrpc.LayerStoreStub(channel).PullImage(lpb.PullImageRequest(image=reference), timeout=900)
        seconds = time.perf_counter() - started
    return seconds, [layer.digest for layer in response.layers]


def wait_for_provider(discovery: Daemon, node_id: str, digests: Sequence[str], timeout: float) -> bool:
    """Until discovery lists `node_id` as a holder of every layer (its heartbeat carried them)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(discovery.address) as channel:
        stub = dgrpc.ServiceDiscoveryStub(channel)
        while True:
            held = all(any(s.node_id == node_id for s in stub.FindProvider(
                dpb.FindProviderRequest(layer_digest=digest), timeout=30).services) for digest in digests)
            if held:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)


# -- Execute through the afslet -----------------------------------------------------------------------


def execute_true(stub: afslet_pb2_grpc.AfsletStub, image: str) -> ExecuteTiming:
    """One Execute of /bin/true: start frame, half-close, read until `done`; RuntimeError unless exit 0."""
    return execute(stub, image, COMMAND, cpu_cores=CPU_CORES, memory_mb=MEMORY_MB)


# -- the floor: runc run of the same rootfs, mounted once ---------------------------------------------


def afsd_cli(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "afsd", *args], capture_output=True, text=True, timeout=300,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"afsd {' '.join(args)} failed: {result.stderr.strip()}")


def sweep_containers(runc_root: Path, cgroup_parent: str) -> None:
    """Delete every container under `runc_root` and every cgroup under `cgroup_parent` (clean-up)."""
    if runc_root.exists():
        listed = subprocess.run(["runc", "--root", str(runc_root), "list", "--quiet"], capture_output=True,
                                text=True, check=False)
        for container in listed.stdout.split():
            subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", container],
                           capture_output=True, check=False)
    for child in cgroups.children(cgroup_parent):
        cgroups.remove(child)
    cgroups.remove_if_empty(cgroup_parent)


class RuncFloor:
    """The warm image mounted once through the node daemon, as afslet mounts it, and runc run in it."""

    def __init__(self, work: Path, node: Daemon, image: str, backend: str) -> None:
        self.work, self.node, self.image, self.backend = work, node, image, backend
        self.rootfs, self.extra, self.bundle = work / "rootfs", work / "extra", work / "bundle"
        self.runc_root = work / "runc"
        self.cgroup_parent = f"/afsd-bench-floor-{hashlib.sha256(str(work).encode()).hexdigest()[:8]}"
        self.mounted = False
        self.count = 0

    def mount(self) -> None:
        for directory in (self.rootfs, self.extra, self.work / "rw"):
            directory.mkdir(parents=True, exist_ok=True)
        add_mount_stubs(str(self.extra), resolv_conf=True)
        afsd_cli("mount", "--socket", str(self.node.socket_path), "--backend", self.backend,
                 "--upper", str(self.work / "rw"), "--extra-dir", str(self.extra), self.image, str(self.rootfs))
        self.mounted = True

    def unmount(self) -> None:
        if self.mounted:
            afsd_cli("umount", "--socket", str(self.node.socket_path), str(self.rootfs))
            self.mounted = False

    def run_once(self) -> float:
        """Milliseconds of one foreground `runc run` (create + start + wait + delete) of /bin/true."""
        self.count += 1
        container = f"floor-{self.count}"
        user = resolve_user(self.rootfs, "")
        config = bundle.oci_config(
            rootfs=self.rootfs, args=COMMAND, env=[*ImageSpec(()).env, f"HOME={user.home}"], cwd="/", user=user,
            cgroups_path=f"{self.cgroup_parent}/{container}",
            limits=bundle.ContainerLimits(CPU_CORES, MEMORY_MB, PIDS_LIMIT),
            isolation=bundle.Isolation(own_network=False),
            resolv_conf=Path("/etc/resolv.conf"))
        bundle.write_bundle(self.bundle, config)
        argv = ["runc", "--root", str(self.runc_root), "--log", str(self.work / "runc.log"), "--log-format", "json",
                "run", "--bundle", str(self.bundle), container]
        started = time.perf_counter()
        ran = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)
        milliseconds = (time.perf_counter() - started) * 1000
        if ran.returncode != 0:
            raise RuntimeError(f"runc run of /bin/true exited {ran.returncode}: {ran.stderr.strip()}")
        return milliseconds

    def cleanup(self) -> None:
        try:
            self.unmount()
        finally:
            sweep_containers(self.runc_root, self.cgroup_parent)


# -- the run ------------------------------------------------------------------------------------------


def p50(values: Sequence[float]) -> float:
    return percentile(values, 0.5)


def p95(values: Sequence[float]) -> float:
    return percentile(values, 0.95)


def phase_p50(timings: Sequence[ExecuteTiming], phase: str) -> float | str:
    values = [t.phases[phase] for t in timings if phase in t.phases]
    return p50(values) if values else "-"


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cleanup_step(what: str, step: Callable[[], object]) -> None:
    try:
        step()
    except (AfsdError, RuntimeError, OSError, subprocess.SubprocessError, grpc.RpcError) as error:
        progress(f"clean-up of {what} failed: {error}")


def alternate(rounds: int, runs: int, *blocks: Callable[[int], None]) -> None:
    """Run each block `rounds` times in turn, splitting `runs` calls over the rounds; the order rotates
    each round, so that no block always comes first."""
    for round_index in range(rounds):
        share = runs // rounds + (1 if round_index < runs % rounds else 0)
        for position in range(len(blocks)):
            blocks[(position + round_index) % len(blocks)](share)
        progress(f"warm round {round_index + 1}/{rounds} done")


MODES = {"bridge": ["--network", "bridge"], "none": ["--network", "none"], "host": ["--network", "host"],
         "userns": ["--network", "bridge", "--userns"]}


def baseline_tree(ref: str, into: Path) -> Path:
    """The source tree of git `ref` of this checkout, unpacked into `into`."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(Path(__file__).parent), "archive", ref], capture_output=True,
                             check=False)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {ref}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def mode_afslets(work: Path, node: Daemon, discovery: Daemon, modes: list[str], backend: str,
                 baseline_ref: str | None) -> dict[str, Daemon]:
    """One afslet per mode plus the baseline, not yet started (the work dir is made traversable for userns)."""
    work.chmod(0o711)
    afslets: dict[str, Daemon] = {}
    for mode in ["baseline", *modes]:
        flags = MODES.get(mode, [] if baseline_ref else MODES["host"])
        afslets[mode] = afslet_daemon(work, f"afslet-{mode}", node, [discovery.address], limit_cpu=2,
                                      limit_memory_mb=1024, stop_timeouts=SHORT_STOP_TIMEOUTS,
                                      extra_args=["--mount-backend", backend, *flags])
    if baseline_ref:
        afslets["baseline"].env = {"PYTHONPATH": str(baseline_tree(baseline_ref, work / "baseline-src"))}
    return afslets


def start_tls_afslet(work: Path, node: Daemon, registry_args: list[str], daemons: list[Daemon], backend: str) -> Daemon:
    """A discovery replica and an afslet (on `node`) with node certificates of a throwaway CA in work/pki."""
    pki = LabPki(work / "pki")
    discovery = discovery_daemon(work, "discovery-tls", registry_args=registry_args, tls_dir=pki.node("discovery-tls"))
    start_all([discovery])
    daemons.append(discovery)
    afslet = afslet_daemon(work, "afslet-tls", node, [discovery.address], limit_cpu=2, limit_memory_mb=1024,
                           stop_timeouts=SHORT_STOP_TIMEOUTS, extra_args=["--mount-backend", backend],
                           tls_dir=pki.node("afslet-tls"))
    afslet.start()
    daemons.append(afslet)
    return afslet


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50, help="floor runs and warm Executes (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating floor/warm blocks (default %(default)s)")
    parser.add_argument("--cold-images", type=int, default=5, help="never-seen images (default %(default)s)")
    parser.add_argument("--data-mib", type=int, default=4, help="seeded bytes per image's data layer (MiB)")
    parser.add_argument("--backend", default="auto", choices=("auto", "fanotify", "fscache", "eager"),
                        help="the afslet's --mount-backend and the floor's mount (default %(default)s)")
    parser.add_argument("--layer-linger", type=float, default=0.0, metavar="SECONDS",
                        help="the node daemon's --layer-linger (default %(default)s: layers released at once)")
    parser.add_argument("--tls", action="store_true",
                        help="also measure warm Execute through an afslet running mutual TLS (ratio to plaintext)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep-logs", type=Path, help="copy the daemons' logs here before clean-up")
    parser.add_argument("--modes", default="", help="also time warm Executes per sandbox mode, comma-separated "
                                                    f"from {','.join(MODES)} (default: none)")
    parser.add_argument("--baseline-ref", metavar="REF", help="git ref whose afslet is the --modes baseline "
                                                              "(default: this code's --network host)")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    if args.runs < 1 or not 1 <= args.rounds <= args.runs or args.cold_images < 1 or args.data_mib < 0:
        parser.error("--runs, --cold-images >= 1; 1 <= --rounds <= --runs; --data-mib >= 0")
    require("runc", "docker-registry", "skopeo", "mkfs.erofs", "busybox")
    exit_on_sigterm()

    work = Path(tempfile.mkdtemp(prefix="afsd-afslet-bench-", dir="/var/tmp"))  # ext4: fanotify needs it
    registry: RegistryProcess | None = None
    daemons: list[Daemon] = []   # stopped in reverse order
    afslet: Daemon | None = None
    by_mode: dict[str, Daemon] = {}
    mode_runs: dict[str, list[ExecuteTiming]] = {}
    floor: RuncFloor | None = None
    floor_ms: list[float] = []
    warm: list[ExecuteTiming] = []
    cold: list[ExecuteTiming] = []
    pulls: list[float] = []
    plain_vs_tls: dict[str, list[ExecuteTiming]] = {"plaintext": [], "mutual TLS": []}
    own_pulls = 0
    try:
        registry = start_registry(work / "registry")
        cold_names = [f"cold{index}" for index in range(args.cold_images)]
        progress(f"pushing {1 + len(cold_names)} images ...")
        references = push_images(registry, work, ["warm", *cold_names], args.data_mib * MIB)

        registry_args = ["--insecure-registry", registry.address]
        discovery = discovery_daemon(work, "discovery", registry_args=registry_args)
        start_all([discovery])
        daemons.append(discovery)
        peer = layerstore_daemon(work, "peer", [discovery.address], heartbeat_period=1.0, registry_args=registry_args)
        alone = layerstore_daemon(work, "alone", [], registry_args=registry_args)  # no peers: pulls from the registry
        daemons += [peer, alone]
        start_all([peer, alone])

        # The peer pulls before the node's own layerstore exists: a live layerstore that ranks first for a
        # layer would be asked to fetch it (the designated puller) and would then hold it too.
        progress("the peer pulls the never-seen images ...")
        cold_layers: dict[str, list[str]] = {}
        for name in cold_names:
            _, cold_layers[name] = pull_image(peer, references[name])
            if not wait_for_provider(discovery, "peer", cold_layers[name], PROVIDER_TIMEOUT):
                raise RuntimeError(f"discovery does not list the peer as holding {references[name]}")

        own_store = layerstore_daemon(work, "store-node", [discovery.address], heartbeat_period=1.0,
                                      registry_args=registry_args)
        daemons.append(own_store)
        start_all([own_store])
        node = node_daemon(work, "node", [discovery.address], layerstore=own_store,
                           extra_args=["--layer-linger", f"{args.layer_linger:g}"])
        daemons.append(node)
        node.start()
        afslet = afslet_daemon(work, "afslet", node, [discovery.address], limit_cpu=2, limit_memory_mb=1024,
                               stop_timeouts=SHORT_STOP_TIMEOUTS, extra_args=["--mount-backend", args.backend])
        afslet.start()
        pull_image(alone, references["warm"])  # warms the fresh layerstore's code paths, not timed

        channel = grpc.insecure_channel(afslet.address)
        try:
            stub = afslet_pb2_grpc.AfsletStub(channel)
            for _ in range(WARM_UP_CALLS):  # the node's own layerstore pulls the warm image on the first
                execute_true(stub, references["warm"])
            floor = runc_floor = RuncFloor(work / "floor", node, references["warm"], args.backend)

            def floor_block(count: int) -> None:
                runc_floor.mount()
                try:
                    runc_floor.run_once()  # the first run after a mount fills the page cache; not counted
                    floor_ms.extend(runc_floor.run_once() for _ in range(count))
                finally:
                    runc_floor.unmount()

            def warm_block(count: int) -> None:
                warm.extend(execute_true(stub, references["warm"]) for _ in range(count))

            alternate(args.rounds, args.runs, floor_block, warm_block)

            if modes:
                by_mode = mode_afslets(work, node, discovery, modes, args.backend, args.baseline_ref)
                start_all(list(by_mode.values()), timeout=120)
                mode_channels = {mode: grpc.insecure_channel(d.address) for mode, d in by_mode.items()}
                stubs = {mode: afslet_pb2_grpc.AfsletStub(c) for mode, c in mode_channels.items()}
                for mode, mode_stub in stubs.items():
                    mode_runs[mode] = []
                    for _ in range(WARM_UP_CALLS):
                        execute_true(mode_stub, references["warm"])

                def mode_block(mode: str) -> Callable[[int], None]:
                    return lambda count: mode_runs[mode].extend(
                        execute_true(stubs[mode], references["warm"]) for _ in range(count))

                alternate(args.rounds, args.runs, *(mode_block(mode) for mode in stubs))
                for mode_channel in mode_channels.values():
                    mode_channel.close()

            for name in cold_names:
                # Never seen by this node: its own layerstore must not hold the image before the Execute
                # (afterwards it may: with --layer-linger the node spreads what it assembled).
                own_pulls += wait_for_provider(discovery, "store-node", cold_layers[name], 0)
                cold.append(execute_true(stub, references[name]))
                pull_seconds, _ = pull_image(alone, references[name])
                pulls.append(pull_seconds * 1000)
                progress(f"cold {name}: Execute {cold[-1].milliseconds:.0f} ms, pull + convert "
                         f"{pulls[-1]:.0f} ms")
            if args.tls:
                afslet_tls = start_tls_afslet(work, node, registry_args, daemons, args.backend)
                user = TlsConfig.from_dir(LabPki(work / "pki").user("bench-user"))

                def block(label: str, address: str, credentials: grpc.ChannelCredentials | None) -> Callable[[int], None]:
                    def run(count: int) -> None:
                        with (grpc.secure_channel(address, credentials) if credentials else
                              grpc.insecure_channel(address)) as fresh:
                            stub_ = afslet_pb2_grpc.AfsletStub(fresh)
                            execute_true(stub_, references["warm"])   # the connection's first call: not counted
                            plain_vs_tls[label].extend(execute_true(stub_, references["warm"]) for _ in range(count))
                    return run
                alternate(args.rounds, args.runs, block("plaintext", afslet.address, None),
                          block("mutual TLS", afslet_tls.address, grpc.ssl_channel_credentials(
                              user.ca_pem, user.key_pem, user.cert_pem)))
        finally:
            channel.close()
    finally:
        # Each step runs even if an earlier one failed: the node daemon's stop unmounts what is left.
        if floor is not None:
            cleanup_step("floor", floor.cleanup)
        for mode_afslet in by_mode.values():
            cleanup_step(mode_afslet.name, mode_afslet.stop)
            cleanup_step(f"{mode_afslet.name} containers", lambda d=mode_afslet: sweep_containers(
                Path(d.args[d.args.index("--work-dir") + 1]) / "runc", d.args[d.args.index("--cgroup-parent") + 1]))
        if afslet is not None:
            cleanup_step("afslet", afslet.stop)
            cleanup_step("afslet containers", lambda: sweep_containers(
                Path(afslet.args[afslet.args.index("--work-dir") + 1]) / "runc",
                afslet.args[afslet.args.index("--cgroup-parent") + 1]))
        for daemon in reversed(daemons):
            cleanup_step(daemon.name, lambda daemon=daemon: stop_daemon(daemon))
        if registry is not None:
            cleanup_step("registry", registry.stop)
        cleanup_step("mounts", lambda: unmount_everything_under(work))
        if args.keep_logs is not None:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for log in work.glob("*.log"):
                shutil.copy(log, args.keep_logs / log.name)
        shutil.rmtree(work, ignore_errors=True)

    floor_p = (p50(floor_ms), p95(floor_ms))
    warm_ms = [t.milliseconds for t in warm]
    warm_p = (p50(warm_ms), p95(warm_ms))
    cold_ms = [t.milliseconds for t in cold]
    cold_p50, pull_p50 = p50(cold_ms), p50(pulls)
    backend = warm[0].backend or args.backend
    facts = machine_facts()

    print(f"\n/bin/true in a 3-layer busybox image ({args.data_mib} MiB data layer), backend {backend}, "
          f"cpu_cores={CPU_CORES} memory_mb={MEMORY_MB}; load average {facts['load_average_1_5_15']}")
    print(f"\nwarm: {args.runs} runs per path in {args.rounds} alternating rounds")
    print_table(["path", "runs", "p50 ms", "p95 ms"],
                [["runc run, rootfs mounted once (floor)", len(floor_ms), *floor_p],
                 ["Execute via afsd let, image on the node", len(warm_ms), *warm_p],
                 ["ratio Execute / floor", "", warm_p[0] / floor_p[0], warm_p[1] / floor_p[1]]])
    print(f"\ncold: {len(cold)} never-seen images, each held only by a peer layerstore (p50 over images)")
    print_table(["path", "runs", "p50 ms", "÷ warm p50", "÷ pull p50"],
                [["warm Execute (above)", len(warm_ms), warm_p[0], 1.0, warm_p[0] / pull_p50],
                 ["pull + convert on a fresh layerstore", len(pulls), pull_p50, pull_p50 / warm_p[0], 1.0],
                 ["pull + convert, then warm Execute (p50 sum)", "", pull_p50 + warm_p[0],
                  (pull_p50 + warm_p[0]) / warm_p[0], (pull_p50 + warm_p[0]) / pull_p50],
                 ["cold Execute via afsd let", len(cold_ms), cold_p50, cold_p50 / warm_p[0], cold_p50 / pull_p50]])
    print("\nafslet phases (its timing frames), p50 ms")
    print_table(["phase", "warm", "cold"], [[phase, phase_p50(warm, phase), phase_p50(cold, phase)]
                                           for phase in PHASES])
    mode_rows = {}
    mode_ms = {mode: [t.milliseconds for t in runs] for mode, runs in mode_runs.items()}
    if mode_ms:
        base = (p50(mode_ms["baseline"]), p95(mode_ms["baseline"]))
        what = f"the afslet of {args.baseline_ref}" if args.baseline_ref else "this afslet with --network host"
        print(f"\nsandbox modes: warm Execute of /bin/true, {args.runs} runs each in {args.rounds} alternating "
              f"rounds; baseline (today's): {what}")
        for mode, values in mode_ms.items():
            mode_rows[mode] = {"p50": p50(values), "p95": p95(values), "ratio_p50": p50(values) / base[0],
                               "ratio_p95": p95(values) / base[1], "runs": values}
        print_table(["afslet", "runs", "p50 ms", "p95 ms", "÷ baseline p50", "÷ baseline p95"],
                    [[mode, len(mode_ms[mode]), r["p50"], r["p95"], r["ratio_p50"], r["ratio_p95"]]
                     for mode, r in mode_rows.items()])
        print("\nsandbox modes: afslet phases (its timing frames), p50 ms")
        print_table(["phase", *mode_runs], [[phase, *(phase_p50(runs, phase) for runs in mode_runs.values())]
                                            for phase in PHASES])
    tls_ratio = {}
    if args.tls:
        plain_ms = [t.milliseconds for t in plain_vs_tls["plaintext"]]
        tls_ms = [t.milliseconds for t in plain_vs_tls["mutual TLS"]]
        tls_ratio = {"p50": p50(tls_ms) / p50(plain_ms), "p95": p95(tls_ms) / p95(plain_ms),
                     "plaintext_ms": plain_ms, "tls_ms": tls_ms}
        print(f"\nmutual TLS: warm Execute of /bin/true, {args.runs} runs per path in {args.rounds} alternating rounds")
        print_table(["path", "runs", "p50 ms", "p95 ms"],
                    [["Execute, plaintext afslet", len(plain_ms), p50(plain_ms), p95(plain_ms)],
                     ["Execute, mutual TLS (user certificate)", len(tls_ms), p50(tls_ms), p95(tls_ms)],
                     ["ratio TLS / plaintext", "", tls_ratio["p50"], tls_ratio["p95"]]])
    on_node = [f"{t.bytes_on_node_at_mount / MIB:.1f}/{t.bytes_total / MIB:.1f}" for t in cold]
    print(f"\ncold mounts, MiB of the image's blobs on the node when the mount returned: {', '.join(on_node)}")
    if own_pulls:
        print(f"WARNING: the node's own layerstore held {own_pulls} of the cold images before their Execute: "
              "they were not (only) read from the peer")
    write_json(args.json, {
        "benchmark": "afslet_execute", "machine": facts,
        "settings": {"runs": args.runs, "rounds": args.rounds, "cold_images": args.cold_images,
                     "data_mib": args.data_mib, "layer_linger": args.layer_linger, "backend": backend, "cpu_cores": CPU_CORES, "memory_mb": MEMORY_MB},
        "floor_ms": {"p50": floor_p[0], "p95": floor_p[1], "runs": floor_ms},
        "warm_ms": {"p50": warm_p[0], "p95": warm_p[1], "runs": warm_ms},
        "warm_ratio_to_floor": {"p50": warm_p[0] / floor_p[0], "p95": warm_p[1] / floor_p[1]},
        "cold_ms": {"p50": cold_p50, "runs": cold_ms},
        "pull_convert_ms": {"p50": pull_p50, "runs": pulls},
        "cold_ratio": {"to_warm_p50": cold_p50 / warm_p[0], "to_pull_p50": cold_p50 / pull_p50},
        "phases_ms": {"warm": [t.phases for t in warm], "cold": [t.phases for t in cold]},
        "cold_bytes_on_node_at_mount": [[t.bytes_on_node_at_mount, t.bytes_total] for t in cold],
        "cold_images_pulled_by_the_node_itself": own_pulls,
        "modes_ms": mode_rows, "baseline_ref": args.baseline_ref, "tls_over_plaintext": tls_ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
