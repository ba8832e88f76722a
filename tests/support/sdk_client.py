"""Drive an afslet with the published `afs-sdk` client, in a process of its own.

afs-sdk's generated protos and afsd's define the same protobuf symbols (package `afsletpb`), so they
cannot be imported into one process: the tests run this script instead. It reads one JSON request on
stdin and prints one JSON object per event on stdout, flushed as each event arrives (so a test can
watch a call in progress, and kill this process to play a client that disconnects).

Request: {"address": "HOST:PORT", "op": "execute" | "raw" | "status", "tls": {"ca", "cert", "key"}?, ...}
- tls: connect over TLS the way docs/security.md tells afs-sdk users to (an ssl.SSLContext with the cluster
  CA, the user's certificate and ALPN h2, passed as AfsClient(..., ssl=context)); "cert"/"key" may be absent.
- token: send `authorization: Bearer TOKEN` on every call (a grpclib SendRequest hook, docs/security.md).
- execute: "input": ExecuteInput fields; "extra_entries": [{"kind": "dir"|"file"|"symlink", "path", "mode",
  "uid", "gid", "mtime_unix", "target", "content_b64"}]. Uses AfsClient.execute (the SDK's high-level API,
  which also parses the tar): events accepted, log, result, tar_start, tar_dir, tar_symlink, tar_file
  (one per file, whole content in "data_b64"), done.
- raw: "frames": [{"start": {...}} | {"file_begin": {...}} | {"file_chunk": {"data_b64": ...}} | {"file_end": {}}]
  sent as they are with AfsClient.raw_execute; events accepted, log, result, tar_start, done, and at the
  end "tar_bytes" with the concatenated tar_chunk data (to check what the SDK parser leaves out: whiteouts).
- status: AfsClient.get_runtime_status → one "status" event.
- repeat: "count" executions of "input" one after another on one connection (for latency measurements):
  one "run" event each, with the client-side "seconds" from the first frame sent to `done`, the exit code
  and the server's phase timings ("phases": {name: ms}).
A gRPC error ends the output with {"event": "error", "status": "INVALID_ARGUMENT", "message": ...}; a
connection lost mid-call with status "STREAM_TERMINATED".
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import sys
import time
from dataclasses import asdict

from afs_sdk import (
    AcceptedEvent,
    AfsClient,
    DoneEvent,
    ExecuteInput,
    ExtraDirectory,
    ExtraFile,
    ExtraSymlink,
    LogEvent,
    ResultEvent,
    TarArchiveStart,
    TarDirectory,
    TarFilePart,
    TarSymlink,
)
from afs_sdk.api.afslet.v1 import afslet_pb2 as pb
from google.protobuf import json_format
from grpclib.events import SendRequest, listen
from grpclib.exceptions import GRPCError, StreamTerminatedError


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def extra_entry(spec: dict):
    common = {key: spec[key] for key in ("mode", "uid", "gid", "mtime_unix") if key in spec}
    if spec["kind"] == "dir":
        return ExtraDirectory(spec["path"], **common)
    if spec["kind"] == "symlink":
        return ExtraSymlink(spec["path"], spec["target"], **common)
    return ExtraFile(spec["path"], base64.b64decode(spec.get("content_b64", "")), **common)


async def execute(client: AfsClient, request: dict) -> None:
    fields = dict(request.get("input", {}))
    fields["extra_entries"] = [extra_entry(e) for e in request.get("extra_entries", [])]
    if "command" in fields:
        fields["command"] = tuple(fields["command"])
    files: dict[str, bytearray] = {}
    async for event in client.execute(ExecuteInput(**fields)):
        if isinstance(event, LogEvent):
            emit("log", source=event.source, message=event.message)
        elif isinstance(event, ResultEvent):
            emit("result", success=event.success, exit_code=event.exit_code, error=event.error)
        elif isinstance(event, TarArchiveStart):
            emit("tar_start", name=event.name)
        elif isinstance(event, TarDirectory):
            emit("tar_dir", **asdict(event))
        elif isinstance(event, TarSymlink):
            emit("tar_symlink", **asdict(event))
        elif isinstance(event, TarFilePart):
            files.setdefault(event.path, bytearray()).extend(event.data)
            if event.eof:
                meta = {k: v for k, v in asdict(event).items() if k not in ("data", "offset", "eof")}
                emit("tar_file", data_b64=base64.b64encode(bytes(files.pop(event.path))).decode(), **meta)
        elif isinstance(event, AcceptedEvent):
            emit("accepted", accepted=event.accepted)
        elif isinstance(event, DoneEvent):
            emit("done")


def raw_frame(spec: dict) -> pb.ExecuteRequest:
    spec = json.loads(json.dumps(spec))
    chunk = spec.get("file_chunk")
    if chunk is not None and "data_b64" in chunk:
        chunk["data"] = chunk.pop("data_b64")  # protobuf JSON spells bytes as base64
    return json_format.ParseDict(spec, pb.ExecuteRequest())


async def raw(client: AfsClient, request: dict) -> None:
    frames = [raw_frame(f) for f in request["frames"]]

    async def requests():
        for frame in frames:
            yield frame

    tar = bytearray()
    async for response in client.raw_execute(requests()):
        kind = response.WhichOneof("payload")
        if kind == "accepted":
            emit("accepted", accepted=response.accepted.accepted)
        elif kind == "log":
            emit("log", source=response.log.source, message=response.log.message)
        elif kind == "result":
            emit("result", success=response.result.success, exit_code=response.result.exit_code,
                 error=response.result.error)
        elif kind == "tar_header":
            emit("tar_start", name=response.tar_header.name)
        elif kind == "tar_chunk":
            tar.extend(response.tar_chunk.data)
        elif kind == "done":
            emit("tar_bytes", data_b64=base64.b64encode(bytes(tar)).decode())
            emit("done")


async def repeat(client: AfsClient, request: dict) -> None:
    fields = dict(request["input"])
    fields["command"] = tuple(fields.get("command", ()))
    for _ in range(request["count"]):
        phases: dict[str, float] = {}
        exit_code = None
        started = time.perf_counter()
        async for event in client.execute(ExecuteInput(**fields)):
            if isinstance(event, LogEvent) and event.source == "timing":
                pairs = dict(part.split("=", 1) for part in event.message.split()[1:])
                phases[pairs["phase"]] = float(pairs["ms"])
            elif isinstance(event, ResultEvent):
                exit_code = event.exit_code
        emit("run", seconds=time.perf_counter() - started, exit_code=exit_code, phases=phases)


def ssl_context(tls: dict) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=tls["ca"])
    if tls.get("cert"):
        context.load_cert_chain(tls["cert"], tls["key"])
    context.set_alpn_protocols(["h2"])
    return context


def authorize_every_call(client: AfsClient, token: str) -> None:
    async def add_token(event: SendRequest) -> None:
        event.metadata["authorization"] = f"Bearer {token}"
    listen(client._channel, SendRequest, add_token)   # AfsClient takes no metadata; its channel's hook does


async def main() -> None:
    request = json.loads(sys.stdin.read())
    host, _, port = request["address"].rpartition(":")
    context = ssl_context(request["tls"]) if request.get("tls") else None
    async with AfsClient(host, int(port), ssl=context) as client:
        if request.get("token"):
            authorize_every_call(client, request["token"])
        try:
            if request["op"] == "status":
                emit("status", **asdict(await client.get_runtime_status()))
            elif request["op"] == "raw":
                await raw(client, request)
            elif request["op"] == "repeat":
                await repeat(client, request)
            else:
                await execute(client, request)
        except GRPCError as error:
            emit("error", status=error.status.name, message=error.message or "")
        except StreamTerminatedError as error:  # the server went away mid-call
            emit("error", status="STREAM_TERMINATED", message=str(error))
        except (ssl.SSLError, ConnectionError) as error:  # the TLS handshake was refused
            emit("error", status="CONNECTION_REFUSED", message=f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    asyncio.run(main())
