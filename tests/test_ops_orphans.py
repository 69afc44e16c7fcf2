"""No orphans: SIGKILL `watchdog demo` or `watchdog run` (over the demo server) during start-up,
while serving, or while it gathers evidence of a hang, and nothing of theirs survives: no process
(engine, workers, the server, multiprocessing's resource tracker) and no shm segment they mapped.

Each run carries a unique marker in its environment, which every descendant inherits: survivors
are found by it, whoever their parent is by then."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from watchdog.demo.client import Workload
from watchdog.demo.fallback import FaultBroker, free_port
from watchdog.demo.faults import FaultPlan
from watchdog.demo.httpclient import start_http_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MARK = "WATCHDOG_TEST_ORPHAN_MARK"


def marked(mark: str) -> list[int]:
    """Pids of the live (non-zombie) processes whose environment carries ``mark``."""
    needle = f"{MARK}={mark}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(int(entry))
    return out


def shm_files(pids: list[int]) -> set[str]:
    """The /dev/shm files (rings, queue semaphores) these processes map now."""
    names: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    names.add(line.split("/dev/shm/", 1)[1].split()[0])
    return names


def wait(cond: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def kill_and_check(proc: subprocess.Popen[bytes], mark: str) -> None:
    procs = marked(mark)
    shm = shm_files(procs)
    proc.kill()
    proc.wait()
    try:
        # PDEATHSIG is immediate; the resource tracker unlinks what it tracked once the last of its
        # users is gone. Generous bound for a loaded 2-core machine, far below "7+ minutes".
        wait(lambda: not marked(mark), 20, "the tree to die")
        wait(lambda: not any(Path("/dev/shm", n).exists() for n in shm), 20, "their shm files to go")
    finally:
        for pid in marked(mark):  # clean up after a failure: nothing outlives the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert len(procs) >= 1


def spawn(argv: list[str], mark: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen(
            argv, env={**os.environ, MARK: mark}, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )


def workers_up(work: Path) -> bool:
    return len(list((work / "ledgers").glob("rank*.ledger"))) >= 2


@pytest.mark.parametrize("moment", ["start-up", "serving", "gathering"])
def test_sigkill_of_watchdog_demo_leaves_nothing(tmp_path: Path, moment: str) -> None:
    mark = uuid.uuid4().hex
    work, log = tmp_path / "w", tmp_path / "demo.log"
    fault = "host-hang" if moment == "gathering" else "none"
    argv = [sys.executable, "-m", "watchdog.cli", "demo", "--no-fallback", "--tp", "2", "--fault", fault,
            "--fault-rank", "0", "--requests", "100000", "--workdir", str(work), "--timeout", "250"]  # fmt: skip
    proc = spawn(argv, mark, log)
    try:
        if moment == "start-up":
            # the demo, the resource tracker, the engine and both workers, which are importing torch
            wait(lambda: len(marked(mark)) >= 5, 60, "the workers to start")
        elif moment == "serving":
            wait(lambda: "bench client:" in log.read_text(), 200, "the demo to serve")
        else:
            wait(lambda: "gathering" in log.read_text(), 200, "the stall to be declared")
        kill_and_check(proc, mark)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("moment", ["start-up", "serving", "gathering"])
def test_sigkill_of_watchdog_run_leaves_nothing(tmp_path: Path, moment: str) -> None:
    mark = uuid.uuid4().hex
    work, log = tmp_path / "w", tmp_path / "run.log"
    work.mkdir()
    fault = "host-hang" if moment == "gathering" else "none"
    broker = FaultBroker(tmp_path / "fault.sock", FaultPlan(fault, 1))
    upstream = free_port()
    argv = [sys.executable, "-m", "watchdog.cli", "run", "--ledger-dir", str(work / "ledgers"), "--incidents-dir",
            str(tmp_path / "inc"), "--port", str(free_port()), "--upstream", f"http://127.0.0.1:{upstream}", "--",
            sys.executable, "-m", "watchdog.demo.server", "--tp", "2", "--port", str(upstream), "--workdir",
            str(work), "--fault-from", str(broker.path)]  # fmt: skip
    proc = spawn(argv, mark, log)
    stop = threading.Event()
    try:
        if moment == "start-up":
            # watchdog run, the server, its resource tracker, the engine and both workers (importing torch)
            wait(lambda: len(marked(mark)) >= 6, 90, "the server's workers to start")
        else:
            wait(lambda: workers_up(work) and "ready on" in log.read_text(), 200, "the server to serve")
            start_http_client(Workload(4000, 16, 48, 48), f"http://127.0.0.1:{upstream}", stop, 200)
            if moment == "serving":
                time.sleep(3)
            else:
                wait(lambda: "stall declared" in log.read_text(), 200, "the stall to be declared")
        kill_and_check(proc, mark)
    finally:
        stop.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        broker.close()


# A server like real vLLM at its worst: a worker that ignores SIGTERM and whose parent is gone
# (double fork), and a server that ignores SIGTERM too (or exits and leaves the worker behind).
STUBBORN = """
import os, signal, sys, time
if os.fork() == 0:
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    os._exit(0)
os.wait()
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("up", flush=True)
if sys.argv[1] == "exit":
    time.sleep(2)
    os._exit(7)
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("end", ["stopped", "exit"])
def test_watchdog_run_leaves_no_orphan_that_ignores_sigterm(tmp_path: Path, end: str) -> None:
    mark = uuid.uuid4().hex
    log = tmp_path / "run.log"
    argv = [sys.executable, "-m", "watchdog.cli", "run", "--ledger-dir", str(tmp_path / "l"), "--incidents-dir",
            str(tmp_path / "i"), "--port", str(free_port()), "--stop-grace-s", "1", "--log-format", "json", "--",
            sys.executable, "-c", STUBBORN, end]  # fmt: skip
    proc = spawn(argv, mark, log)
    try:
        wait(lambda: len(marked(mark)) >= 3, 30, "the server and its orphaned worker")
        if end == "stopped":
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == (0 if end == "stopped" else 7), log.read_text()
        wait(lambda: not marked(mark), 10, "the orphan to be gone")
        events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        kinds = [e["event"] for e in events]
        assert kinds[0] == "generation" and events[0]["generation"] == 1, kinds
        if end == "exit":
            assert any(e["event"] == "exited" and e["exit_code"] == 7 for e in events), kinds
        else:
            assert "signal" in kinds, kinds
    finally:
        for pid in marked(mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
