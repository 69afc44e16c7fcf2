"""Helpers the tests share (not tests): free ports, polling, HTTP gets, the real `watchdog` CLI started
in its own process group and always stopped with its whole group, /metrics parsing, Prometheus.

Fixtures built on them are in ``conftest.py``; no test module imports another.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from collectors.reader import LedgerError, read_ledger
from watchdog.procgroup import kill_group, spawn_cli, stop_group, tail
from watchdog.snapshot import ring_specs

# The CLI in its own process group, and its stop: shared with `watchdog bench soak`.
spawn, stop = spawn_cli, stop_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str, token: str = "", method: str = "GET") -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "watchdog.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def wait_for(fn: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            got = fn()
            if got:
                return got
        time.sleep(0.3)
    raise AssertionError("timed out")


def metric(text: str, name: str, labels: str | None = None) -> float:
    """Sum of the samples of ``name`` (optionally only those whose label set contains ``labels``)."""
    total, found = 0.0, False
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE):
        if labels is None or labels in (m.group(1) or ""):
            total += float(m.group(2))
            found = True
    assert found, f"no {name} sample in /metrics:\n{text}"
    return total


def leftover_rings(ledger_dir: Path) -> list[str]:
    """The deployment's shm rings (named in its engine ledger) that are still in /dev/shm."""
    try:
        specs = ring_specs(read_ledger(ledger_dir / "engine.ledger")) or []
    except (LedgerError, OSError):
        return []
    names = [str(spec["name"]) for _role, spec in specs if isinstance(spec, dict) and spec.get("name")]
    assert names, "the engine ledger names no shm rings"
    return [n for n in names if Path("/dev/shm", n).exists()]


def agent_up(agent: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 60) -> None:
    try:
        wait_for(lambda: agent.poll() is None and get(port, "/healthz")[0] == 200, timeout)
    except AssertionError:
        raise AssertionError(f"the agent did not come up (exit {agent.poll()}):\n{tail(log)}") from None


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        reason = f"{tool} is not on PATH (Debian/Ubuntu: apt-get install prometheus)"
        if os.environ.get("WATCHDOG_CI") == "1":
            pytest.fail(f"WATCHDOG_CI=1 and {reason}")
        pytest.skip(reason)
    return path


def prom_query(prom_port: int, query: str) -> list[dict[str, Any]]:
    url = f"/api/v1/query?query={urllib.parse.quote(query)}"
    status, body = get(prom_port, url)
    assert status == 200, f"{url}: {status} {body}"
    data = json.loads(body)
    assert data["status"] == "success", data
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


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
        kill_group(proc)  # the demo's engine and workers live in this group: none may outlive the test
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def last_json_line(stdout: str) -> dict[str, Any]:
    line = stdout.strip().splitlines()[-1]
    data = json.loads(line)
    assert isinstance(data, dict)
    return data


# A workload whose decode batches hold 16 requests from the first steps: graph-key-divergence (decode
# batches of 15-18) bites there instead of in the tail of the default workload (~50 s later at TP=4).
DIVERGENT_WORKLOAD = ("--concurrency", "16", "--requests", "48")


def demo(
    tmp: Path, *args: str, timeout: float = 200, fallback: bool = False, check: bool = True
) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """`watchdog demo --json`; the core loop (--no-fallback) unless ``fallback``; ``check``: exit 0 or 3."""
    mode = [] if fallback else ["--no-fallback"]
    cp = run_cli(["demo", "--json", "--workdir", str(tmp / "demo"), *mode, *args], timeout)
    if check:
        assert cp.returncode in (0, 3), cp.stderr[-3000:]
    return last_json_line(cp.stdout), cp
