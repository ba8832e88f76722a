"""Guest side of the VM test run: a pytest plugin that writes one JSON line per test phase.

tests/vm/init.sh loads it (`-p tests.vm.report`) inside the VM and points AFSD_VM_REPORT at a file on the
results share; tests/vm/runner.py reads that file on the host and turns each line back into the outcome of
the host's proxy test with the same node id. Lines are flushed one by one, so the results of the tests that
finished survive a VM that dies halfway.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

REPORT_ENV = "AFSD_VM_REPORT"


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    if isinstance(report.longrepr, tuple):  # (path, lineno, "Skipped: reason")
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return report.longreprtext


def _write(record: dict[str, Any]) -> None:
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    record: dict[str, Any] = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "duration": report.duration,
        "sections": [[title, text] for title, text in report.sections],
    }
    if report.failed:
        record["longrepr"] = report.longreprtext
    elif report.skipped:
        record["reason"] = _skip_reason(report)
    if hasattr(report, "wasxfail"):
        record["wasxfail"] = report.wasxfail
    _write(record)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _write({"nodeid": report.nodeid, "when": "collect", "outcome": "failed", "longrepr": report.longreprtext})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _write({"nodeid": "", "when": "session", "outcome": "finished", "exitstatus": int(exitstatus)})
