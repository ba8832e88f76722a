"""Execution management through `afsd proxy`: `afsd ps`, `afsd logs ID` and `afsd stop ID` with
`--target PROXY` see and stop executions on every afslet behind it, as they do against one afslet.

Three afslets (127.0.0.2-4) behind `afslets.afsd.test` (a real dnsmasq), with short staged-abort stages
(1 s SIGTERM, 1 s SIGINT, 2 s SIGKILL). Executions are started through the proxy with the published
afs-sdk client, as users do, or with afsd's protos where the result's stop stage must be read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest

from afsd.api import afslet_pb2 as pb
from afsd.api import afslet_pb2_grpc as pb_grpc
from afsd.api import executions_pb2 as epb
from afsd.api import executions_pb2_grpc as epb_grpc
from afsd.lab.daemons import Daemon
from afsd.rpc import REFUSAL_KEY
from tests.support.afslet import SdkCall, afsd_cli, direct_execute
from tests.support.proxy import (  # noqa: F401 - fixtures
    AFSLETS,
    ProxyCluster,
    afslet_cluster,
    afslet_host,
    execute_call,
    module_proxy_cluster,
    proxies_idle,
)

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
proxy_cluster = module_proxy_cluster("proxy-executions", HOSTS, limit_cpu=2, limit_memory_mb=1024)
pytestmark = pytest.mark.usefixtures("nothing_left_behind", "proxies_idle")

HANDLES_TERM = "trap 'echo got TERM; exit 0' TERM; echo started; sleep 600 & wait"
IGNORES_TERM = "trap '' TERM; echo started; sleep 600 & wait"
ONE_CORE = {"cpu_cores": 1, "memory_mb": 256, "timeout_ms": 600_000}


@pytest.fixture(scope="module")
def proxy(proxy_cluster: ProxyCluster) -> Daemon:
    return proxy_cluster.start_proxy("proxy-executions")


@pytest.fixture
def every_afslet_running(proxy_cluster: ProxyCluster, nothing_left_behind: None) -> Iterator[None]:
    """Restarts an afslet a test killed (before `nothing_left_behind` checks every afslet)."""
    yield
    for host in HOSTS:
        if not proxy_cluster.afslets[host].running():
            proxy_cluster.restart_afslet(host)


def started(proxy: Daemon, image: str, script: str = HANDLES_TERM) -> tuple[SdkCall, str, str]:
    """An afs-sdk Execute through the proxy whose command has started: the call, its execution id (from
    the `execution` log frame) and the afslet host the proxy placed it on."""
    call = execute_call(proxy, image=image, command=["/bin/sh", "-c", script], **ONE_CORE)
    execution_id = json.loads(call.wait_for(lambda e: e.get("source") == "execution")["message"])["id"]
    call.wait_for(lambda e: e.get("message") == "started")
    host = afslet_host([e["message"] for e in call.events if e.get("source") == "proxy"])
    return call, execution_id, host


def test_afsd_ps_through_the_proxy_shows_a_running_execution_and_afsd_stop_ends_it_staged(
        proxy_cluster: ProxyCluster, proxy: Daemon) -> None:
    tools, target = proxy_cluster.base.images["tools"], ["--target", proxy.address]
    call, execution_id, host = started(proxy, tools)

    ps = afsd_cli("ps", *target)
    assert ps.returncode == 0 and ps.stderr == "", ps.stderr
    header, *rows = ps.stdout.splitlines()
    assert header.split()[:6] == ["ID", "IMAGE", "COMMAND", "CPU/MEM/GPU", "AGE", "NODE"]
    (row,) = [r for r in rows if r.startswith(execution_id[:12])]
    assert tools in row and "1/256M/0" in row and f"afslet-{host}" in row and "running" in row
    (mine,) = [e for e in json.loads(afsd_cli("ps", "--json", *target).stdout)["executions"] if e["id"] == execution_id]
    assert (mine["endpoint"], mine["node_id"], mine["state"]) == (
        f"{host}:{proxy_cluster.afslet_port}", f"afslet-{host}", "STATE_RUNNING")

    stop = afsd_cli("stop", execution_id[:8], *target)  # a unique prefix, through the proxy
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout == (f"{execution_id}: stopped at stage term: stopped by `afsd stop`: it exited after SIGTERM "
                           f"(exit code 0) (on afslet-{host})\n")
    result = call.finish()
    assert result.result == {"event": "result", "success": False, "exit_code": 0,
                             "error": "stopped by `afsd stop`: it exited after SIGTERM (exit code 0)"}
    assert result.stdout == ["started", "got TERM"] and result.kinds[-1] == "done"

    assert execution_id[:12] not in afsd_cli("ps", *target).stdout
    finished = afsd_cli("ps", "-a", *target).stdout.splitlines()
    assert any(line.startswith(execution_id[:12]) and "stopped (0)" in line for line in finished)
    again = afsd_cli("stop", execution_id, *target)
    assert again.returncode == 0 and "had already finished (stopped, exit code 0)" in again.stdout


def test_a_command_that_ignores_sigterm_is_killed_at_the_last_stage_and_the_result_says_so(
        proxy_cluster: ProxyCluster, proxy: Daemon) -> None:
    call = direct_execute(proxy, image=proxy_cluster.base.images["tools"], timeout_ms=600_000,
                          command=["/bin/sh", "-c", IGNORES_TERM])
    call.wait_for_line("started")
    stop = afsd_cli("stop", call.execution_id, "--target", proxy.address)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.startswith(f"{call.execution_id}: stopped at stage kill: stopped by `afsd stop`: SIGKILL "
                                  "ended it (it ignored SIGTERM for 1 s)")
    result = call.finish().result
    assert (result.stop_stage, result.stop_reason, result.exit_code) == (pb.STOP_STAGE_KILL, pb.STOP_REASON_REQUEST,
                                                                        137)
    assert result.execution_id == call.execution_id


def test_afsd_logs_through_the_proxy_prints_the_tail_and_follows_until_the_execution_ends(
        proxy_cluster: ProxyCluster, proxy: Daemon) -> None:
    target = ["--target", proxy.address]
    call, execution_id, _ = started(proxy, proxy_cluster.base.images["tools"],
                                    "for i in 1 2 3; do echo line $i; done; " + HANDLES_TERM)
    whole = afsd_cli("logs", execution_id, *target)
    assert (whole.returncode, whole.stdout.splitlines()) == (0, ["line 1", "line 2", "line 3", "started"])
    assert afsd_cli("logs", execution_id[:12], "--tail", "2", *target).stdout.splitlines() == ["line 3", "started"]

    # Following, through the proxy: the tail, then new lines as they come, until the execution ends.
    with grpc.insecure_channel(proxy.address) as channel:
        stream = epb_grpc.ExecutionsStub(channel).Logs(epb.LogsRequest(id=execution_id, tail=1, follow=True),
                                                       timeout=60)
        assert [line.message for line in next(stream).lines] == ["started"]
        assert afsd_cli("stop", execution_id, *target).returncode == 0
        later = [line.message for response in stream for line in response.lines if line.source == "runc:stdout"]
    assert later == ["got TERM"]
    call.finish()


@pytest.mark.usefixtures("every_afslet_running")
def test_ps_merges_every_afslet_and_names_those_that_did_not_answer(proxy_cluster: ProxyCluster,
                                                                   proxy: Daemon) -> None:
    tools, target = proxy_cluster.base.images["tools"], ["--target", proxy.address]
    # With the power of two choices, an idle afslet always wins over a loaded one: two afslets, one each.
    running = [started(proxy, tools) for _ in range(2)]
    hosts = {host for _, _, host in running}
    assert len(hosts) == 2
    (idle,) = set(HOSTS) - hosts
    proxy_cluster.afslets[idle].kill()  # still in DNS

    ps = afsd_cli("ps", *target)
    assert ps.returncode == 0
    for _, execution_id, host in running:
        assert any(r.startswith(execution_id[:12]) and f"afslet-{host}" in r for r in ps.stdout.splitlines())
    port = proxy_cluster.afslet_port
    assert ps.stderr.startswith(f"afsd ps: cannot reach afslet {idle}:{port}: "), ps.stderr
    listed = json.loads(afsd_cli("ps", "--json", *target).stdout)
    assert [u["endpoint"] for u in listed["unreachable"]] == [f"{idle}:{port}"]
    assert sorted(e["id"] for e in listed["executions"]) == sorted(execution_id for _, execution_id, _ in running)

    # An id no afslet that answered knows may be on the one that did not: UNAVAILABLE, not NOT_FOUND.
    with grpc.insecure_channel(proxy.address) as channel, pytest.raises(grpc.RpcError) as raised:
        epb_grpc.ExecutionsStub(channel).Stop(epb.StopRequest(id="0123456789abcdef"), timeout=30)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"and 1 did not answer (cannot reach afslet {idle}:{port}: " in raised.value.details()

    for call, execution_id, _ in running:  # the execution on a live afslet can still be stopped
        assert afsd_cli("stop", execution_id, *target).returncode == 0
        assert call.finish().result["error"] == "stopped by `afsd stop`: it exited after SIGTERM (exit code 0)"


def test_logs_and_stop_find_the_afslet_without_an_endpoint_hint(proxy_cluster: ProxyCluster, proxy: Daemon) -> None:
    call, execution_id, host = started(proxy, proxy_cluster.base.images["tools"],
                                       "echo hello from the afslet; " + HANDLES_TERM)
    with grpc.insecure_channel(proxy.address) as channel:
        stub = epb_grpc.ExecutionsStub(channel)
        # No endpoint, or one that is not one of the proxy's afslets (never called): every afslet is asked.
        for endpoint in ("", "10.255.255.1:1"):
            lines = [line.message for response in stub.Logs(epb.LogsRequest(id=execution_id, endpoint=endpoint),
                                                            timeout=30)
                     for line in response.lines if line.source == "runc:stdout"]
            assert lines == ["hello from the afslet", "started"]
        stopped = stub.Stop(epb.StopRequest(id=execution_id), timeout=60)
        assert (stopped.execution.id, stopped.execution.stop_stage, stopped.execution.node_id) == (
            execution_id, pb.STOP_STAGE_TERM, f"afslet-{host}")
        assert not stopped.already_finished

        unknown = (f"no execution '0123456789abcdef' on any afslet of {AFSLETS}:{proxy_cluster.afslet_port} "
                   "(3 asked; `afsd ps -a` lists them)")
        for request, code, message in (
                (epb.StopRequest(id="0123456789abcdef"), grpc.StatusCode.NOT_FOUND, unknown),
                (epb.StopRequest(), grpc.StatusCode.INVALID_ARGUMENT, "id is required (`afsd ps` lists the executions)")):
            with pytest.raises(grpc.RpcError) as raised:
                stub.Stop(request, timeout=30)
            assert (raised.value.code(), raised.value.details()) == (code, message)
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Logs(epb.LogsRequest(id=execution_id, tail=-1), timeout=30))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    call.finish()

    missing = afsd_cli("logs", "0123456789abcdef", "--target", proxy.address)
    assert missing.returncode == 1
    assert missing.stderr.strip() == (f"afsd logs: error: no execution '0123456789abcdef' on {proxy.address}; "
                                      "`afsd ps -a` lists them")


def test_a_proxy_that_refuses_is_told_apart_from_one_that_cannot_be_reached(proxy_cluster: ProxyCluster) -> None:
    """A proxy whose afslet name resolves to nothing refuses with UNAVAILABLE, the code of a call that
    reached no server too: its refusal carries the afsd-refusal trailer, and the command line prints the
    proxy's reason. Once it is stopped (its port still held, nothing listening), "cannot reach"."""
    lonely = proxy_cluster.start_proxy("proxy-without-afslets", afslets_name="nobody.afsd.test",
                                       extra_args=["--dispatch-max-retries", "0"])
    address, tools = lonely.address, proxy_cluster.base.images["tools"]
    with grpc.insecure_channel(address) as channel:
        for ask in (lambda: epb_grpc.ExecutionsStub(channel).List(epb.ListRequest(), timeout=30),
                    lambda: pb_grpc.AfsletStub(channel).GetRuntimeStatus(pb.GetRuntimeStatusRequest(), timeout=30)):
            with pytest.raises(grpc.RpcError) as raised:
                ask()
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert raised.value.details().startswith("no afslets: ") and "nobody.afsd.test" in raised.value.details()
            assert [key for key, _ in raised.value.trailing_metadata()].count(REFUSAL_KEY) == 1

    ps = afsd_cli("ps", "--target", address)
    assert ps.returncode == 1 and ps.stderr.startswith(f"afsd ps: error: {address}: no afslets: "), ps.stderr
    ran = afsd_cli("run", "--target", address, tools, "--", "true")
    assert ran.returncode == 1, ran.stderr
    assert ran.stderr.startswith(f"afsd run: error: {address}: no afslet accepted the request "), ran.stderr
    for refused in (ps, ran):
        assert len(refused.stderr.splitlines()) == 1 and "cannot reach" not in refused.stderr
        assert "--tls-dir" not in refused.stderr  # no hint about a TLS handshake: the proxy answered

    assert lonely.stop() == 0  # its port stays reserved for it: bound, nothing listening
    for verb, *rest in (["ps"], ["run", tools, "--", "true"]):
        unreachable = afsd_cli(verb, "--target", address, *rest)
        assert unreachable.returncode == 1
        assert unreachable.stderr.startswith(f"afsd {verb}: error: cannot reach {address}: "), unreachable.stderr
