"""``watchdog bench soak``: a healthy deployment watched for a long time must stay quiet.

A real ``watchdog agent`` process watches a real demo deployment (``watchdog demo --no-watch``) for
``seconds`` of mixed long prefills, decodes and idle gaps: bursts of requests whose prompts range
from a few tokens to three prefill chunks of the engine's 512-token budget and outputs up to 128
tokens, separated by idle gaps (30 s; 20 s for a soak under 5 minutes). An idle gap leaves nothing
open and nothing pending, so no deadline applies to it; it is far longer than any deadline the
detector derives from the step history (floor 1 s, 10 x p99), and a burst after a long gap starts
with the history intact, so the 60 s cold deadline never comes into play either.

Every 3 s: ``/livez`` must answer 200 and ``/v1/incidents`` must be empty. Printed: what was sent
and served, incidents, stalls and divergences counted, the polls, the ledgers the agent tailed, the
agent's CPU share and peak RSS, and the demo's shm rings left behind. Any incident, failed poll,
failed request or leftover ring is a failure (exit 1).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from collectors.reader import LedgerError, read_ledger
from watchdog.errors import WatchdogError
from watchdog.procgroup import spawn_cli, stop_group, tail
from watchdog.snapshot import ring_specs

PER_BURST = 12  # requests per burst
BURST_EST_S = 15.0  # what the burst count is planned with (a burst takes 5-20 s; idle fills the rest)
STARTUP_EST_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=30, trust_env=False)
    except httpx.HTTPError as e:
        return 0, str(e)
    return r.status_code, r.text


def _metric(text: str, name: str) -> float:
    return sum(float(m.group(2)) for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M))


def _mapped_ledgers(pid: int) -> set[str]:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
        return {Path(line.split()[-1]).name for line in f if line.rstrip().endswith(".ledger")}
    return set()


def _leftover_rings(ledger_dir: Path) -> list[str]:
    try:
        specs = ring_specs(read_ledger(ledger_dir / "engine.ledger")) or []
    except (LedgerError, OSError):
        return []
    names = [str(spec["name"]) for _role, spec in specs if isinstance(spec, dict) and spec.get("name")]
    return [n for n in names if Path("/dev/shm", n).exists()]


def bench_soak(
    *, seconds: float, workdir: Path, tp: int = 2, say: Callable[[str], None] = lambda _m: None
) -> dict[str, Any]:
    gap_s = 30.0 if seconds >= 300 else 20.0
    bursts = max(2, math.ceil((seconds - STARTUP_EST_S) / (gap_s + BURST_EST_S)))
    requests = bursts * PER_BURST
    work, ledgers = workdir / "w", workdir / "w" / "ledgers"
    ledgers.mkdir(parents=True)
    port = _free_port()
    agent_log, demo_log, demo_out = workdir / "agent.log", workdir / "demo.log", workdir / "demo.out"
    agent = spawn_cli(
        ["agent", "--ledger-dir", str(ledgers), "--incidents-dir", str(workdir / "inc"), "--port", str(port)],
        agent_log,
    )
    demo: subprocess.Popen[bytes] | None = None
    polls, livez_failed, incidents_seen = 0, 0, []
    mapped: set[str] = set()
    cpu_s, rss_peak = 0.0, 0
    try:
        deadline = time.monotonic() + 60
        while _get(port, "/healthz")[0] != 200:
            if agent.poll() is not None or time.monotonic() > deadline:
                raise WatchdogError(f"the agent did not come up (exit {agent.poll()}): {tail(agent_log)}")
            time.sleep(0.3)
        proc = psutil.Process(agent.pid)
        cpu0 = sum(proc.cpu_times()[:2])
        started = time.monotonic()
        say(f"soak {seconds:.0f} s: {bursts} bursts x {PER_BURST} requests, {gap_s:.0f} s idle gaps")
        with open(demo_out, "wb") as out:
            demo = spawn_cli(
                [
                    "demo", "--no-watch", "--json", "--workdir", str(work), "--tp", str(tp),
                    "--requests", str(requests), "--concurrency", str(PER_BURST),
                    "--input-len", "1500", "--range-ratio", "0.05", "--output-len", "128",
                    "--bursts", str(bursts), "--idle-gap", str(gap_s), "--timeout", str(seconds + 200),
                ],
                demo_log,
                stdout=out,
            )  # fmt: skip
        # Watch until the soak time is up and the demo has finished (if it finishes early, the
        # agent goes on watching the cleanly stopped deployment's ledgers).
        while demo.poll() is None or time.monotonic() - started < seconds:
            if time.monotonic() - started > seconds + 240:
                raise WatchdogError(f"the demo did not finish: {tail(demo_log)}")
            if agent.poll() is not None:
                raise WatchdogError(f"the agent exited with {agent.returncode}: {tail(agent_log)}")
            status, _ = _get(port, "/livez")
            livez_failed += status != 200
            with contextlib.suppress(ValueError):
                for inc in json.loads(_get(port, "/v1/incidents")[1]):
                    if inc not in incidents_seen:
                        incidents_seen.append(inc)
            if demo.poll() is None:
                mapped |= _mapped_ledgers(agent.pid)
            with contextlib.suppress(psutil.Error):
                rss_peak = max(rss_peak, proc.memory_info().rss)
            polls += 1
            time.sleep(3)
        elapsed = time.monotonic() - started
        with contextlib.suppress(psutil.Error):
            cpu_s = sum(proc.cpu_times()[:2]) - cpu0
        metrics = _get(port, "/metrics")[1]
        try:
            result = json.loads(demo_out.read_text().strip().splitlines()[-1])
        except (ValueError, IndexError, OSError):
            raise WatchdogError(f"the demo printed no result (exit {demo.returncode}): {tail(demo_log)}") from None
    finally:
        if demo is not None:
            stop_group(demo)
        stop_group(agent)
    return {
        "seconds": round(elapsed, 1),
        "bursts": bursts,
        "idle_gap_s": gap_s,
        "requests": requests,
        "succeeded": result["requests"]["succeeded"],
        "demo_exit": demo.returncode if demo is not None else None,
        "incidents": [i.get("summary", i) if isinstance(i, dict) else i for i in incidents_seen],
        "stalls_detected": _metric(metrics, "watchdog_stalls_detected_total"),
        "divergences_detected": _metric(metrics, "watchdog_divergences_detected_total"),
        "livez_polls": polls,
        "livez_failed": livez_failed,
        "ledgers_tailed": sorted(mapped),
        "agent_cpu_share": round(cpu_s / elapsed, 4) if elapsed else None,
        "agent_rss_peak_mb": round(rss_peak / 2**20, 1),
        "leftover_rings": _leftover_rings(ledgers),
    }


def failures(r: dict[str, Any], tp: int) -> list[str]:
    """What makes a soak fail, one phrase each (empty: it passed)."""
    out = []
    if r["incidents"]:
        out.append(f"{len(r['incidents'])} incident(s)")
    if r["succeeded"] != r["requests"]:
        out.append(f"{r['succeeded']}/{r['requests']} requests succeeded")
    if r["stalls_detected"] or r["divergences_detected"]:
        out.append(f"{r['stalls_detected']:.0f} stall(s), {r['divergences_detected']:.0f} divergence(s) counted")
    if r["livez_failed"]:
        out.append(f"{r['livez_failed']} /livez poll(s) not 200")
    want = {"engine.ledger", *(f"rank{i:03d}.ledger" for i in range(tp))}
    if not want <= set(r["ledgers_tailed"]):
        out.append(f"the agent tailed only {r['ledgers_tailed']}")
    if r["leftover_rings"]:
        out.append(f"shm rings left behind: {r['leftover_rings']}")
    if r["demo_exit"] != 0:
        out.append(f"demo exit {r['demo_exit']}")
    return out
