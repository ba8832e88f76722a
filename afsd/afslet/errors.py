"""Errors of the Execute service, each mapped to how the client sees it.

- `RequestError`: the client sent something malformed → the call ends with INVALID_ARGUMENT.
- `AdmissionError`: not enough CPU/memory share free → RESOURCE_EXHAUSTED, with the numbers.
- `LimitError`: the call went over one of this afslet's bounds (extra files, writable layer) →
  RESOURCE_EXHAUSTED naming the limit and its flag.
- `DeadlineError`: the client took too long to send its start frame or its upload → DEADLINE_EXCEEDED.
- `ShuttingDownError`: afslet is draining (SIGTERM) → UNAVAILABLE, so the client retries elsewhere.
- `SetupError`: the request was fine but running it failed before the command ran (image, mount, user,
  runc) → a `result` frame with a setup exit code (see outcome.py) and the message in `error`.
"""

from __future__ import annotations

from afsd.afslet.outcome import EXIT_SETUP_FAILED
from afsd.errors import AfsdError


class RequestError(AfsdError):
    """A malformed Execute stream (missing/duplicate start, bad field, unsafe path, ...)."""

    exit_code = 2


class AdmissionError(AfsdError):
    """The requested CPU cores or memory do not fit in what this afslet has free."""


class LimitError(AfsdError):
    """The call went over a size bound of this afslet."""


class DeadlineError(AfsdError):
    """The client did not send its start frame, or finish its upload, in time."""


class ShuttingDownError(AfsdError):
    """afslet is shutting down: it admits no new executions."""


class ContainerStuckError(AfsdError):
    """A container's command outlived every stage of the staged abort and the killing of its cgroup."""


class SetupError(AfsdError):
    """Preparing the container failed; `status` is the exit code reported for it."""

    def __init__(self, message: str, status: int = EXIT_SETUP_FAILED) -> None:
        super().__init__(message)
        self.status = status
