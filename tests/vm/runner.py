"""Host side of the VM test run: ONE VM boot per pytest session for every selected test under tests/vm/.

Data flow: conftest.py replaces each collected tests/vm test with a VmTestItem (same node id, no fixtures).
The first VmTestItem to run asks the session's VmRun for its outcome; VmRun builds the lab kernel if needed
(`scripts/kernel-setup.sh build`, cached), runs `scripts/vm-test.sh` with the node ids of every selected VM
test, and reads the guest's report.jsonl (written by tests/vm/report.py). Each VmTestItem then passes,
fails (showing the guest's traceback and captured output), skips or xfails as its twin did in the guest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
KERNEL_SETUP = CHECKOUT / "scripts" / "kernel-setup.sh"
VM_TEST = CHECKOUT / "scripts" / "vm-test.sh"
# A first build installs packages and compiles for 6-12 min on 2 cores (44 min measured on a host loaded
# by other work); the VM run has its own timeout, which vm-test.sh scales with the VM's speed
# (AFSD_VM_CPUS, AFSD_VM_CPU_HOG) unless AFSD_VM_TIMEOUT sets it: this side only keeps a backstop.
KERNEL_BUILD_TIMEOUT = 7200
VM_BACKSTOP = int(os.environ.get("AFSD_VM_TIMEOUT") or 4 * 3600) + 120
CONSOLE_TAIL_LINES = 80
# Markers that only mean something where the test really runs: the guest evaluates them, the proxy must not
# (a skipif on "/dev/cachefiles exists" would otherwise skip on the host, an xfail would hide a VM failure).
GUEST_ONLY_MARKERS = frozenset({"skip", "skipif", "xfail", "usefixtures", "parametrize", "filterwarnings"})
TERMINAL_ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")

VM_RUN_KEY = pytest.StashKey["VmRun"]()


class VmRunError(Exception):
    """The VM run as a whole went wrong (kernel build, boot, timeout): no test result to report."""


class GuestTestFailed(Exception):
    """The test failed inside the VM; the message is the guest's own failure report."""


@dataclass(frozen=True)
class GuestOutcome:
    kind: str  # "passed", "failed", "skipped" or "xfailed"
    text: str = ""


def _announce(config: pytest.Config, message: str, *, spaced: bool = True) -> None:
    """Print past pytest's output capture: a kernel build or VM run is minutes of otherwise silent waiting.
    `spaced`: a headline (a blank line before, bold); else a plain progress line."""
    capture = config.pluginmanager.getplugin("capturemanager")
    writer = config.get_terminal_writer()
    if capture is None:
        writer.line(message)
        return
    with capture.global_and_fixture_disabled():
        if spaced:
            writer.line()
        writer.line(message, bold=spaced)


def _tail(path: Path, lines: int = CONSOLE_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path.name} not written)"
    text = TERMINAL_ESCAPES.sub("", text.replace("\r", ""))  # SeaBIOS clears the screen on the console
    return "\n".join(text.splitlines()[-lines:])


class _Relay:
    """Shows a running command's progress lines (those starting with `prefix`) as they reach its log."""

    def __init__(self, log: Path, prefix: str, show: Callable[[str], None]) -> None:
        self.log, self.prefix, self.show = log, prefix, show
        self._offset = 0

    def poll(self) -> None:
        try:
            with open(self.log, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except OSError:
            return
        complete = data.rfind(b"\n") + 1
        self._offset += complete
        for line in data[:complete].decode(errors="replace").splitlines():
            if line.startswith(self.prefix):
                self.show(line)


def _run_logged(command: list[str], log: Path, env: dict[str, str], timeout: float,
                relay: _Relay | None = None) -> int:
    """Run `command` with its output in `log` (showing `relay`'s lines as they come); stop it if we are
    interrupted (Ctrl-C, pytest-timeout)."""
    deadline = time.monotonic() + timeout
    with open(log, "wb") as out:
        # setpriv --pdeathsig: if pytest itself is killed (SIGKILL, a CI timeout), the child still gets SIGTERM
        # and its trap stops qemu.
        process = subprocess.Popen(
            ["setpriv", "--pdeathsig", "TERM", "--", *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        try:
            while True:
                try:
                    return process.wait(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        raise
                finally:
                    if relay is not None:
                        relay.poll()
        except BaseException:
            process.terminate()  # vm-test.sh's trap stops qemu and removes its temporary files
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise


def _combine(records: list[dict]) -> GuestOutcome | None:
    """Fold one test's setup/call/teardown records into its outcome; None if the guest never finished it."""
    for record in records:
        if record["outcome"] == "failed":
            text = f"[inside the VM, {record['when']} failed]\n{record.get('longrepr', '')}"
            for title, section in record.get("sections", []):
                text += f"\n{'-' * 20} {title} (in the VM) {'-' * 20}\n{section}"
            return GuestOutcome("failed", text)
    for record in records:
        if record["outcome"] == "skipped":
            if "wasxfail" in record:
                return GuestOutcome("xfailed", record["wasxfail"])
            return GuestOutcome("skipped", f"in the VM: {record.get('reason', '')}")
    if any(r["when"] == "call" for r in records) and any(r["when"] == "teardown" for r in records):
        return GuestOutcome("passed")
    return None


class VmRun:
    """Runs the session's VM tests once, in one VM, and hands out each test's outcome."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results_dir: Path | None = None
        self.outcomes: dict[str, GuestOutcome] = {}
        self.error: str | None = None
        self.error_shown = False
        self.exit_code: int | None = None
        self.started = False
        self.nodeids: list[str] = []

    def outcome(self, session: pytest.Session, nodeid: str) -> GuestOutcome:
        if not self.started:
            self.started = True
            self.nodeids = [item.nodeid for item in session.items if isinstance(item, VmTestItem)]
            try:
                self._run(self.nodeids)
            except (VmRunError, subprocess.TimeoutExpired) as e:
                self.error = str(e)
        if nodeid in self.outcomes:  # also when the VM died later: what it reported still counts
            return self.outcomes[nodeid]
        if self.error is None:
            self.error = f"{self._vm_test_errors()}\nlast lines of the guest console:\n{self._console_tail()}"
        if self.error_shown:  # the whole story once, then a pointer to it
            raise VmRunError(
                f"no result from the VM: {self.error.splitlines()[0]} (see the first failed tests/vm test)"
            )
        self.error_shown = True
        raise VmRunError(self.error)

    def _vm_test_errors(self) -> str:
        """vm-test.sh's own error lines (timeout, no result, not root, ...), or its exit code."""
        assert self.results_dir is not None
        errors = [line for line in _tail(self.results_dir / "vm-test.log").splitlines() if "error:" in line]
        return "\n".join(errors) or f"the VM run did not report this test (scripts/vm-test.sh exited {self.exit_code})"

    def _console_tail(self) -> str:
        assert self.results_dir is not None
        return _tail(self.results_dir / "console.log")

    def _run(self, nodeids: list[str]) -> None:
        self.results_dir = Path(tempfile.mkdtemp(prefix="afsd-vm-results-"))
        env = dict(os.environ)
        kernel = self._kernel(env)
        env.update(
            AFSD_VM_KERNEL=kernel,
            AFSD_VM_RESULTS=str(self.results_dir),
            AFSD_VM_PYTHON=sys.executable,
            AFSD_VM_QUIET="1",
        )
        _announce(self.config, f"tests/vm: running {len(nodeids)} test(s) in one qemu VM (lab kernel, TCG) ...")
        started = time.monotonic()
        log = self.results_dir / "vm-test.log"
        relay = _Relay(log, "vm-test:", lambda line: _announce(self.config, f"tests/vm: {line}", spaced=False))
        self.exit_code = _run_logged([str(VM_TEST), "-v", "--color=no", *nodeids], log, env, timeout=VM_BACKSTOP,
                                     relay=relay)
        _announce(
            self.config,
            f"tests/vm: VM run finished in {time.monotonic() - started:.0f} s (guest pytest exit {self.exit_code})",
        )
        self._read_report(self.results_dir / "report.jsonl")

    def _kernel(self, env: dict[str, str]) -> str:
        found = subprocess.run([str(KERNEL_SETUP), "path"], check=False, capture_output=True, text=True, env=env)
        if found.returncode == 0 and shutil.which("qemu-system-x86_64"):
            return found.stdout.strip()
        _announce(self.config, "tests/vm: building the lab kernel once (6-12 min on 2 cores; cached afterwards)")
        log = self.results_dir / "kernel-build.log"
        started = time.monotonic()
        # Its stage and elapsed time every 30 s: a cold build is minutes of otherwise silent waiting.
        relay = _Relay(log, "kernel-setup:", lambda line: _announce(self.config, f"tests/vm: {line}", spaced=False))
        code = _run_logged([str(KERNEL_SETUP), "build"], log, env, timeout=KERNEL_BUILD_TIMEOUT, relay=relay)
        if code != 0:
            raise VmRunError(f"scripts/kernel-setup.sh build failed (exit {code}):\n{_tail(log, 40)}")
        _announce(self.config, f"tests/vm: kernel built in {time.monotonic() - started:.0f} s")
        kernel = log.read_text().strip().splitlines()[-1]  # build prints the bzImage path last, on stdout
        if not Path(kernel).is_file():
            raise VmRunError(f"scripts/kernel-setup.sh build did not end with a bzImage path:\n{_tail(log, 20)}")
        return kernel

    def _read_report(self, path: Path) -> None:
        by_nodeid: dict[str, list[dict]] = {}
        collect_errors: list[dict] = []
        try:
            lines = path.read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            record = json.loads(line)
            if record["when"] == "collect":
                collect_errors.append(record)
            elif record["when"] != "session":
                by_nodeid.setdefault(record["nodeid"], []).append(record)
        for nodeid, records in by_nodeid.items():
            outcome = _combine(records)
            if outcome is not None:
                self.outcomes[nodeid] = outcome
        # A module that failed to import in the guest has no test records: give its tests the import error.
        for error in collect_errors:
            text = f"[inside the VM, collecting {error['nodeid']} failed]\n{error.get('longrepr', '')}"
            for nodeid in self.nodeids:
                if nodeid.startswith(error["nodeid"]) and nodeid not in self.outcomes:
                    self.outcomes[nodeid] = GuestOutcome("failed", text)

    def finish(self) -> None:
        """Remove the results unless something failed; then say where they are."""
        if self.results_dir is None:
            return
        failed = self.error is not None or any(o.kind == "failed" for o in self.outcomes.values())
        if failed:
            _announce(self.config, f"tests/vm: guest console, report and logs kept in {self.results_dir}")
        else:
            shutil.rmtree(self.results_dir, ignore_errors=True)


class VmTestItem(pytest.Item):
    """Stands in on the host for a test that runs inside the VM: same node id, markers and location."""

    def __init__(self, *, guest_location: tuple[str, int | None, str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.guest_location = guest_location

    @classmethod
    def replacing(cls, item: pytest.Item) -> VmTestItem:
        proxy = cls.from_parent(item.parent, name=item.name, guest_location=item.location)
        proxy.own_markers = [mark for mark in item.own_markers if mark.name not in GUEST_ONLY_MARKERS]
        proxy.keywords.update(item.keywords)
        if item.config.pluginmanager.hasplugin("timeout"):
            # The first proxy waits for the kernel build and the whole VM run.
            proxy.add_marker(pytest.mark.timeout(KERNEL_BUILD_TIMEOUT + VM_BACKSTOP + 300))
        return proxy

    def iter_markers_with_node(self, name: str | None = None):  # type: ignore[override]
        for node, mark in super().iter_markers_with_node(name):
            if mark.name not in GUEST_ONLY_MARKERS:  # also drops module- and class-level ones
                yield node, mark

    def runtest(self) -> None:
        vm_run = self.session.stash.setdefault(VM_RUN_KEY, VmRun(self.config))
        outcome = vm_run.outcome(self.session, self.nodeid)
        if outcome.kind == "skipped":
            # Reported at the test's own location, as a skip in the test itself would be.
            raise pytest.skip.Exception(outcome.text, _use_item_location=True)
        if outcome.kind == "xfailed":
            pytest.xfail(outcome.text)
        if outcome.kind == "failed":
            raise GuestTestFailed(outcome.text)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None):  # type: ignore[override]
        if isinstance(excinfo.value, (GuestTestFailed, VmRunError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, self.guest_location[1], self.guest_location[2]


def finish(session: pytest.Session) -> None:
    vm_run = session.stash.get(VM_RUN_KEY, None)
    if vm_run is not None:
        vm_run.finish()
