"""Drive an afsd proxy with the published `afs-sdk` client, in a process of its own (see sdk_client.py,
whose ops this script also runs: execute, raw, status, repeat).

A request's "tls" ({"ca", "cert", "key"}) and "token" work as in sdk_client.py.

Ops of the proxy:
- proxy_status: AfsClient.status() (the AfsProxy.Status stream) → one event per frame: "layerstore",
  "afslet", "status_error", "summary", with the SDK dataclass's fields.
- reconcile: AfsClient.reconcile_image(ReconcileImageInput(**"input")) → one "reconciled" event.
- concurrent: "count" executions of "input" at once → one "call" event each, in the order they end:
  "index", "exit_code" (None without a result), "stdout", "proxy" (the proxy's log lines, which name
  the afslet), and "error"/"message" for a gRPC error.

Concurrent executes in one process hit two afs-sdk limits, measured: one AfsClient parses tars on a
single worker thread (its default tar_executor), so two executes on one client wait on each other; and
every execute's tar parser blocks a thread of the event loop's DEFAULT executor while it waits for
output (`asyncio.to_thread(out_q.get)`) and needs another to be fed (`to_thread(in_q.put)`), so with
the default executor (cpu count + 4 threads) about six executes in flight deadlock for good. Hence one
AfsClient per call and a default executor with threads for all of them.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import sdk_client
from afs_sdk import (
    AfsClient,
    ExecuteInput,
    LogEvent,
    ProxyAfsletInstance,
    ProxyLayerstoreInstance,
    ProxyStatusError,
    ProxyStatusSummary,
    ReconcileImageInput,
    ResultEvent,
)
from grpclib.exceptions import GRPCError, StreamTerminatedError
from sdk_client import emit

_STATUS_EVENTS = {ProxyLayerstoreInstance: "layerstore", ProxyAfsletInstance: "afslet",
                  ProxyStatusError: "status_error", ProxyStatusSummary: "summary"}


async def proxy_status(client: AfsClient, request: dict) -> None:
    async for event in client.status(**request.get("flags", {})):
        emit(_STATUS_EVENTS[type(event)], **asdict(event))


async def reconcile(client: AfsClient, request: dict) -> None:
    result = await client.reconcile_image(ReconcileImageInput(**request["input"]))
    emit("reconciled", **asdict(result))


async def one_call(address: tuple[str, int], index: int, fields: dict) -> None:
    outcome: dict = {"index": index, "exit_code": None, "stdout": [], "proxy": []}
    try:
        async with AfsClient(*address) as client:
            await _collect(client, fields, outcome)
    except GRPCError as error:
        outcome.update(error=error.status.name, message=error.message or "")
    except StreamTerminatedError as error:
        outcome.update(error="STREAM_TERMINATED", message=str(error))
    emit("call", **outcome)


async def _collect(client: AfsClient, fields: dict, outcome: dict) -> None:
    async for event in client.execute(ExecuteInput(**fields)):
        if isinstance(event, LogEvent) and event.source == "runc:stdout":
            outcome["stdout"].append(event.message)
        elif isinstance(event, LogEvent) and event.source == "proxy":
            outcome["proxy"].append(event.message)
        elif isinstance(event, ResultEvent):
            outcome["exit_code"] = event.exit_code


async def concurrent(client: AfsClient, request: dict) -> None:
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2 * request["count"] + 4))
    fields = dict(request["input"])
    fields["command"] = tuple(fields.get("command", ()))
    host, _, port = request["address"].rpartition(":")
    await asyncio.gather(*(one_call((host, int(port)), index, fields) for index in range(request["count"])))


_OPS = {"proxy_status": proxy_status, "reconcile": reconcile, "concurrent": concurrent,
        "execute": sdk_client.execute, "raw": sdk_client.raw, "repeat": sdk_client.repeat}


async def main() -> None:
    request = json.loads(sys.stdin.read())
    host, _, port = request["address"].rpartition(":")
    context = sdk_client.ssl_context(request["tls"]) if request.get("tls") else None   # as sdk_client.py
    async with AfsClient(host, int(port), ssl=context) as client:
        if request.get("token"):
            sdk_client.authorize_every_call(client, request["token"])
        try:
            if request["op"] == "status":
                emit("status", **asdict(await client.get_runtime_status()))
            else:
                await _OPS[request["op"]](client, request)
        except GRPCError as error:
            emit("error", status=error.status.name, message=error.message or "")
        except StreamTerminatedError as error:
            emit("error", status="STREAM_TERMINATED", message=str(error))
        except (ssl.SSLError, ConnectionError) as error:  # the TLS handshake was refused
            emit("error", status="CONNECTION_REFUSED", message=f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    asyncio.run(main())
