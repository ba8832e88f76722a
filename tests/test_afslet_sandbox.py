"""afslet's sandbox for untrusted code, with real runc containers: what a container can reach in each
network mode (`bridge`, the default; `none`; `host`), what the default sandbox refuses (seccomp,
capabilities, no_new_privs, masked paths), the same under `--userns`, and the bounds of one call
(deadlines, extra-file and writable-layer caps, concurrent calls).

Every daemon of the cluster listens on 0.0.0.0, so "closed" means closed on every address of the host:
the bridge's gateway, the host's own addresses, loopback. "The internet" is an HTTP server in a network
namespace the test creates (tests/support/internet.py), and DNS a dnsmasq on a 127.0.53.x address that the
afslet is told is the host's resolver (`--resolv-conf`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from afsd.api import afslet_pb2, afslet_pb2_grpc
from afsd.lab.daemons import Daemon, metrics_address
from afsd.afslet.network import instance_names
from afsd.net.links import open_links
from afsd.net.nft import NftTable
from tests.support.afslet import (
    AfsletCluster,
    direct_execute,
    file_entry,
    module_cluster,
    sdk_execute,
    sdk_execute_call,
)
from tests.support.dns import DnsServer
from tests.support.internet import BODY, Internet
from tests.support.overlay import volatile_overlay_options
from tests.support.sandbox import parse_probe, probe_entry

afslet_cluster = module_cluster("sandbox", host="0.0.0.0")
pytestmark = pytest.mark.usefixtures("nothing_left_behind")

USERNS_START = 1_000_000_000
NAME = "internet.afsd.test"
EPERM = "errno 1 "



@pytest.fixture(scope="module")
def dns(internet: Internet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    server = DnsServer(tmp_path_factory.mktemp("dns"))
    try:
        server.set(NAME, [internet.server_address])
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def userns_afslet(afslet_cluster: AfsletCluster) -> Iterator[tuple[Daemon, Path]]:
    """An afslet with --userns and a shared host directory bind-mounted at /shared. Its work dir is one
    the containers' root can traverse to (pytest's temporary directories are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="afsd-userns-"))
    base.chmod(0o711)
    shared = base / "shared"
    shared.mkdir()
    os.chown(shared, USERNS_START, USERNS_START)  # the operator gives it to the containers' root
    try:
        daemon = afslet_cluster.start_afslet("afslet-userns", workdir=base, extra_args=[
            "--userns", "--userns-range", f"{USERNS_START}:65536", "--bind", f"{shared}:/shared"])
        try:
            yield daemon, shared
        finally:
            daemon.stop()
            afslet_cluster.extra_afslets.remove(daemon)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def http_get(address: str) -> str:
    """Shell that prints the body of http://ADDRESS/ (or `no internet`)."""
    return (f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {address} 80 >/tmp/http 2>&1 "
            "&& tail -n 1 /tmp/http || echo 'no internet'")


def _host_addresses() -> list[str]:
    with open_links() as host:
        return [str(a) for a in host.ipv4_addresses() if not a.is_loopback and not str(a).startswith("10.21")]


def _service_ports(cluster: AfsletCluster) -> dict[str, int]:
    ports = {"discovery": cluster.discovery.port, "layerstore": cluster.daemons[1].port, "afslet": cluster.afslet.port}
    for daemon in [*cluster.daemons, cluster.afslet]:
        if address := metrics_address(daemon):
            ports[f"{daemon.name} metrics"] = int(address.rpartition(":")[2])
    return ports


def _reachability(afslet: Daemon, cluster: AfsletCluster, addresses: list[str], ports: dict[str, int],
                  extra: str = "") -> tuple[dict[str, bool], list[str], list[str]]:
    """Which `address:port` a container of `afslet` can connect to; the network log lines; extra output."""
    checks = [f"nc -w 2 {a} {p} </dev/null >/dev/null 2>&1 && echo 'open {a}:{p}' || echo 'closed {a}:{p}'"
              for a in addresses for p in ports.values()]
    script = "; ".join([*checks, extra or "true"])
    result = sdk_execute(afslet, image=cluster.images["tools"], command=["/bin/sh", "-c", script],
                         timeout_ms=120_000)
    assert result.error is None, result.error
    found = {line.split()[1]: line.startswith("open") for line in result.stdout
             if line.startswith(("open ", "closed "))}
    rest = [line for line in result.stdout if not line.startswith(("open ", "closed "))]
    return found, result.lines("network"), rest


def test_the_nodes_services_are_closed_to_bridge_and_none_containers_and_open_in_host_mode(
        afslet_cluster: AfsletCluster, internet: Internet, dns: DnsServer) -> None:
    bridge = afslet_cluster.start_afslet("afslet-bridge", extra_args=["--resolv-conf", str(dns.resolv_conf)])
    none = afslet_cluster.start_afslet("afslet-none", extra_args=["--network", "none"])
    host = afslet_cluster.start_afslet("afslet-host", extra_args=["--network", "host"])
    ports = _service_ports(afslet_cluster)
    assert len(ports) >= 7, ports  # discovery, layerstore, afslet and their metrics, the node's metrics
    # (busybox's static wget crashes in its name-service setup in this minimal image; nc speaks HTTP/1.0)
    internet_checks = (f"{http_get(internet.server_address)}; "
                       f"nslookup {NAME} >/tmp/ns 2>&1; grep -q 'Address: {internet.server_address}$' /tmp/ns "
                       "&& echo 'dns ok' || { echo 'no dns'; cat /tmp/ns; }; cat /etc/resolv.conf")

    # bridge: not the gateway, not any address of the host, not loopback (its own); the internet and DNS work
    with open_links() as links:
        gateway_hint = [n for n in links.names("afsb")]
    assert gateway_hint, "the bridge afslet made no bridge"
    found, network, rest = _reachability(bridge, afslet_cluster, ["127.0.0.1", *_host_addresses()], ports,
                                         internet_checks)
    (line,) = network
    gateway = line.split(" via ")[1].split()[0]
    found_gw, _, _ = _reachability(bridge, afslet_cluster, [gateway], ports)
    print("bridge:", network, {**found, **found_gw}, rest)
    assert found and not any(found.values()), found
    assert found_gw and not any(found_gw.values()), found_gw
    assert BODY.decode().strip() in rest, rest
    assert "dns ok" in rest, rest
    assert f"nameserver {gateway}" in rest, rest  # the host's loopback resolver, through the gateway

    # none: loopback only
    found, network, rest = _reachability(none, afslet_cluster, [gateway, *_host_addresses()], ports,
                                         http_get(internet.server_address))
    print("none:", found, rest)
    assert found and not any(found.values()), found
    assert network == [] and "no internet" in rest

    # host: only when the operator says so — then everything of the node is reachable
    found, _, _ = _reachability(host, afslet_cluster, ["127.0.0.1"], ports)
    print("host:", found)
    assert found and all(found.values()), found


def _sandbox_checks(afslet: Daemon, cluster: AfsletCluster) -> dict[str, str]:
    script = ("/probe; unshare -r true 2>/dev/null && echo 'unshare-r: ok' || echo 'unshare-r: refused'; "
              "mkdir -p /tmp/m; mount -t tmpfs none /tmp/m 2>/dev/null && echo 'mount-cmd: ok' "
              "|| echo 'mount-cmd: refused'; cat /proc/self/uid_map | tr -s ' ' | sed 's/^/uid_map:/'")
    result = sdk_execute(afslet, image=cluster.images["tools"], command=["/bin/sh", "-c", script],
                         extra_entries=[probe_entry("probe")], timeout_ms=60_000)
    assert result.error is None and result.result["exit_code"] == 0, (result.error, result.stderr)
    found = parse_probe(result.stdout)
    found["uid_map"] = next(line for line in result.stdout if line.startswith("uid_map:"))[len("uid_map:"):]
    return found


def _assert_refused(found: dict[str, str]) -> None:
    for probe in ("raw_socket", "unshare_user", "unshare_mount", "mount", "init_module", "finit_module",
                  "ptrace_attach"):
        assert found[probe].startswith(EPERM), (probe, found[probe])
    assert found["kcore"] in ("ok read 0 bytes", ) or found["kcore"].startswith("errno"), found["kcore"]
    assert found["unshare-r"] == "refused" and found["mount-cmd"] == "refused", found


def _setuid_gives_nothing(afslet: Daemon, cluster: AfsletCluster) -> str:
    """A setuid-root copy of the probe, run by the image's non-root user `app`: its euid stays 1000."""
    result = sdk_execute(afslet, image=cluster.images["appuser"], command=["/suid-probe id; id -u"],
                         extra_entries=[probe_entry("suid-probe", mode=0o4755, uid=0, gid=0)], timeout_ms=60_000)
    assert result.error is None, result.error
    return " ".join(result.stdout)


def test_the_default_sandbox_refuses_what_escapes_a_container(afslet_cluster: AfsletCluster) -> None:
    found = _sandbox_checks(afslet_cluster.afslet, afslet_cluster)
    print(found)
    _assert_refused(found)
    assert found["uid_map"].split() == ["0", "0", "4294967295"]  # no user namespace: container root is host root
    ids = _setuid_gives_nothing(afslet_cluster.afslet, afslet_cluster)
    assert ids == "id: uid=1000 euid=1000 gid=1000 egid=1000 1000", ids


def test_the_same_sandbox_under_userns_where_container_root_is_not_host_root(
        afslet_cluster: AfsletCluster, userns_afslet: tuple[Daemon, Path]) -> None:
    afslet, shared = userns_afslet
    assert "user namespaces: container uid/gid 0-65535 are host 1000000000-1000065535" in afslet.log()
    found = _sandbox_checks(afslet, afslet_cluster)
    print(found)
    _assert_refused(found)
    assert found["uid_map"].split() == ["0", str(USERNS_START), "65536"]
    ids = _setuid_gives_nothing(afslet, afslet_cluster)
    assert ids == "id: uid=1000 euid=1000 gid=1000 egid=1000 1000", ids

    script = ("id -u; touch /shared/made-by-root; stat -c '%u:%g' /shared/made-by-root; "
              "echo changed > /srv/data/modify-me.txt; stat -c '%u:%g' /srv/data/keep.txt")
    result = sdk_execute(afslet, image=afslet_cluster.images["tools"], command=["/bin/sh", "-c", script],
                         timeout_ms=60_000)
    assert result.error is None and result.result["exit_code"] == 0, (result.error, result.stderr)
    assert result.stdout == ["0", "0:0", "0:0"]  # root inside; the image's files are root's inside
    made = (shared / "made-by-root").stat()
    assert (made.st_uid, made.st_gid) == (USERNS_START, USERNS_START)  # on the host: the mapped uid
    assert result.files()["srv/data/modify-me.txt"] == b"changed\n"
    members = result.of("tar_file")
    assert members and all(m.get("uid", 0) == 0 for m in members), members  # the tar speaks container ids

    # afslet's own overlay over the idmapped layers: its upper is volatile scratch too (no disk sync at teardown)
    root = sdk_execute(afslet, image=afslet_cluster.images["tools"], timeout_ms=60_000,
                       command=["/bin/sh", "-c", "grep ' / / ' /proc/self/mountinfo"])
    assert root.error is None and len(root.stdout) == 1, (root.error, root.stdout, root.stderr)
    assert volatile_overlay_options(root.stdout[0].split(" - ", 1)[1].split()[-1]), root.stdout


def _silent_stream(address: str, release: threading.Event) -> tuple[threading.Thread, list[object]]:
    """An Execute call that never sends a frame (until `release`); the thread ends with the call."""
    outcome: list[object] = []

    def run() -> None:
        def frames() -> Iterator[afslet_pb2.ExecuteRequest]:
            release.wait()
            return
            yield  # noqa: unreachable - a generator that sends nothing
        with grpc.insecure_channel(address) as channel:
            try:
                for _ in afslet_pb2_grpc.AfsletStub(channel).Execute(frames(), timeout=120):
                    pass
                outcome.append("ended")
            except grpc.RpcError as error:
                outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _status(afslet: Daemon) -> afslet_pb2.GetRuntimeStatusResponse:
    with grpc.insecure_channel(afslet.address) as channel:
        return afslet_pb2_grpc.AfsletStub(channel).GetRuntimeStatus(afslet_pb2.GetRuntimeStatusRequest(), timeout=10)


def _wait_until_served(afslet: Daemon, timeout: float = 20.0) -> afslet_pb2.GetRuntimeStatusResponse:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _status(afslet)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_silent_clients_are_ended_at_their_deadlines_and_release_what_they_held(
        afslet_cluster: AfsletCluster) -> None:
    afslet = afslet_cluster.start_afslet("afslet-deadlines", extra_args=[
        "--first-frame-timeout", "3", "--upload-timeout", "3", "--max-concurrent-rpcs", "2"])
    release = threading.Event()
    try:
        started = time.monotonic()
        silent = [_silent_stream(afslet.address, release) for _ in range(2)]
        time.sleep(1.0)
        with pytest.raises(grpc.RpcError) as refused:  # both slots held by clients that send nothing
            _status(afslet)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for thread, outcome in silent:
            thread.join(60)
            (error,) = outcome
            assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
            assert "no start frame within 3 s (afsd let --first-frame-timeout)" in error.details()
        assert 3 <= time.monotonic() - started < 30
        _wait_until_served(afslet)  # the slots are free again

        # Admitted (its share held), then the upload never ends: the share comes back at the deadline.
        hold = threading.Event()
        call = direct_execute(afslet, hold=hold, image=afslet_cluster.images["tools"], command=["true"])
        call.wait_for(lambda r: r.WhichOneof("payload") == "accepted")
        assert _status(afslet).used_cpu_cores == 1
        call.finish(60)
        assert call.error is not None and call.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not end within 3 s (afsd let --upload-timeout)" in call.error.details()
        hold.set()
        afslet_cluster.wait_idle(afslet)
        ok = sdk_execute(afslet, image=afslet_cluster.images["tools"], command=["echo", "still serving"])
        assert ok.stdout == ["still serving"]
    finally:
        release.set()


def test_oversized_uploads_and_writable_layers_get_resource_exhausted_naming_the_limit(
        afslet_cluster: AfsletCluster) -> None:
    afslet = afslet_cluster.start_afslet("afslet-bounds", extra_args=[
        "--max-extra-bytes", "1000000", "--max-extra-entries", "5", "--max-upper-bytes", "2000000"])
    tools = afslet_cluster.images["tools"]
    too_big = sdk_execute(afslet, image=tools, command=["true"],
                          extra_entries=[file_entry("big.bin", b"x" * 1_500_000)])
    assert too_big.error["status"] == "RESOURCE_EXHAUSTED", too_big.error
    assert "limit of 1000000 bytes (afsd let --max-extra-bytes)" in too_big.error["message"]
    too_many = sdk_execute(afslet, image=tools, command=["true"],
                           extra_entries=[file_entry(f"f{n}", b"x") for n in range(6)])
    assert too_many.error["status"] == "RESOURCE_EXHAUSTED", too_many.error
    assert "limit of 5 entries (afsd let --max-extra-entries)" in too_many.error["message"]
    big_layer = sdk_execute(afslet, image=tools, command=["/bin/sh", "-c", "dd if=/dev/zero of=/big bs=1M count=3"])
    assert big_layer.error["status"] == "RESOURCE_EXHAUSTED", big_layer.error
    assert "over this afslet's limit of 2000000 bytes (afsd let --max-upper-bytes)" in big_layer.error["message"]
    ok = sdk_execute(afslet, image=tools, command=["/bin/sh", "-c", "echo fine > /small; cat /small"],
                     extra_entries=[file_entry("small.txt", b"y" * 1000)])
    assert ok.error is None and ok.stdout == ["fine"] and ok.files()["small"] == b"fine\n"


def test_an_afslets_network_goes_at_sigterm_and_a_killed_ones_is_replaced_at_its_next_start(
        afslet_cluster: AfsletCluster) -> None:
    afslet = afslet_cluster.start_afslet("afslet-crash")
    names = instance_names(Path(afslet.args[afslet.args.index("--work-dir") + 1]))
    tools = afslet_cluster.images["tools"]

    def present() -> tuple[bool, list[str], bool]:
        with open_links() as host:
            return (host.index(names.bridge) is not None, host.names(names.veth_prefix),
                    NftTable("inet", names.table).exists())

    call = sdk_execute_call(afslet, image=tools, command=["sleep", "300"], timeout_ms=300_000)
    call.wait_for(lambda e: e["event"] == "log" and e["source"] == "network")
    bridge, veths, table = present()
    assert bridge and len(veths) == 1 and table
    afslet.kill()  # SIGKILL: nothing of it is cleaned up
    call.kill()
    bridge, veths, table = present()
    assert bridge and table

    afslet.start()  # its successor removes the container (its veth goes with its namespace) and the old bridge
    ok = sdk_execute(afslet, image=tools, command=["echo", "after the crash"])
    assert ok.stdout == ["after the crash"] and len(ok.lines("network")) == 1
    bridge, veths, table = present()
    assert bridge and veths == [] and table
    assert afslet.stop() == 0
    afslet_cluster.extra_afslets.remove(afslet)
    assert present() == (False, [], False)  # SIGTERM: the bridge, its veths and its rules are gone
