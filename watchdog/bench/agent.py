"""``watchdog bench agent``: what the sidecar itself costs while the server is healthy.

A writer process (``python -m watchdog.bench.agent DIR TP RATE``) writes an engine ledger and TP
worker ledgers through ``collectors.recorder``, as a decoding deployment does: per step an engine
step and result, and on every rank a step begin with its graph key and launch, one all-reduce and
the step end, at RATE steps per second. A real ``watchdog agent`` process tails them (and looks
for rings, samples what it samples) on its normal schedule; its CPU time and RSS are measured over
a window, with no incident expected.

``agent_cpu_share`` (``watchdog bench detect --cpu-seconds``) measures the same beside a real,
healthy demo deployment (``watchdog demo --no-watch``) instead of a synthetic writer.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from collectors.format import CUDAGraphMode, EngineStep, GraphKey, ProcessKind
from collectors.reader import LedgerError, read_ledger
from collectors.recorder import Recorder
from watchdog.procgroup import kill_group, spawn_cli, stop_group, tail
from watchdog.supervisor.proc import die_with_parent


def writer_main(directory: str, tp: int, rate: float) -> None:
    """Write a healthy TP deployment's ledgers at ``rate`` steps per second until killed."""
    die_with_parent()
    engine = Recorder(directory, kind=ProcessKind.ENGINE, rank=0, world_size=tp)
    ranks = [Recorder(directory, kind=ProcessKind.WORKER, rank=r, world_size=tp) for r in range(tp)]
    engine.config(role="engine", tp=tp, writer="bench_agent")
    for r, rec in enumerate(ranks):
        rec.config(role="worker", tp_rank=r, writer="bench_agent")
    key = GraphKey(CUDAGraphMode.FULL, num_tokens=32, num_reqs=16, uniform=True)
    period = 1.0 / rate
    start = time.monotonic()
    step = 0
    while True:
        engine.engine_step(
            step, total_tokens=30, num_reqs=15, num_decode_reqs=15, placeholders=15,
            max_query_len=2, min_query_len=2, running=15, waiting=0,
        )  # fmt: skip
        for rec in ranks:
            rec.step_begin(step, key, unpadded_tokens=30, unpadded_reqs=15, padded_reqs=1, launch_manifest=0x5EED)
            rec.collective(step, "tp", "all_reduce", "bfloat16", 32 * 4096)
            rec.step_end(step)
        engine.engine_result(step, ok=True, running=15, waiting=0, finished=step)
        step += 1
        delay = start + step * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_get(port: int, path: str) -> httpx.Response:
    """GET a local agent's endpoint (raises on a non-2xx answer)."""
    resp = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5, verify=False, trust_env=False)
    resp.raise_for_status()
    return resp


def _http_json(port: int, path: str) -> Any:
    return _http_get(port, path).json()


def _engine_step(ledger: Path) -> tuple[int, int] | None:
    """(highest engine step in the ledger, its monotonic ns), or None before the first step."""
    try:
        steps = [r for r in read_ledger(ledger).records if isinstance(r, EngineStep)]
    except (LedgerError, OSError):
        return None
    if not steps:
        return None
    last = max(steps, key=lambda r: r.step)
    return last.step, last.mono_ns


def _cpu_s(proc: Any) -> float:
    """User+system CPU seconds of ``proc``, its reaped children and its live descendants."""
    t = proc.cpu_times()
    total = float(t.user + t.system + t.children_user + t.children_system)
    for child in proc.children(recursive=True):
        try:
            c = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += float(c.user + c.system)
    return total


def agent_cpu_share(tp: int, cpu_seconds: float, say: Callable[[str], None]) -> dict[str, Any]:
    """A real agent process beside a healthy demo deployment: its CPU share of one core."""
    workdir = Path(tempfile.mkdtemp(prefix="watchdog-bench-cpu-"))
    ledger_dir = workdir / "ledgers"
    ledger_dir.mkdir()
    port = _free_port()

    out: dict[str, Any] = {"cpu_tp": tp, "cpu_window_s": cpu_seconds}
    agent = spawn_cli(
        ["agent", "--ledger-dir", str(ledger_dir), "--incidents-dir", str(workdir / "incidents"), "--port", str(port)],
        workdir / "agent.log",
    )
    demo = None
    try:
        demo = spawn_cli(
            ["demo", "--no-watch", "--tp", str(tp), "--requests", "1000000", "--workdir", str(workdir),
             "--timeout", str(int(cpu_seconds + 600))],
            workdir / "demo.log",
        )  # fmt: skip
        say(f"agent CPU: TP={tp} healthy deployment in {workdir}, agent on port {port}")
        engine_ledger = ledger_dir / "engine.ledger"
        deadline = time.monotonic() + 300
        first: tuple[int, int] | None = None
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError("the healthy demo deployment did not start stepping within 300 s")
            if demo.poll() is not None:
                raise RuntimeError(f"the healthy demo deployment exited early (code {demo.returncode})")
            cur = _engine_step(engine_ledger)
            if cur is not None and first is not None and cur[0] > first[0]:
                break
            first = first or cur
            time.sleep(0.5)
        time.sleep(5.0)  # past the prefills: full-speed decode
        if agent.poll() is not None:
            raise RuntimeError(f"the agent exited (code {agent.returncode}): {tail(workdir / 'agent.log', 800)}")
        ap = psutil.Process(agent.pid)
        s0, c0, w0 = _engine_step(engine_ledger), _cpu_s(ap), time.monotonic()
        say(f"agent CPU: sampling for {cpu_seconds:.0f} s")
        time.sleep(cpu_seconds)
        s1, c1, w1 = _engine_step(engine_ledger), _cpu_s(ap), time.monotonic()
        out["agent_cpu_s"] = round(c1 - c0, 3)
        out["agent_cpu_share_of_one_core_pct"] = round(100.0 * (c1 - c0) / (w1 - w0), 2)
        if s0 is not None and s1 is not None and s1[1] > s0[1]:
            out["deployment_steps"] = s1[0] - s0[0]
            out["deployment_steps_per_s"] = round((s1[0] - s0[0]) / ((s1[1] - s0[1]) / 1e9), 2)
        incidents = _http_json(port, "/v1/incidents")
        out["agent_incidents"] = len(incidents) if isinstance(incidents, list) else incidents
        out["agent_zero_incidents"] = incidents == []
        out["deployment_alive_at_end"] = demo.poll() is None
        out["agent_alive_at_end"] = agent.poll() is None
        say(
            f"agent CPU: {out['agent_cpu_share_of_one_core_pct']}% of one core, "
            f"{out.get('deployment_steps_per_s')} steps/s, incidents {out['agent_incidents']}"
        )
    except Exception as exc:  # reported as a figure
        out["error"] = f"{type(exc).__name__}: {exc}"
        if agent.poll() is not None:
            out["agent_exit"] = {"code": agent.returncode, "log_tail": tail(workdir / "agent.log", 800)}
        say(f"agent CPU: {out['error']}")
    finally:
        if demo is not None:
            stop_group(demo)
        kill_group(agent, grace_s=0.0)
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def measure(tp: int, rate: float, seconds: float, warmup_s: float, say: Callable[[str], None]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="watchdog-bench-agent-"))
    ledgers = work / "ledgers"
    ledgers.mkdir()
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {"tp": tp, "steps_per_s_target": rate, "window_s": seconds}
    try:
        writer_argv = [sys.executable, "-m", "watchdog.bench.agent", str(ledgers), str(tp), str(rate)]
        agent_argv = [sys.executable, "-m", "watchdog.cli", "agent", "--ledger-dir", str(ledgers), "--incidents-dir",
                      str(work / "incidents"), "--port", str(port), "--log-level", "warning"]  # fmt: skip
        procs.append(subprocess.Popen(writer_argv, stdin=subprocess.DEVNULL, start_new_session=True))
        with open(work / "agent.log", "wb") as log:
            procs.append(
                subprocess.Popen(agent_argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
            )
        writer, agent = procs
        say(f"bench agent: TP={tp}, {rate:g} steps/s, warming up {warmup_s:g} s")
        time.sleep(warmup_s)
        for p, what in ((writer, "writer"), (agent, "agent")):
            if p.poll() is not None:
                raise RuntimeError(f"the {what} exited early (code {p.returncode})")
        ap = psutil.Process(agent.pid)
        s0, c0, w0 = _engine_step(ledgers / "engine.ledger"), _cpu_s(ap), time.monotonic()
        rss: list[int] = []
        while time.monotonic() < w0 + seconds:
            rss.append(ap.memory_info().rss)
            time.sleep(min(1.0, seconds / 10))
        s1, c1, w1 = _engine_step(ledgers / "engine.ledger"), _cpu_s(ap), time.monotonic()
        out["agent_cpu_share_of_one_core_pct"] = round(100.0 * (c1 - c0) / (w1 - w0), 2)
        out["agent_rss_mib"] = round(rss[-1] / 2**20, 1)
        out["agent_rss_max_mib"] = round(max(rss) / 2**20, 1)
        if s0 is not None and s1 is not None:
            out["steps_per_s_written"] = round((s1[0] - s0[0]) / ((s1[1] - s0[1]) / 1e9), 1)
        out["incidents"] = len(_http_json(port, "/v1/incidents"))
        metrics = _http_get(port, "/metrics").text
        out["ranks_seen"] = sum(line.startswith("watchdog_rank_last_step{") for line in metrics.splitlines())
        say(
            f"bench agent: TP={tp}: {out['agent_cpu_share_of_one_core_pct']} % of one core, "
            f"RSS {out['agent_rss_mib']} MiB, {out.get('steps_per_s_written')} steps/s written"
        )
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)
    return out


def bench_agent(
    tps: list[int], rate: float, seconds: float, warmup_s: float, say: Callable[[str], None]
) -> dict[str, Any]:
    return {"schema": "watchdog.bench.agent/v1", "runs": [measure(tp, rate, seconds, warmup_s, say) for tp in tps]}


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print("usage: python -m watchdog.bench.agent LEDGER_DIR TP STEPS_PER_S", file=sys.stderr)
        raise SystemExit(2)
    writer_main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
