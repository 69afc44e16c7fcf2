"""Run the real `watchdog` CLI in its own process group, always cleaned up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run_cli(args: list[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "watchdog.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        # Give the process group a moment to end by itself (multiprocessing's resource tracker
        # unlinks the queues' semaphores on its way out), then kill whatever is left: the
        # demo's engine and workers live in this group and none may outlive the test.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def last_json(stdout: str) -> dict[str, Any]:
    line = stdout.strip().splitlines()[-1]
    data = json.loads(line)
    assert isinstance(data, dict)
    return data


def demo(
    tmp: Path, *args: str, timeout: float = 200, fallback: bool = False, check: bool = True
) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """`watchdog demo --json`; the core loop (--no-fallback) unless ``fallback``; ``check``: exit 0 or 3."""
    mode = [] if fallback else ["--no-fallback"]
    cp = run_cli(["demo", "--json", "--workdir", str(tmp / "demo"), *mode, *args], timeout)
    if check:
        assert cp.returncode in (0, 3), cp.stderr[-3000:]
    return last_json(cp.stdout), cp
