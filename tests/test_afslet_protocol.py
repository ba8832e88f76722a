"""`afsd let` keeps the Execute protocol and the node clean whatever a client does: malformed streams
get INVALID_ARGUMENT with a clear message (and the service keeps serving), a command past its timeout
is stopped and reported as such, a client that disconnects mid-run leaves nothing behind, and
`--network none` isolates the container. Driven with the published afs-sdk client. (afslet's own
SIGTERM, the staged abort's stages and execution management: test_afslet_management.py.)"""

from __future__ import annotations

import base64
import socket
import threading
import urllib.request

import pytest

from afsd.afslet import cgroups
from afsd.lab.daemons import metrics_address
from tests.support.afslet import (
    AfsletCluster,
    assert_nothing_left,
    leftovers,
    module_cluster,
    processes_in_cgroup_tree,
    sdk_execute,
    sdk_execute_call,
    sdk_raw,
)

pytestmark = pytest.mark.usefixtures("nothing_left_behind")

afslet_cluster = module_cluster("afslet-protocol",
                                afslet_args=["--default-timeout-ms", "2000", "--max-timeout-ms", "600000",
                                             "--stop-term-timeout", "1"])


def start(cluster: AfsletCluster, **fields: object) -> dict:
    frame = {"image": cluster.images["tools"], "command": ["true"], "cpuCores": 1, "memoryMb": 64, "timeoutMs": 10_000}
    frame.update(fields)
    return {"start": frame}


def begin(path: str, kind: str = "FILE_TYPE_FILE", **fields: object) -> dict:
    return {"file_begin": {"path": path, "type": kind, **fields}}


def chunk(data: bytes) -> dict:
    return {"file_chunk": {"data_b64": base64.b64encode(data).decode()}}


END = {"file_end": {}}


def malformed_streams(cluster: AfsletCluster) -> list[tuple[str, list[dict], str]]:
    image = cluster.images["tools"]
    return [
        ("no start", [], "missing start request"),
        ("files before start", [begin("a.txt"), END], "first request must be start"),
        ("two starts", [start(cluster), start(cluster)], "duplicate start"),
        ("chunk without begin", [start(cluster), chunk(b"data")], "file_chunk without a preceding file_begin"),
        ("end without begin", [start(cluster), END], "file_end without a preceding file_begin"),
        ("path escaping", [start(cluster), begin("../../escaped.txt"), chunk(b"x"), END],
         "escapes the extra directory"),
        ("path escaping inside", [start(cluster), begin("a/../../escaped.txt"), END], "escapes the extra directory"),
        ("through a symlink", [start(cluster), begin("etc", "FILE_TYPE_SYMLINK", symlinkTarget="/etc"), END,
                               begin("etc/escaped.txt"), chunk(b"x"), END], "is not a directory"),
        ("upload cut short", [start(cluster), begin("a.txt"), chunk(b"x")], "file_end is missing"),
        ("no image", [start(cluster, image="")], "start.image is required"),
        ("tag mismatch", [start(cluster, image=image, tag="other")], "image tag mismatch"),
        ("zero cpu", [start(cluster, cpuCores=0)], "start.cpu_cores must be"),
        ("zero memory", [start(cluster, memoryMb=0)], "start.memory_mb must be > 0"),
        ("negative timeout", [start(cluster, timeoutMs=-1)], "start.timeout_ms must be >= 0"),
        ("timeout too long", [start(cluster, timeoutMs=600_001)], "exceeds this afslet's maximum of 600000 ms"),
        ("env without =", [start(cluster, env=["JUSTAKEY"])], "is not KEY=VALUE"),
    ]


def test_malformed_streams_get_invalid_argument_and_the_service_keeps_serving(afslet_cluster: AfsletCluster) -> None:
    work = afslet_cluster.workdir
    for name, frames, message in malformed_streams(afslet_cluster):
        call = sdk_raw(afslet_cluster.afslet, frames)
        assert call.error is not None, f"{name}: no error, got {call.events}"
        assert call.error["status"] == "INVALID_ARGUMENT", f"{name}: {call.error}"
        assert message in call.error["message"], f"{name}: {call.error['message']!r}"
        assert call.of("result") == [] and call.of("done") == []
        assert_nothing_left(afslet_cluster)
    assert not list(work.rglob("escaped.txt"))

    ok = sdk_execute(afslet_cluster.afslet, image=afslet_cluster.images["tools"], command=["echo", "still serving"],
                     timeout_ms=10_000)
    assert ok.stdout == ["still serving"] and ok.result["exit_code"] == 0


def test_a_command_past_its_timeout_is_killed_and_reported(afslet_cluster: AfsletCluster) -> None:
    call = sdk_execute(afslet_cluster.afslet, image=afslet_cluster.images["tools"], timeout_ms=1000,
                       command=["/bin/sh", "-c", "echo before; sleep 600; echo after"])
    assert call.stdout == ["before"]
    assert (call.result["success"], call.result["exit_code"]) == (False, 124)
    # The shell is the container's init and has no SIGTERM handler: the staged abort ends at SIGKILL.
    assert call.result["error"] == ("timed out after 1000 ms: afslet stopped the container: SIGKILL ended it "
                                    "(it ignored SIGTERM for 1 s)")
    assert call.kinds[-1] == "done"


def test_timeout_ms_zero_means_the_servers_default(afslet_cluster: AfsletCluster) -> None:
    # afs-sdk refuses timeout_ms=0 itself; the protocol allows it, so send the frame raw.
    call = sdk_raw(afslet_cluster.afslet, [start(afslet_cluster, timeoutMs=0, command=["sleep", "600"])])
    assert call.result["exit_code"] == 124
    assert call.result["error"].startswith("timed out after 2000 ms")
    assert any("timeout_ms=2000 (server default)" in line for line in call.lines("request"))


def test_a_client_that_disconnects_leaves_nothing_behind(afslet_cluster: AfsletCluster) -> None:
    afslet = afslet_cluster.afslet
    parent = afslet.args[afslet.args.index("--cgroup-parent") + 1]
    call = sdk_execute_call(afslet, image=afslet_cluster.images["tools"], timeout_ms=600_000,
                            command=["/bin/sh", "-c", "sleep 600 & echo started; wait"])
    call.wait_for(lambda e: e.get("message") == "started")
    running = leftovers(afslet_cluster)  # what the checker sees while the call runs
    assert any(item.startswith("runc container") for item in running), running
    assert any(item.startswith("mount ") for item in running), running
    assert len(processes_in_cgroup_tree(parent)) == 2  # the shell and its sleep
    assert len(cgroups.children(parent)) == 1

    call.kill()
    assert_nothing_left(afslet_cluster)


def test_network_none_leaves_the_container_only_loopback(afslet_cluster: AfsletCluster) -> None:
    isolated = afslet_cluster.start_afslet("afslet-isolated", extra_args=["--network", "none"])
    shared = afslet_cluster.start_afslet("afslet-host-network", extra_args=["--network", "host"])
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def answer() -> None:  # accept and hang up, so that a connected nc ends at once
            while True:
                try:
                    connection, _ = listener.accept()
                except OSError:
                    return
                connection.close()

        threading.Thread(target=answer, daemon=True).start()
        probe = f"cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' '; nc 127.0.0.1 {port} </dev/null && echo reached"
        tools = afslet_cluster.images["tools"]
        host = sdk_execute(shared, image=tools, command=["/bin/sh", "-c", probe], timeout_ms=20_000)
        none = sdk_execute(isolated, image=tools, command=["/bin/sh", "-c", probe], timeout_ms=20_000)
        bridge = sdk_execute(afslet_cluster.afslet, image=tools, command=["/bin/sh", "-c", probe], timeout_ms=20_000)
        listener.shutdown(socket.SHUT_RDWR)
    assert "reached" in host.stdout and "lo" in host.stdout and len(host.stdout) > 2  # the host's interfaces
    assert none.stdout == ["lo"]  # no other interface, and the host's listener is out of reach
    assert sorted(bridge.stdout) == ["eth0", "lo"]  # the default: its own veth, the host's loopback out of reach
    assert none.result["exit_code"] != 0


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_metrics_count_outcomes_rejections_and_phases(afslet_cluster: AfsletCluster) -> None:
    address = metrics_address(afslet_cluster.afslet)

    def scrape() -> str:
        return urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()

    before = scrape()
    tools = afslet_cluster.images["tools"]
    sdk_execute(afslet_cluster.afslet, image=tools, command=["true"], timeout_ms=10_000)
    sdk_execute(afslet_cluster.afslet, image=tools, command=["false"], timeout_ms=10_000)
    sdk_execute(afslet_cluster.afslet, image=tools, cpu_cores=3, command=["true"], timeout_ms=10_000)
    after = scrape()

    def grew(name: str, **labels: str) -> float:
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert grew("afsd_let_executions_total", outcome="ok") == 1
    assert grew("afsd_let_executions_total", outcome="failed") == 1
    assert grew("afsd_let_executions_total", outcome="rejected") == 1
    assert grew("afsd_let_admission_rejections_total", reason="exceeds_limit") == 1
    for phase in ("mount", "start", "run", "upload", "teardown"):
        assert grew("afsd_let_phase_seconds_count", phase=phase) == 2, phase
    assert _metric(after, "afsd_let_running_containers") == 0


def test_an_afslet_killed_mid_run_is_cleaned_up_by_its_successor(afslet_cluster: AfsletCluster) -> None:
    crashing = afslet_cluster.start_afslet("afslet-crash")
    call = sdk_execute_call(crashing, image=afslet_cluster.images["tools"], timeout_ms=600_000,
                            command=["/bin/sh", "-c", "echo started; sleep 600"])
    call.wait_for(lambda e: e.get("message") == "started")
    crashing.kill()  # SIGKILL: no teardown; the container keeps running, its mount stays
    assert any(item.startswith("runc container") for item in leftovers(afslet_cluster, crashing))
    result = call.finish()
    assert result.error is not None and result.error["status"] in ("STREAM_TERMINATED", "UNAVAILABLE")

    crashing.start()  # the successor finds the session, kills the container, unmounts, removes it all
    assert_nothing_left(afslet_cluster, crashing)
