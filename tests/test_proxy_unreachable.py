"""What a user sees when the proxy cannot reach an afslet: one line naming the afslet's address and the
cause, worded as the CLI's own "cannot reach" (afsd/proxy/errors.py `unreachable`, afsd.rpc.failure_cause),
from `afsd ps`, `afsd stop` and `afsd run` and to a gRPC client, through a real `afsd proxy` whose afslet
address has nothing listening; and the CLI's own line when the proxy itself is not there."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from afsd.api import afslet_pb2 as pb
from afsd.api import afslet_pb2_grpc as pb_grpc
from afsd.api import executions_pb2 as epb
from afsd.api import executions_pb2_grpc as epb_grpc
from afsd.lab.daemons import Daemon, afsd_command, proxy_daemon, start_all, stop_daemon
from afsd.lab.ports import PortReservation, reserve_port


@pytest.fixture(scope="module")
def silent_afslet() -> Iterator[PortReservation]:
    """An afslet address that refuses connections: the port is held (bound, not listening)."""
    reservation = reserve_port("127.0.0.1")
    try:
        yield reservation
    finally:
        reservation.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, silent_afslet: PortReservation) -> Iterator[Daemon]:
    daemon = proxy_daemon(tmp_path_factory.mktemp("proxy-unreachable"), "proxy", silent_afslet.address,
                          extra_args=["--dispatch-max-retries", "1", "--dispatch-backoff-ms", "10"])
    start_all([daemon])
    try:
        yield daemon
    finally:
        stop_daemon(daemon)


def one_line(text: str) -> str:
    assert text.endswith("\n") and text.count("\n") == 1, text
    return text.rstrip("\n")


def names_the_afslet_once(line: str, address: str) -> None:
    """The cause is the refusal itself, without gRPC's wrapping that repeats the address."""
    assert re.search(f"cannot reach afslet {re.escape(address)}: connect: Connection refused", line), line
    assert "failed to connect to all" not in line and "ipv4:" not in line, line


def test_ps_names_the_afslet_it_cannot_reach(proxy: Daemon, silent_afslet: PortReservation) -> None:
    listed = afsd_command("ps", "--target", proxy.address)
    assert listed.returncode == 0, listed.stderr
    line = one_line(listed.stderr)
    assert line.startswith(f"afsd ps: cannot reach afslet {silent_afslet.address}: "), line
    names_the_afslet_once(line, silent_afslet.address)


def test_stop_names_the_afslet_that_may_have_the_execution(proxy: Daemon, silent_afslet: PortReservation) -> None:
    stopped = afsd_command("stop", "0123456789abcdef", "--target", proxy.address)
    assert stopped.returncode == 1
    line = one_line(stopped.stderr)
    assert line.startswith(f"afsd stop: error: no execution '0123456789abcdef' on {proxy.address} (cannot reach "
                           f"afslet {silent_afslet.address}: "), line
    assert line.endswith("); `afsd ps -a` lists them"), line
    names_the_afslet_once(line, silent_afslet.address)


def test_run_says_why_no_afslet_took_the_command(proxy: Daemon, silent_afslet: PortReservation) -> None:
    ran = afsd_command("run", "--target", proxy.address, "busybox", "--", "true")
    assert ran.returncode != 0
    line = one_line(ran.stderr)
    assert line.startswith(f"afsd run: error: {proxy.address}: no afslet accepted the request "), line
    assert f"; last: no afslet of {silent_afslet.address} takes calls (cannot reach afslet " in line, line
    names_the_afslet_once(line, silent_afslet.address)
    assert f"cannot reach afslet {silent_afslet.address}" in proxy.log()   # and the proxy's log says the same


def test_an_sdk_client_gets_the_same_line(proxy: Daemon, silent_afslet: PortReservation) -> None:
    """What afs-sdk users (and `afsd stop` with an id but no endpoint) get from the proxy itself."""
    with grpc.insecure_channel(proxy.address) as channel:
        with pytest.raises(grpc.RpcError) as status:
            pb_grpc.AfsletStub(channel).GetRuntimeStatus(pb.GetRuntimeStatusRequest(), timeout=30)
        assert status.value.code() == grpc.StatusCode.UNAVAILABLE
        assert status.value.details().startswith(f"no afslet answered (cannot reach afslet {silent_afslet.address}: ")
        names_the_afslet_once(status.value.details(), silent_afslet.address)
        with pytest.raises(grpc.RpcError) as stop:
            epb_grpc.ExecutionsStub(channel).Stop(epb.StopRequest(id="0123456789abcdef"), timeout=30)
        assert stop.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ", and 1 did not answer (cannot reach afslet " in stop.value.details()
        names_the_afslet_once(stop.value.details(), silent_afslet.address)
        assert "\n" not in status.value.details() + stop.value.details()


def test_the_cli_words_a_missing_proxy_the_same_way(tmp_path: Path) -> None:
    nothing = reserve_port("127.0.0.1")
    try:
        listed = afsd_command("ps", "--target", nothing.address)
    finally:
        nothing.close()
    line = one_line(listed.stderr)
    assert listed.returncode == 1
    assert line.startswith(f"afsd ps: error: cannot reach {nothing.address}: connect: Connection refused"), line
