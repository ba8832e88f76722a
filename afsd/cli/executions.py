"""`afsd ps`, `afsd logs ID`, `afsd stop ID`: execution management (`afsd.executions.v1.Executions`)
against an afslet, or a proxy that serves the same service for every afslet behind it.

An ID may be shortened to any prefix that names one execution (as `afsd ps` prints them, 12 digits);
the full id is looked up with List first.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import TYPE_CHECKING, Self

from afsd.cli._options import add_tls_options, tls_from, token_from
from afsd.errors import AfsdError

if TYPE_CHECKING:
    import grpc

    from afsd.api import executions_pb2 as epb
    from afsd.api import executions_pb2_grpc as epb_grpc
    from afsd.trust.tls import TlsConfig

DEFAULT_TARGET = os.environ.get("AFSD_TARGET", "127.0.0.1:62051")
SHORT_ID = 12
STOP_DEADLINE = 600.0  # a stop waits for every stage of the staged abort; the server bounds it


class ExecutionsError(AfsdError):
    """Execution management failed: unreachable server, unknown or ambiguous id."""


def register(subparsers: argparse._SubParsersAction) -> None:
    ps = subparsers.add_parser("ps", help="list executions on an afslet or through the proxy",
                               description="List executions in progress (with -a also the last finished ones): "
                                           "id, image, command, reserved cpu/memory/gpus, age, node, state and "
                                           "live CPU time and memory from the container's cgroup.")
    ps.add_argument("-a", "--all", action="store_true", help="include finished executions the afslet still keeps")
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    _target_option(ps)
    ps.set_defaults(handler=run_ps)

    logs = subparsers.add_parser("logs", help="show an execution's output",
                                 description="Print the kept tail of an execution's output (stdout lines to "
                                             "stdout, stderr lines to stderr); with --follow, then its new output "
                                             "until it ends.")
    logs.add_argument("id", metavar="ID", help="execution id, or a prefix naming one")
    logs.add_argument("-n", "--tail", type=int, default=0, metavar="N", help="only the last N frames (default: all kept)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the execution ends")
    logs.add_argument("--all-sources", action="store_true",
                      help="every log frame as `[source] message` (timing, stop, resource, ...), not only output")
    _target_option(logs)
    logs.set_defaults(handler=run_logs)

    stop = subparsers.add_parser("stop", help="stop an execution (staged: SIGTERM, [SIGINT], SIGKILL)",
                                 description="Stop an execution with afslet's staged abort and wait until its "
                                             "command has ended; print which stage ended it.")
    stop.add_argument("id", metavar="ID", help="execution id, or a prefix naming one")
    _target_option(stop)
    stop.set_defaults(handler=run_stop)


def _target_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, metavar="HOST:PORT",
                        help="afslet or proxy gRPC address (default $AFSD_TARGET or %(default)s)")
    add_tls_options(parser, client=True)


# -- talking to the server ----------------------------------------------------------------------------


def _explain(error: grpc.aio.AioRpcError, target: str, tls: TlsConfig | None = None) -> ExecutionsError:
    import grpc

    from afsd.cli._calls import call_failure

    if error.code() == grpc.StatusCode.UNIMPLEMENTED:
        return ExecutionsError(f"{target} does not serve execution management (afsd.executions.v1); is it an "
                               "afslet or proxy of this afsd version?")
    return ExecutionsError(call_failure(error, target, tls))


class _Client:
    def __init__(self, target: str, tls: TlsConfig | None = None, token: str | None = None) -> None:
        from afsd.api import executions_pb2_grpc as epb_grpc
        from afsd.rpc import open_channel

        self.target = target
        self.tls = tls
        self._channel = open_channel(target, tls, token=token)
        self.stub: epb_grpc.ExecutionsStub = epb_grpc.ExecutionsStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close()

    async def list(self, include_finished: bool) -> epb.ListResponse:
        import grpc

        from afsd.api import executions_pb2 as epb

        try:
            return await self.stub.List(epb.ListRequest(include_finished=include_finished), timeout=30)
        except grpc.aio.AioRpcError as error:
            raise _explain(error, self.target, self.tls) from None

    async def resolve(self, prefix: str) -> epb.Execution:
        """The one execution whose id starts with `prefix`."""
        listed = await self.list(include_finished=True)
        matches = [e for e in listed.executions if e.id.startswith(prefix.lower())]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            silent = "; ".join(_unreachable(u) for u in listed.unreachable)
            raise ExecutionsError(f"no execution {prefix!r} on {self.target}" + (f" ({silent})" if silent else "")
                                  + "; `afsd ps -a` lists them")
        names = ", ".join(e.id for e in matches[:5])
        raise ExecutionsError(f"execution id {prefix!r} is ambiguous on {self.target} ({names}); give more digits")


# -- ps -----------------------------------------------------------------------------------------------


def _unreachable(afslet: epb.Unreachable) -> str:
    """An afslet a proxy could not reach, worded as the proxy words it."""
    from afsd.proxy.errors import unreachable

    return unreachable(afslet.endpoint, afslet.error)


def _age(ms: int) -> str:
    seconds = ms // 1000
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            rest = (seconds % size) // smaller_size
            return f"{seconds // size}{unit}{rest}{smaller}" if rest else f"{seconds // size}{unit}"
    return f"{seconds}s"


def _bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{count}B"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _state(execution: epb.Execution) -> str:
    from afsd.api import executions_pb2 as epb

    name = epb.State.Name(execution.state).removeprefix("STATE_").lower()
    if execution.state == epb.STATE_FINISHED:
        return f"{execution.outcome or 'finished'} ({execution.exit_code})"
    return name


def format_table(executions: list[epb.Execution]) -> str:
    rows = [("ID", "IMAGE", "COMMAND", "CPU/MEM/GPU", "AGE", "NODE", "STATE", "CPU", "MEM (PEAK)")]
    for e in executions:
        usage = e.usage
        command = " ".join(shlex.join(e.command).split())  # one line, whatever the script looks like
        rows.append((e.id[:SHORT_ID], _clip(e.image, 40), _clip(command, 32),
                     f"{e.cpu_cores}/{e.memory_mb}M/{e.gpus}", _age(e.age_ms), _clip(e.node_id or e.endpoint, 20),
                     _state(e), f"{usage.cpu_seconds:.2f}s",
                     f"{_bytes(usage.memory_current_bytes)} ({_bytes(usage.memory_peak_bytes)})"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


async def run_ps(args: argparse.Namespace) -> int:
    from afsd.cli._output import print_json

    async with _Client(args.target, tls_from(args), token_from(args)) as client:
        listed = await client.list(include_finished=args.all)
    if args.json:
        print_json(listed, with_defaults=True)
        return 0
    print(format_table(list(listed.executions)))
    for unreachable in listed.unreachable:
        print(f"afsd ps: {_unreachable(unreachable)}", file=sys.stderr)
    return 0


# -- logs ---------------------------------------------------------------------------------------------


async def run_logs(args: argparse.Namespace) -> int:
    import grpc

    from afsd.api import executions_pb2 as epb

    if args.tail < 0:
        raise ExecutionsError(f"--tail must be >= 0 (got {args.tail})")
    async with _Client(args.target, tls_from(args), token_from(args)) as client:
        execution = await client.resolve(args.id)
        request = epb.LogsRequest(id=execution.id, tail=args.tail, follow=args.follow, endpoint=execution.endpoint)
        try:
            async for response in client.stub.Logs(request):
                if response.dropped:
                    print(f"afsd logs: {response.dropped} line(s) dropped: they left the kept tail before they "
                          "could be sent", file=sys.stderr, flush=True)
                for line in response.lines:
                    _print_line(line, args.all_sources)
        except grpc.aio.AioRpcError as error:
            raise _explain(error, args.target, client.tls) from None
    return 0


def _print_line(line: epb.LogLine, all_sources: bool) -> None:
    if all_sources:
        print(f"[{line.source}] {line.message}", flush=True)
    elif line.source == "runc:stdout":
        print(line.message, flush=True)
    elif line.source == "runc:stderr":
        print(line.message, file=sys.stderr, flush=True)


# -- stop ---------------------------------------------------------------------------------------------


async def run_stop(args: argparse.Namespace) -> int:
    import grpc

    from afsd.api import afslet_pb2 as pb
    from afsd.api import executions_pb2 as epb

    async with _Client(args.target, tls_from(args), token_from(args)) as client:
        execution = await client.resolve(args.id)
        try:
            response = await client.stub.Stop(epb.StopRequest(id=execution.id, endpoint=execution.endpoint),
                                              timeout=STOP_DEADLINE)
        except grpc.aio.AioRpcError as error:
            raise _explain(error, args.target, client.tls) from None
    stopped = response.execution
    stage = pb.StopStage.Name(stopped.stop_stage).removeprefix("STOP_STAGE_").lower()
    if response.already_finished:
        print(f"{stopped.id}: had already finished ({stopped.outcome}, exit code {stopped.exit_code})")
    else:
        print(f"{stopped.id}: stopped at stage {stage}: {stopped.error or stopped.outcome} "
              f"(on {stopped.node_id or stopped.endpoint})")
    return 0
