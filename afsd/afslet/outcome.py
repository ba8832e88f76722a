"""What a finished Execute reports in its `result` frame: the exit-code table, written down once.

| exit_code | success | meaning                                                               |
|-----------|---------|-----------------------------------------------------------------------|
| 0         | true    | the command exited 0                                                  |
| 1-123,... | false   | the command's own exit code, unchanged                                |
| 128+N     | false   | the command was killed by signal N (137 = SIGKILL, e.g. the OOM killer)|
| 124       | false   | afslet stopped the command at its timeout (like timeout(1))           |
| 125       | false   | setup failed before the command ran (image, mount, user, runc)        |
| 126       | false   | the command exists but cannot be executed (permission denied)         |
| 127       | false   | the command was not found in the image                                |

A command stopped by `afsd stop` or by afslet's shutdown keeps its own exit code (0 if it exited
cleanly on SIGTERM, 137 if SIGKILL ended it) and is never a success; one stopped before it started
reports 125. The staged abort's stage goes to `Result.stop_stage` (stopping.py).

A command may itself exit with 124-127; `error` tells the cases apart: it is empty when the command
exited 0, and otherwise says in one line what happened ("timed out after 1000 ms", "out of memory",
"exited with code 7", the setup error). Output never goes into `error`: it is only in the log frames.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from afsd.afslet.stopping import StopReason, StopResult, StopStage

EXIT_TIMEOUT = 124
EXIT_SETUP_FAILED = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


# Why afslet stopped a command, as a result's error begins.
_STOPPED_BY = {
    StopReason.REQUEST: "stopped by `afsd stop`",
    StopReason.SHUTDOWN: "stopped because afslet is shutting down",
    StopReason.CANCELLED: "stopped because the client went away",
}
# The outcome label (metrics, `afsd ps`) of a command afslet stopped, by reason.
_STOPPED_KIND = {StopReason.REQUEST: "stopped", StopReason.SHUTDOWN: "shutdown", StopReason.CANCELLED: "cancelled",
                 StopReason.TIMEOUT: "timeout"}


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    error: str = ""
    kind: str = "ok"  # ok | failed | timeout | oom | stopped | shutdown | cancelled | setup_error (metrics label)
    stop: StopResult | None = None

    @property
    def success(self) -> bool:
        return self.kind == "ok"


def exit_code_of(wait_status: int) -> int:
    """A waitpid status as a shell reports it: the exit code, or 128 + the signal number."""
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def command_outcome(exit_code: int, *, stop: StopResult | None = None, timeout_ms: int = 0, oom_kills: int = 0,
                    memory_mb: int = 0) -> Outcome:
    """Classify how a command that did start ended (`stop`: afslet's staged abort, if it ran)."""
    if stop is not None and stop.stopped:
        if stop.reason is StopReason.TIMEOUT:
            return Outcome(EXIT_TIMEOUT, f"timed out after {timeout_ms} ms: afslet stopped the container: "
                                         f"{stop.describe()}", "timeout", stop)
        return Outcome(exit_code, f"{_STOPPED_BY[stop.reason]}: {stop.describe()} (exit code {exit_code})",
                       _STOPPED_KIND[stop.reason], stop)
    if oom_kills and exit_code != 0:
        return Outcome(exit_code, f"out of memory: the kernel's OOM killer killed {oom_kills} process(es) at the "
                                  f"{memory_mb} MB limit (exit code {exit_code})", "oom")
    if exit_code == 0:
        return Outcome(0)
    if exit_code > 128:
        return Outcome(exit_code, f"killed by {_signal_name(exit_code - 128)} (exit code {exit_code})", "failed")
    return Outcome(exit_code, f"exited with code {exit_code}", "failed")


def setup_outcome(status: int, message: str) -> Outcome:
    return Outcome(status, message, "setup_error")


def not_started_outcome(reason: StopReason) -> Outcome:
    """Stopped while it was being prepared: the command never ran."""
    return Outcome(EXIT_SETUP_FAILED, f"{_STOPPED_BY[reason]} before the command started",
                   _STOPPED_KIND[reason], StopResult(reason, StopStage.NONE))
