"""``watchdog bench agent``: what the sidecar itself costs while the server is healthy.

A writer process (``python -m watchdog.bench_agent DIR TP RATE``) writes an engine ledger and TP
worker ledgers through ``collectors.recorder``, as a decoding deployment does: per step an engine
step and result, and on every rank a step begin with its graph key and launch, one all-reduce and
the step end, at RATE steps per second. A real ``watchdog agent`` process tails them (and looks
for rings, samples what it samples) on its normal schedule; its CPU time and RSS are measured over
a window, with no incident expected.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from collectors.format import CUDAGraphMode, GraphKey, ProcessKind
from collectors.recorder import Recorder


def writer_main(directory: str, tp: int, rate: float) -> None:
    """Write a healthy TP deployment's ledgers at ``rate`` steps per second until killed."""
    from watchdog.demo.proc import die_with_parent

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
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(tp: int, rate: float, seconds: float, warmup_s: float, say: Callable[[str], None]) -> dict[str, Any]:
    import psutil

    from watchdog.bench import _cpu_s, _engine_step, _http_get, _http_json

    work = Path(tempfile.mkdtemp(prefix="watchdog-bench-agent-"))
    ledgers = work / "ledgers"
    ledgers.mkdir()
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {"tp": tp, "steps_per_s_target": rate, "window_s": seconds}
    try:
        writer_argv = [sys.executable, "-m", "watchdog.bench_agent", str(ledgers), str(tp), str(rate)]
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
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return out


def bench_agent(
    tps: list[int], rate: float, seconds: float, warmup_s: float, say: Callable[[str], None]
) -> dict[str, Any]:
    return {"schema": "watchdog.bench.agent/v1", "runs": [measure(tp, rate, seconds, warmup_s, say) for tp in tps]}


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print("usage: python -m watchdog.bench_agent LEDGER_DIR TP STEPS_PER_S", file=sys.stderr)
        raise SystemExit(2)
    writer_main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
