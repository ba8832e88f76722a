#!/usr/bin/env python3
"""Run `afsd demo` many times in a row while another job keeps making outgoing TCP connections.

    .venv/bin/python scripts/demo-soak.py [--runs 50] [--connections-per-second 300] [--keep-logs DIR]

The README's first command must not fail by chance. The chance that mattered: a launcher picked a free
port, closed it and handed the number to a daemon, and meanwhile any outgoing connection on the machine
could get that port as its ephemeral source port. The load job makes exactly such connections, to a
listener of its own on 127.0.0.1 only, at a bounded rate and concurrency; each connection is closed with
a reset, so none lingers in TIME_WAIT holding a port (the machine's other users keep theirs).

Each run's output goes to DIR/run-NN.log (DIR: a temporary directory, kept if a run failed). At the end a
tally: runs passed and failed, the registry blob downloads the run through the proxy reported, the run
times, and how many connections the load job made. Exit code 0 only if every run passed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"   # struct linger {on, 0 s}: close() sends a reset


def load_job(rate: float, concurrency: int) -> None:
    """Outgoing connections to our own listener on 127.0.0.1, `rate` per second, until killed."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    address = listener.getsockname()
    made = 0

    def accept() -> None:
        while True:
            connection, _ = listener.accept()
            connection.close()

    threading.Thread(target=accept, daemon=True).start()
    slots = threading.BoundedSemaphore(concurrency)

    def connect_once() -> None:
        try:
            with socket.socket() as client:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                client.connect(address)
        except OSError:
            pass
        finally:
            slots.release()

    signal.signal(signal.SIGTERM, lambda *_: (print(f"load: {made} connections", flush=True), os._exit(0)))
    interval, next_at = 1.0 / rate, time.monotonic()
    while True:
        slots.acquire()
        threading.Thread(target=connect_once, daemon=True).start()
        made += 1
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.monotonic()   # behind: do not burst to catch up


def run_demo(log: Path, timeout: float) -> tuple[int, float, str]:
    """One `afsd demo`: its exit code, seconds, and what its run through the proxy said about the registry."""
    started = time.monotonic()
    with open(log, "w") as out:
        try:
            code = subprocess.run([sys.executable, "-m", "afsd", "demo"], stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout, cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            code = 124
    text = log.read_text(errors="replace")
    downloads = next((line.rsplit(":", 1)[1].strip() for line in text.splitlines()
                      if "exit code" in line and "registry blob downloads:" in line), "?")
    return code, time.monotonic() - started, downloads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--connections-per-second", type=float, default=300.0,
                        help="the load job's rate of outgoing connections (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=32, help="the load job's connections at once")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one demo may take")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="write the runs' logs here")
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)   # the load job itself
    args = parser.parse_args()
    if args.load:
        load_job(args.connections_per_second, args.concurrency)
        return 0

    logs = args.keep_logs or Path(tempfile.mkdtemp(prefix="afsd-demo-soak-"))
    logs.mkdir(parents=True, exist_ok=True)
    load = subprocess.Popen([sys.executable, __file__, "--load", "--connections-per-second",
                             str(args.connections_per_second), "--concurrency", str(args.concurrency)],
                            stdout=subprocess.PIPE, text=True)
    results: list[tuple[int, float, str]] = []
    print(f"demo-soak: {args.runs} runs of `afsd demo`, load {args.connections_per_second:g} outgoing "
          f"connections/s to 127.0.0.1; logs in {logs}", flush=True)
    try:
        for number in range(1, args.runs + 1):
            code, seconds, downloads = run_demo(logs / f"run-{number:02d}.log", args.timeout)
            results.append((code, seconds, downloads))
            print(f"run {number:2d}: {'ok  ' if code == 0 else f'FAIL (exit {code})'} {seconds:6.1f} s, "
                  f"registry blob downloads through the proxy: {downloads}", flush=True)
    except KeyboardInterrupt:
        print("demo-soak: interrupted", flush=True)
    finally:
        load.send_signal(signal.SIGTERM)
        load_summary = (load.communicate(timeout=30)[0] or "").strip()

    failed = [n for n, (code, _, _) in enumerate(results, 1) if code != 0]
    times = [seconds for _, seconds, _ in results]
    print(f"demo-soak: {len(results) - len(failed)} of {len(results)} runs passed"
          + (f"; failed: {', '.join(map(str, failed))} (logs kept in {logs})" if failed else ""))
    if times:
        print(f"demo-soak: run time median {statistics.median(times):.1f} s, max {max(times):.1f} s; "
              f"blob downloads through the proxy: {sorted(set(d for _, _, d in results))}; {load_summary}")
    if not failed and not args.keep_logs:
        for path in logs.iterdir():
            path.unlink()
        logs.rmdir()
    return 0 if results and not failed and len(results) == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
