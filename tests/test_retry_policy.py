"""The shared retry policy (afsd.retry): what it retries and what it gives up on at once, over real gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from afsd.api import discovery_pb2 as pb
from afsd.api import discovery_pb2_grpc as pb_grpc
from afsd.cluster.discovery_client import DiscoveryClient, DiscoveryUnavailableError
from afsd.retry import RetryPolicy, grpc_permanent, grpc_retryable, http_retryable


class ScriptedDiscovery(pb_grpc.ServiceDiscoveryServicer):
    """Answers FindProvider with the next status of a script (None = success), counting calls."""

    def __init__(self) -> None:
        self.script: list[grpc.StatusCode | None] = []
        self.calls = 0
        self.address = ""

    async def FindProvider(self, request: pb.FindProviderRequest, context: grpc.aio.ServicerContext) -> pb.FindProviderResponse:
        self.calls += 1
        code = self.script.pop(0) if self.script else None
        if code is not None:
            await context.abort(code, f"scripted {code.name}")
        return pb.FindProviderResponse(layer_digest=request.layer_digest)


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedDiscovery, pb_grpc.ServiceDiscoveryStub]]:
    servicer = ScriptedDiscovery()
    server = grpc.aio.server()
    pb_grpc.add_ServiceDiscoveryServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    servicer.address = f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(servicer.address) as channel:
        yield servicer, pb_grpc.ServiceDiscoveryStub(channel)
    await server.stop(0)


FAST = RetryPolicy(attempts=4, base=0.01, cap=0.05)


async def test_unavailable_is_retried_until_it_succeeds(scripted) -> None:
    servicer, stub = scripted
    servicer.script = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED]
    response = await FAST.run(lambda: stub.FindProvider(pb.FindProviderRequest(layer_digest="x")))
    assert response.layer_digest == "x" and servicer.calls == 3


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                  grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION])
async def test_client_errors_are_never_retried(scripted, code: grpc.StatusCode) -> None:
    servicer, stub = scripted
    servicer.script = [code]
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await FAST.run(lambda: stub.FindProvider(pb.FindProviderRequest()))
    assert failure.value.code() == code and servicer.calls == 1


async def test_retries_stop_after_the_last_attempt_with_the_last_error(scripted) -> None:
    servicer, stub = scripted
    servicer.script = [grpc.StatusCode.UNAVAILABLE] * 10
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await FAST.run(lambda: stub.FindProvider(pb.FindProviderRequest()))
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE and servicer.calls == FAST.attempts


def test_classification_and_backoff() -> None:
    assert grpc_retryable(grpc.StatusCode.UNAVAILABLE) and not grpc_retryable(grpc.StatusCode.INVALID_ARGUMENT)
    assert grpc_permanent(grpc.StatusCode.NOT_FOUND) and not grpc_permanent(grpc.StatusCode.UNAVAILABLE)
    assert http_retryable(503) and http_retryable(429) and not http_retryable(404) and not http_retryable(401)
    policy = RetryPolicy(base=1.0, cap=5.0)
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0), (5000, 5.0)):  # no overflow
        waits = [policy.delay(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 1  # jittered


async def test_discovery_client_backs_off_and_retries_unavailable_but_not_not_found(scripted) -> None:
    """An internal client on the shared policy: every replica failing with UNAVAILABLE is asked again
    after a backoff; NOT_FOUND is an answer, not retried."""
    servicer, _ = scripted
    client = DiscoveryClient([servicer.address], retry=FAST)
    servicer.script = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    assert await client.find_provider("x") == [] and servicer.calls == 3
    servicer.calls, servicer.script = 0, [grpc.StatusCode.NOT_FOUND]
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await client.find_provider("x")
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND and servicer.calls == 1
    servicer.calls, servicer.script = 0, [grpc.StatusCode.UNAVAILABLE] * 10
    with pytest.raises(DiscoveryUnavailableError, match="UNAVAILABLE"):
        await client.find_provider("x")
    assert servicer.calls == FAST.attempts


INTERNAL_CLIENTS = {   # module -> the call it makes to another afsd daemon or a registry
    "afsd/oci/_retry.py": "layerstore -> registry",
    "afsd/cluster/discovery_client.py": "everyone -> discovery",
    "afsd/node/images.py": "mount -> layerstore (PullImage)",
    "afsd/cluster/fetcher.py": "mount -> layerstore (ReadLayer)",
    "afsd/proxy/retry.py": "proxy -> afslet",
}


def test_every_internal_client_takes_its_retry_policy_from_the_one_module() -> None:
    root = Path(__file__).resolve().parents[1]
    for module, call in INTERNAL_CLIENTS.items():
        source = (root / module).read_text()
        uses_it = "from afsd.retry import" in source or "from afsd import retry" in source
        assert uses_it and "RetryPolicy" in source, f"{module} ({call}) does not use afsd.retry"
    # No other module computes a jittered backoff of its own.
    for path in (root / "afsd").rglob("*.py"):
        if path.name != "retry.py" and "api" not in path.parts:
            assert "random.uniform" not in path.read_text(), path
