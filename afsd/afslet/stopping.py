"""The staged abort: how afslet ends a command it has to stop — at its timeout, on `afsd stop`, when
afslet itself shuts down, or when the client went away.

    term       SIGTERM to the container's init, then wait up to --stop-term-timeout
    interrupt  SIGINT, then wait up to --stop-interrupt-timeout; only if the workload asked for it with
               AFSD_STOP_INTERRUPT=1 in its environment (the request's env, or the image's Env)
    kill       SIGKILL, then wait up to --stop-kill-timeout; after that every process left in the
               container's cgroup is killed directly

The stage during which the init exits is the one that ended the execution; it is reported in the
result (`Result.stop_stage`), in the log frames (source `stop`) and in `afsd_let_stops_total`.

Signals go to the init only, as `docker stop` does. The init is PID 1 of the container's pid namespace,
so the kernel delivers it only the signals it has a handler for: a command that does not handle
SIGTERM ignores it and is killed at the last stage. (The SIGINT stage is for programs that clean up on
an interrupt but not on SIGTERM: Python's default KeyboardInterrupt handler is one.) When the init
exits, the kernel kills everything else in its pid namespace.
"""

from __future__ import annotations

import asyncio
import enum
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from afsd.api import afslet_pb2 as pb

INTERRUPT_ENV = "AFSD_STOP_INTERRUPT"
LAST_RESORT_WAIT = 10.0  # after killing the cgroup's processes directly


class StopStage(enum.Enum):
    NONE = "none"            # the command ended on its own
    TERM = "term"
    INTERRUPT = "interrupt"
    KILL = "kill"


class StopReason(enum.Enum):
    TIMEOUT = "timeout"
    REQUEST = "stop"         # afsd stop
    SHUTDOWN = "shutdown"    # afslet drains
    CANCELLED = "cancelled"  # the client went away


# How they read on the wire (afsletpb.StopStage / StopReason, also used by afsd.executions.v1).
WIRE_STAGE = {StopStage.NONE: pb.STOP_STAGE_NONE, StopStage.TERM: pb.STOP_STAGE_TERM,
              StopStage.INTERRUPT: pb.STOP_STAGE_INTERRUPT, StopStage.KILL: pb.STOP_STAGE_KILL}
WIRE_REASON = {None: pb.STOP_REASON_NONE, StopReason.TIMEOUT: pb.STOP_REASON_TIMEOUT,
               StopReason.REQUEST: pb.STOP_REASON_REQUEST, StopReason.SHUTDOWN: pb.STOP_REASON_SHUTDOWN,
               StopReason.CANCELLED: pb.STOP_REASON_CANCELLED}

STAGE_SIGNALS = {StopStage.TERM: signal.SIGTERM, StopStage.INTERRUPT: signal.SIGINT, StopStage.KILL: signal.SIGKILL}


def wants_interrupt(env: Iterable[str]) -> bool:
    """Whether the process environment opts in to the SIGINT stage (the last AFSD_STOP_INTERRUPT wins)."""
    value = ""
    for entry in env:
        key, _, rest = entry.partition("=")
        if key == INTERRUPT_ENV:
            value = rest
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class StopPolicy:
    term_timeout: float = 10.0
    interrupt_timeout: float = 5.0
    kill_timeout: float = 5.0

    def stages(self, interrupt: bool) -> list[tuple[StopStage, float]]:
        stages = [(StopStage.TERM, self.term_timeout)]
        if interrupt:
            stages.append((StopStage.INTERRUPT, self.interrupt_timeout))
        return [*stages, (StopStage.KILL, self.kill_timeout)]

    @property
    def longest(self) -> float:
        """The longest a staged abort waits before its last resort: every stage's timeout."""
        return self.term_timeout + self.interrupt_timeout + self.kill_timeout


@dataclass(frozen=True)
class StopResult:
    reason: StopReason
    stage: StopStage
    ignored: tuple[tuple[str, float], ...] = ()  # (signal name, seconds waited) of stages that did not end it
    seconds: float = 0.0                          # from the first signal to the exit

    @property
    def stopped(self) -> bool:
        return self.stage is not StopStage.NONE

    def describe(self) -> str:
        """How it ended, for a result's error: "it exited after SIGTERM", "SIGKILL ended it (...)"."""
        if not self.stopped:
            return "it ended on its own"
        name = STAGE_SIGNALS[self.stage].name
        before = ", ".join(f"{signal_name} for {waited:g} s" for signal_name, waited in self.ignored)
        if self.stage is StopStage.KILL:
            return f"{name} ended it" + (f" (it ignored {before})" if before else "")
        return f"it exited after {name}" + (f" (having ignored {before})" if before else "")


Note = Callable[[str], None]


async def staged_stop(*, reason: StopReason, policy: StopPolicy, interrupt: bool, exited: asyncio.Future[int],
                      send: Callable[[signal.Signals], None], kill_everything: Callable[[], Awaitable[object]],
                      note: Note) -> StopResult:
    """Run the stages until `exited` (the init's wait status) resolves; `send` signals the init.

    Raises TimeoutError if even killing the cgroup's processes directly does not end the init.
    """
    started = time.monotonic()
    ignored: list[tuple[str, float]] = []
    last = StopStage.NONE
    for stage, timeout in policy.stages(interrupt):
        if exited.done():
            break
        sig = STAGE_SIGNALS[stage]
        note(f"stopping ({reason.value}): {sig.name} to the container's init, waiting up to {timeout:g} s")
        send(sig)
        last = stage
        try:
            await asyncio.wait_for(asyncio.shield(exited), timeout)
        except TimeoutError:
            ignored.append((sig.name, timeout))
            continue
        break
    if not exited.done():
        note("still running after SIGKILL: killing every process in its cgroup")
        await kill_everything()
        await asyncio.wait_for(asyncio.shield(exited), LAST_RESORT_WAIT)
        last = StopStage.KILL
    elif last is not StopStage.NONE and ignored and ignored[-1][0] == STAGE_SIGNALS[last].name:
        ignored.pop()  # it ended during the stage's wait after all (the timer and the exit raced)
    result = StopResult(reason, last, tuple(ignored), time.monotonic() - started)
    if result.stopped:
        note(f"stopped ({reason.value}) at stage {last.value}: {result.describe()} "
             f"({result.seconds:.1f} s after the first signal)")
    return result


def wire_stop(stop: StopResult | None) -> tuple[int, int]:
    """(afsletpb.StopStage, afsletpb.StopReason) of a staged abort's result (NONE, NONE without one)."""
    if stop is None:
        return pb.STOP_STAGE_NONE, pb.STOP_REASON_NONE
    return WIRE_STAGE[stop.stage], WIRE_REASON[stop.reason]
