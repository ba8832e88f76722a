"""afslet stops commands with a staged abort (SIGTERM, SIGINT if asked for, SIGKILL) and says which
stage ended them; drains on SIGTERM; reports what each execution used from its cgroup; lists, shows
and stops executions (`afsd ps`, `afsd logs ID`, `afsd stop ID`); and admits GPUs as opaque slots.
Driven with the published afs-sdk client where it can see the behaviour, and with afsd's own protos
and command line for what it cannot (stop stages, execution ids, GPUs)."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from afsd.api import afslet_pb2 as pb
from afsd.api import executions_pb2 as epb
from afsd.api import executions_pb2_grpc as epb_grpc
from afsd.lab.daemons import Daemon, metrics_address
from afsd.rpc import REFUSAL_KEY
from tests.support.afslet import (
    AfsletCluster,
    SdkCall,
    afsd_cli,
    direct_execute,
    leftovers,
    list_executions,
    module_cluster,
    sdk_execute,
    sdk_execute_call,
    sdk_status,
)

pytestmark = pytest.mark.usefixtures("nothing_left_behind")

TERM_S, INTERRUPT_S, KILL_S = 2, 2, 5
NODE_ID = "node-under-test"
afslet_cluster = module_cluster("afslet-management", limit_cpu=2, limit_memory_mb=1024, afslet_args=[
    "--node-id", NODE_ID, "--stop-term-timeout", str(TERM_S), "--stop-interrupt-timeout", str(INTERRUPT_S),
    "--stop-kill-timeout", str(KILL_S)])

# `wait` returns when a trapped signal arrives; a foreground `sleep` would hold the trap until it ended.
HANDLES_TERM = "trap 'echo got TERM; exit 0' TERM; echo started; sleep 600 & wait"
IGNORES_TERM = "trap '' TERM; echo started; sleep 600 & wait"
HANDLES_ONLY_INT = "trap '' TERM; trap 'echo got INT; exit 3' INT; echo started; sleep 600 & wait"
# 200 MiB in one dd buffer (read from /dev/zero, so every page is touched), then a busy loop until it has
# had 1.1 s of CPU by its own account (/proc/<pid>/stat utime + stime, in 1/100 s), whatever the host's load.
ALLOCATE_AND_BURN = """
dd if=/dev/zero of=/dev/null bs=200M count=1 2>/dev/null
yes > /dev/null & y=$!
while :; do read -r l < /proc/$y/stat; set -- $l; [ $((${14} + ${15})) -ge 110 ] && break; usleep 50000; done
kill $y
""" + HANDLES_TERM


def log_line(response: pb.ExecuteResponse, message: str) -> bool:
    return response.WhichOneof("payload") == "log" and response.log.message == message


def sdk_execution_id(call: SdkCall) -> str:
    frame = call.wait_for(lambda e: e.get("source") == "execution")
    return json.loads(frame["message"])["id"]


def entry(afslet: Daemon, execution_id: str, include_finished: bool = False) -> epb.Execution:
    (found,) = [e for e in list_executions(afslet, include_finished) if e.id == execution_id]
    return found


# -- the staged abort ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("script", "env", "stage", "said"), [
    (HANDLES_TERM, [], pb.STOP_STAGE_TERM, "got TERM"),
    (IGNORES_TERM, [], pb.STOP_STAGE_KILL, None),
    (HANDLES_ONLY_INT, ["AFSD_STOP_INTERRUPT=1"], pb.STOP_STAGE_INTERRUPT, "got INT"),
    (HANDLES_ONLY_INT, [], pb.STOP_STAGE_KILL, None),  # no SIGINT unless the workload asks for it
], ids=["handles-term", "ignores-term", "asked-for-int", "int-not-asked-for"])
def test_a_timed_out_command_is_stopped_in_stages_and_the_result_names_the_stage(
        afslet_cluster: AfsletCluster, script: str, env: list[str], stage: int, said: str | None) -> None:
    call = direct_execute(afslet_cluster.afslet, image=afslet_cluster.images["tools"], timeout_ms=1000, env=env,
                          command=["/bin/sh", "-c", script]).finish()
    result = call.result
    assert (result.success, result.exit_code) == (False, 124), result
    assert (result.stop_stage, result.stop_reason) == (stage, pb.STOP_REASON_TIMEOUT), result
    assert result.execution_id == call.execution_id
    assert call.lines("runc:stdout") == ["started", *([said] if said else [])]
    signals = {pb.STOP_STAGE_TERM: "SIGTERM", pb.STOP_STAGE_INTERRUPT: "SIGINT", pb.STOP_STAGE_KILL: "SIGKILL"}
    assert result.error.startswith("timed out after 1000 ms: afslet stopped the container: ")
    assert signals[stage] in result.error
    stops = call.lines("stop")
    sent = [line for line in stops if line.startswith("stopping (timeout)")]
    expected = {pb.STOP_STAGE_TERM: ["SIGTERM"], pb.STOP_STAGE_INTERRUPT: ["SIGTERM", "SIGINT"],
                pb.STOP_STAGE_KILL: ["SIGTERM", "SIGINT", "SIGKILL"] if env else ["SIGTERM", "SIGKILL"]}[stage]
    assert [line.split()[2] for line in sent] == expected, stops
    stage_name = pb.StopStage.Name(stage).removeprefix("STOP_STAGE_").lower()
    assert stops[-1].startswith(f"stopped (timeout) at stage {stage_name}: "), stops


def test_an_afs_sdk_client_sees_the_stage_in_the_error(afslet_cluster: AfsletCluster) -> None:
    call = sdk_execute(afslet_cluster.afslet, image=afslet_cluster.images["tools"], timeout_ms=1000,
                       command=["/bin/sh", "-c", HANDLES_TERM])
    assert (call.result["success"], call.result["exit_code"]) == (False, 124)
    assert call.result["error"] == ("timed out after 1000 ms: afslet stopped the container: it exited after SIGTERM")
    assert call.stdout == ["started", "got TERM"]


# -- afsd ps / afsd stop / afsd logs --------------------------------------------------------------------


def test_afsd_ps_shows_a_running_execution_and_afsd_stop_ends_it_staged(afslet_cluster: AfsletCluster) -> None:
    afslet, tools = afslet_cluster.afslet, afslet_cluster.images["tools"]
    target = ["--target", afslet.address]
    metrics = f"http://{metrics_address(afslet)}/metrics"
    before = urllib.request.urlopen(metrics, timeout=10).read().decode()

    call = sdk_execute_call(afslet, image=tools, cpu_cores=1, memory_mb=128, timeout_ms=600_000,
                            command=["/bin/sh", "-c", HANDLES_TERM])
    execution_id = sdk_execution_id(call)
    call.wait_for(lambda e: e.get("message") == "started")

    ps = afsd_cli("ps", *target)
    assert ps.returncode == 0, ps.stderr
    header, *rows = ps.stdout.splitlines()
    assert header.split()[:4] == ["ID", "IMAGE", "COMMAND", "CPU/MEM/GPU"]
    (row,) = [r for r in rows if r.startswith(execution_id[:12])]
    assert tools in row and "/bin/sh -c" in row and "1/128M/0" in row and "running" in row
    listed = json.loads(afsd_cli("ps", "--json", *target).stdout)["executions"]
    (mine,) = [e for e in listed if e["id"] == execution_id]
    assert (mine["image"], mine["command"][:2], mine["state"]) == (tools, ["/bin/sh", "-c"], "STATE_RUNNING")
    assert (mine["node_id"], mine["endpoint"]) == (NODE_ID, afslet.address)
    assert int(mine["cpu_cores"]) == 1 and int(mine["memory_mb"]) == 128 and int(mine["usage"]["pids_current"]) >= 2

    stop = afsd_cli("stop", execution_id[:8], *target)  # a unique prefix is enough
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.startswith(f"{execution_id}: stopped at stage term: stopped by `afsd stop`: it exited "
                                  "after SIGTERM (exit code 0)")
    result = call.finish()
    assert result.result == {"event": "result", "success": False, "exit_code": 0,
                             "error": "stopped by `afsd stop`: it exited after SIGTERM (exit code 0)"}
    assert result.stdout == ["started", "got TERM"]
    assert result.kinds[-1] == "done"

    assert execution_id[:12] not in afsd_cli("ps", *target).stdout
    finished = afsd_cli("ps", "-a", *target).stdout
    assert any(line.startswith(execution_id[:12]) and "stopped (0)" in line for line in finished.splitlines())
    again = afsd_cli("stop", execution_id, *target)
    assert again.returncode == 0 and "had already finished (stopped, exit code 0)" in again.stdout

    after = urllib.request.urlopen(metrics, timeout=10).read().decode()

    def grew(name: str) -> float:
        def value(text: str) -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))
        return value(after) - value(before)

    assert grew('afsd_let_stops_total{reason="stop",stage="term"}') == 1
    assert grew('afsd_execution_cpu_seconds_count{outcome="stopped"}') == 1
    assert grew('afsd_execution_memory_peak_bytes_count{outcome="stopped"}') == 1


def test_afsd_logs_prints_the_tail_and_follows_until_the_execution_ends(afslet_cluster: AfsletCluster) -> None:
    afslet = afslet_cluster.afslet
    target = ["--target", afslet.address]
    script = "for i in 1 2 3 4 5; do echo line $i; done; " + HANDLES_TERM
    call = sdk_execute_call(afslet, image=afslet_cluster.images["tools"], timeout_ms=600_000,
                            command=["/bin/sh", "-c", script])
    execution_id = sdk_execution_id(call)
    call.wait_for(lambda e: e.get("message") == "started")

    whole = afsd_cli("logs", execution_id, *target)
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.splitlines() == ["line 1", "line 2", "line 3", "line 4", "line 5", "started"]
    assert afsd_cli("logs", execution_id[:12], "--tail", "2", *target).stdout.splitlines() == ["line 5", "started"]
    every = afsd_cli("logs", execution_id, "--all-sources", *target).stdout.splitlines()
    assert "[runc:stdout] line 1" in every and any(line.startswith("[request] args=/bin/sh -c") for line in every)

    follower = subprocess.Popen([sys.executable, "-m", "afsd", "logs", "--follow", execution_id, *target],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        seen = []
        while (line := lines.get(timeout=60)) != "started":
            assert line is not None, f"the follow ended early: {seen}; {follower.stderr.read() if follower.stderr else ''}"
            seen.append(line)
        assert seen == ["line 1", "line 2", "line 3", "line 4", "line 5"]
        assert afsd_cli("stop", execution_id, *target).returncode == 0
        assert follower.wait(timeout=60) == 0  # the follow ends with the execution
        assert lines.get(timeout=10) == "got TERM"
        assert lines.get(timeout=10) is None
    finally:
        follower.kill()
        follower.wait()
    call.finish()

    # A finished execution's output stays readable, stdout and stderr apart.
    done = sdk_execute_call(afslet, image=afslet_cluster.images["tools"], timeout_ms=10_000,
                            command=["/bin/sh", "-c", "echo out; echo err >&2"])
    finished_id = sdk_execution_id(done)
    done.finish()
    kept = afsd_cli("logs", finished_id, *target)
    assert (kept.stdout.splitlines(), kept.stderr.splitlines()) == (["out"], ["err"])


def test_unknown_and_ambiguous_ids_are_clear_errors(afslet_cluster: AfsletCluster) -> None:
    afslet = afslet_cluster.afslet
    for verb in ("stop", "logs"):
        missing = afsd_cli(verb, "0123456789abcdef", "--target", afslet.address)
        assert missing.returncode == 1
        assert missing.stderr.strip() == (f"afsd {verb}: error: no execution '0123456789abcdef' on {afslet.address}; "
                                          "`afsd ps -a` lists them")
    with grpc.insecure_channel(afslet.address) as channel:
        stub = epb_grpc.ExecutionsStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Stop(epb.StopRequest(id="0123456789abcdef"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert f"no execution '0123456789abcdef' on afslet {NODE_ID}" in raised.value.details()
        assert [key for key, _ in raised.value.trailing_metadata()].count(REFUSAL_KEY) == 1
    nothing = afsd_cli("ps", "--target", "127.0.0.1:1")
    assert nothing.returncode == 1 and nothing.stderr.startswith("afsd ps: error: cannot reach 127.0.0.1:1: ")


def test_stopping_an_execution_that_has_not_started_means_it_never_runs(afslet_cluster: AfsletCluster) -> None:
    afslet = afslet_cluster.afslet
    upload_open = threading.Event()
    call = direct_execute(afslet, image=afslet_cluster.images["tools"], command=["/bin/sh", "-c", "echo ran"],
                          hold=upload_open)
    try:
        call.wait_for(lambda r: r.WhichOneof("payload") == "accepted")
        execution_id = call.execution_id
        assert entry(afslet, execution_id).state == epb.STATE_PREPARING
        with grpc.insecure_channel(afslet.address) as channel, ThreadPoolExecutor(1) as pool:
            stopping = pool.submit(epb_grpc.ExecutionsStub(channel).Stop, epb.StopRequest(id=execution_id),
                                   timeout=60)
            deadline = time.monotonic() + 30
            while entry(afslet, execution_id).stop_reason != pb.STOP_REASON_REQUEST:
                assert time.monotonic() < deadline, "the stop request did not arrive"
                time.sleep(0.05)
            upload_open.set()  # the client half-closes: the call goes on to where the command would start
            stopped = stopping.result().execution
    finally:
        upload_open.set()
    call.finish()
    assert call.lines("runc:stdout") == []
    assert (call.result.exit_code, call.result.error) == (125, "stopped by `afsd stop` before the command started")
    assert (call.result.stop_stage, call.result.stop_reason) == (pb.STOP_STAGE_NONE, pb.STOP_REASON_REQUEST)
    assert (stopped.state, stopped.outcome, stopped.exit_code) == (epb.STATE_FINISHED, "stopped", 125)


# -- resource monitoring --------------------------------------------------------------------------------


def test_cpu_and_peak_memory_are_reported_live_and_in_the_resource_summary(afslet_cluster: AfsletCluster) -> None:
    afslet = afslet_cluster.afslet
    call = sdk_execute_call(afslet, image=afslet_cluster.images["tools"], cpu_cores=1, memory_mb=512,
                            timeout_ms=600_000, command=["/bin/sh", "-c", ALLOCATE_AND_BURN])
    execution_id = sdk_execution_id(call)
    call.wait_for(lambda e: e.get("message") == "started")

    live = entry(afslet, execution_id)  # while it runs, from its cgroup
    assert live.state == epb.STATE_RUNNING
    assert live.usage.memory_peak_bytes >= 200_000_000, live.usage
    assert live.usage.cpu_seconds >= 0.9, live.usage
    assert live.usage.cpu_user_seconds + live.usage.cpu_system_seconds == pytest.approx(live.usage.cpu_seconds,
                                                                                        rel=0.01)
    assert live.usage.pids_current >= 2 and live.usage.memory_current_bytes > 0  # the shell and its sleep
    assert live.usage.memory_current_bytes < live.usage.memory_peak_bytes  # dd has exited, its buffer is gone

    assert afsd_cli("stop", execution_id, "--target", afslet.address).returncode == 0
    result = call.finish()
    (summary,) = result.lines("resource")  # the last word on what it used: JSON a client can parse
    usage = json.loads(summary)
    assert usage["execution_id"] == execution_id
    assert usage["memory_peak_bytes"] >= 200_000_000 and usage["cpu_seconds"] >= 0.9, usage
    assert usage["cpu_seconds"] >= live.usage.cpu_seconds and usage["oom_kills"] == 0
    assert usage["pids_peak"] >= 3 and usage["wall_seconds"] > 0  # shell, dd or yes, sleep
    assert set(usage) == {"execution_id", "cpu_seconds", "cpu_user_seconds", "cpu_system_seconds", "wall_seconds",
                          "memory_peak_bytes", "memory_current_bytes", "oom_kills", "io_read_bytes",
                          "io_write_bytes", "pids_current", "pids_peak"}
    kept = entry(afslet, execution_id, include_finished=True)  # the final numbers stay with the execution
    assert kept.usage.memory_peak_bytes == usage["memory_peak_bytes"]


# -- GPU slots ------------------------------------------------------------------------------------------


def test_gpus_are_admitted_and_accounted_as_opaque_slots(afslet_cluster: AfsletCluster) -> None:
    tools = afslet_cluster.images["tools"]
    gpu_afslet = afslet_cluster.start_afslet("afslet-gpus", limit_cpu=4, extra_args=[
        "--limit-gpus", "2", "--node-id", "gpu-node", "--stop-term-timeout", "2"])
    status = afslet_cluster.runtime_status(gpu_afslet)
    assert (status.limit_gpus, status.used_gpus, status.available_gpus) == (2, 0, 2)

    holders = [direct_execute(gpu_afslet, image=tools, gpus=1, timeout_ms=600_000,
                              command=["/bin/sh", "-c", HANDLES_TERM]) for _ in range(2)]
    try:
        for holder in holders:
            holder.wait_for(lambda r: log_line(r, "started"))
        status = afslet_cluster.runtime_status(gpu_afslet)
        assert (status.used_gpus, status.available_gpus, status.used_cpu_cores) == (2, 0, 2)
        assert sorted(e.gpus for e in list_executions(gpu_afslet)) == [1, 1]

        third = direct_execute(gpu_afslet, image=tools, gpus=1, command=["true"]).finish()
        assert third.error is not None and third.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("insufficient resources: requested cpu_cores=1 memory_mb=64 gpus=1, available cpu_cores=2 "
                "memory_mb=896 gpus=0 (limits cpu_cores=4 memory_mb=1024 gpus=2, in use cpu_cores=2 memory_mb=128 "
                "gpus=2); retry later or elsewhere") == third.error.details()
        too_many = direct_execute(gpu_afslet, image=tools, gpus=3, command=["true"]).finish()
        assert too_many.error is not None and too_many.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "exceeds this afslet's limits cpu_cores=4 memory_mb=1024 gpus=2" in too_many.error.details()

        # Requests without GPUs still fit, and afs-sdk clients (which cannot ask for any) keep working.
        without = direct_execute(gpu_afslet, image=tools, command=["/bin/sh", "-c", "echo no gpu"]).finish()
        assert without.lines("runc:stdout") == ["no gpu"] and without.result.exit_code == 0
        assert sdk_execute(gpu_afslet, image=tools, command=["echo", "sdk"], timeout_ms=10_000).stdout == ["sdk"]
        assert sdk_status(gpu_afslet)["available_cpu_cores"] == 2
    finally:
        for holder in holders:
            holder.cancel()  # the client goes away: the staged abort, then the slots are free again
    status = afslet_cluster.wait_idle(gpu_afslet)
    assert (status.used_gpus, status.available_gpus) == (0, 2)

    no_gpus = direct_execute(afslet_cluster.afslet, image=tools, gpus=1, command=["true"]).finish()
    assert no_gpus.error is not None and no_gpus.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "request for cpu_cores=1 memory_mb=64 gpus=1 exceeds this afslet's limits" in no_gpus.error.details()
    negative = direct_execute(afslet_cluster.afslet, image=tools, gpus=-1, command=["true"]).finish()
    assert negative.error is not None and negative.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start.gpus must be >= 0 (got -1)" in negative.error.details()


# -- afslet's own shutdown ------------------------------------------------------------------------------


def test_sigterm_to_afslet_drains_running_executions_with_the_staged_abort(afslet_cluster: AfsletCluster) -> None:
    term, interrupt, kill = 4, 2, 5
    draining = afslet_cluster.start_afslet("afslet-draining", extra_args=[
        "--node-id", NODE_ID, "--stop-term-timeout", str(term), "--stop-interrupt-timeout", str(interrupt),
        "--stop-kill-timeout", str(kill), "--graceful-timeout", "5"])
    tools = afslet_cluster.images["tools"]
    clean = direct_execute(draining, image=tools, timeout_ms=600_000, command=["/bin/sh", "-c", HANDLES_TERM])
    stubborn = direct_execute(draining, image=tools, timeout_ms=600_000, command=["/bin/sh", "-c", IGNORES_TERM])
    for call in (clean, stubborn):
        call.wait_for(lambda r: log_line(r, "started"))

    signalled = time.monotonic()
    draining.signal(signal.SIGTERM)
    status = afslet_cluster.wait_until_status(lambda s: s.draining, draining)
    assert status.running_containers == 2
    refused = direct_execute(draining, image=tools, command=["true"]).finish()  # while `stubborn` still runs
    assert refused.error is not None and refused.error.code() == grpc.StatusCode.UNAVAILABLE
    assert refused.error.details().startswith(f"afslet on {NODE_ID} is shutting down and admits no new "
                                              "executions; retry on another afslet")
    assert refused.of("accepted") == []
    assert [key for key, _ in refused.error.trailing_metadata()].count(REFUSAL_KEY) == 1  # afslet answered

    assert draining.process is not None
    assert draining.process.wait(timeout=term + interrupt + kill) == 0
    assert time.monotonic() - signalled < term + interrupt + kill

    results = {}
    for name, call in (("clean", clean), ("stubborn", stubborn)):
        call.finish()
        assert call.error is None, call.error
        assert call.of("done"), f"{name}: no done frame"
        results[name] = call.result
    assert (results["clean"].stop_stage, results["clean"].stop_reason, results["clean"].exit_code) == (
        pb.STOP_STAGE_TERM, pb.STOP_REASON_SHUTDOWN, 0)
    assert (results["stubborn"].stop_stage, results["stubborn"].stop_reason, results["stubborn"].exit_code) == (
        pb.STOP_STAGE_KILL, pb.STOP_REASON_SHUTDOWN, 137)
    assert results["stubborn"].error == ("stopped because afslet is shutting down: SIGKILL ended it (it ignored "
                                         f"SIGTERM for {term} s) (exit code 137)")
    assert leftovers(afslet_cluster, draining) == []  # the daemon itself left nothing behind
    draining.start()  # back, for the module's check
