"""``watchdog bench recorder`` and ``watchdog bench detect``: figures (medians, maxima, ratios).

``watchdog bench recorder``: what the ledger costs.

1. ns per record: the recorder's hot path (step_begin, launch, step_end; a whole step's
   records), median of ``repeats`` timing runs.
2. Demo engine steps/s with the ledgers on vs off, in ONE deployment: the ledgers are switched
   on and off in alternating blocks (on, off, on, off, ...) under a steady decode load, so both
   sides see the same machine noise; the ratio of the medians is reported.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collectors.format import CollectiveOp, CUDAGraphMode, GraphKey, ProcessKind, Role
from collectors.recorder import Recorder

if TYPE_CHECKING:
    import httpx


def _time_ns_per_call(fn: Callable[[], None], n: int, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(runs)


def recorder_ns(records: int, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="watchdog-bench-") as d:
        rec = Recorder(d, kind=ProcessKind.WORKER, rank=0, world_size=1)
        key = GraphKey(CUDAGraphMode.FULL, 32, 16, uniform=True)
        dkey = GraphKey(CUDAGraphMode.PIECEWISE, 32)
        op = CollectiveOp("all_reduce", "tp", "bfloat16", 4096)
        h, hd = rec.manifest(Role.MODEL, key, [op]), rec.manifest(Role.DRAFTER, dkey, [op])

        def begin() -> None:
            rec.step_begin(7, key, unpadded_tokens=30, unpadded_reqs=15, padded_reqs=1, placeholders=15)

        def launch() -> None:
            rec.launch(7, Role.MODEL, key, h)

        def end() -> None:
            rec.step_end(7)

        def step() -> None:  # a decode step as the plugin and the demo workers write it: one STEP record
            rec.step_begin(
                8, key, unpadded_tokens=30, unpadded_reqs=15, padded_reqs=1, placeholders=15, launch_manifest=h
            )
            rec.launch(8, Role.DRAFTER, dkey, hd)  # stored into the STEP record
            rec.step_end(8)  # so is the end

        out = {
            "step_begin_ns_median": _time_ns_per_call(begin, records, repeats),
            "launch_ns_median": _time_ns_per_call(launch, records, repeats),
            "step_end_ns_median": _time_ns_per_call(end, records, repeats),
            "collective_ns_median": _time_ns_per_call(
                lambda: rec.collective(7, "tp", "all_reduce", "bfloat16", 4096), records, repeats
            ),
            "step_ns_median": _time_ns_per_call(step, records // 3, repeats),
        }
        rec.close()
        return {k: round(v, 1) for k, v in out.items()}


def demo_on_off(
    tp: int, blocks: int, block_s: float, say: Callable[[str], None], device: str = "cpu"
) -> dict[str, Any]:
    """Decode steps/s with the ledgers on vs off, alternating blocks in ONE deployment (CPU or CUDA)."""
    from watchdog.demo.engine import EngineArgs
    from watchdog.demo.faults import FaultPlan
    from watchdog.demo.proc import spawn_args, spawn_entry
    from watchdog.demo.run import kill_tree
    from watchdog.keys import DispatchConfig, default_capture_sizes
    from watchdog.supervisor.tree import unlink_rings

    workdir = Path(tempfile.mkdtemp(prefix="watchdog-bench-"))
    ledger_dir = workdir / "ledgers"
    cfg = DispatchConfig("FULL_AND_PIECEWISE", default_capture_sizes(64, 2), 2)
    args = EngineArgs(
        tp=tp, workdir=str(workdir), ledger_dir=str(ledger_dir), dispatch=cfg, max_num_seqs=32, device=device
    )
    ctx = mp.get_context("spawn")
    requests: mp.Queue[Any] = ctx.Queue()
    results: mp.Queue[Any] = ctx.Queue()
    ready_rx, ready_tx = ctx.Pipe(duplex=False)
    engine = ctx.Process(
        target=spawn_entry,
        args=spawn_args("watchdog.demo.engine:engine_main", (args, FaultPlan()), (requests, results, None, ready_tx)),
    )
    engine.start()
    try:
        if not ready_rx.poll(240) or "error" in ready_rx.recv():
            raise RuntimeError("demo engine did not start")
        for rid in range(16):  # steady decode: 16 requests that never finish during the bench
            requests.put((rid, 16, 10**9))
        time.sleep(1.0 if device == "cpu" else 2.0)  # past the prefills

        def toggle(on: bool) -> tuple[int, int]:
            requests.put(("control", {"ledger": on}))
            while True:
                item = results.get(timeout=60)
                if item[0] == "control":
                    return int(item[1]), int(item[2])

        rates: dict[bool, list[float]] = {True: [], False: []}
        on = True
        prev = toggle(on)
        for _ in range(2 * blocks):
            time.sleep(block_s)
            on_now = not on
            cur = toggle(on_now)
            rates[on].append((cur[0] - prev[0]) / ((cur[1] - prev[1]) / 1e9))
            on, prev = on_now, cur
        say(f"steps/s ledger on {rates[True]} off {rates[False]}")
        on_m, off_m = statistics.median(rates[True]), statistics.median(rates[False])
        return {
            "demo_tp": tp,
            "demo_device": device,
            "demo_blocks_each": blocks,
            "demo_block_s": block_s,
            "demo_steps_per_s_on": [round(r, 1) for r in rates[True]],
            "demo_steps_per_s_off": [round(r, 1) for r in rates[False]],
            "demo_steps_per_s_ledger_on_median": round(on_m, 2),
            "demo_steps_per_s_ledger_off_median": round(off_m, 2),
            "demo_on_off_ratio": round(on_m / off_m, 4),
        }
    finally:
        kill_tree(engine)
        unlink_rings(ledger_dir)
        while True:
            try:
                results.get_nowait()
            except (queue.Empty, OSError):
                break


def bench_recorder(*, records: int, repeats: int, tp: int, steps: int, say: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"schema": "watchdog.bench.recorder/v1", **recorder_ns(records, repeats)}
    if tp > 0:
        # about 100 steps/s on the 2-core CI machine at TP=2: ``steps`` per block sets its length
        out.update(demo_on_off(tp, blocks=3, block_s=max(0.5, steps / 100), say=say))
    return out


DETECT_SCHEMA = "watchdog.bench.detect/v1"

# The catalogue's expected verdict per fault class (README, "The 60-second demo").
EXPECTED_VERDICTS: dict[str, str] = {
    "graph-key-divergence": "collective_mismatch",
    "padded-slot-kernel-hang": "device_hang",
    "rank-skips-collective": "collective_mismatch",
    "host-hang": "host_hang",
    "worker-killed": "worker_dead",
    "engine-stall": "engine_stall",
}

DETECT_TARGETS: dict[str, Any] = {
    "stall_declared_within": "max(1 s, 10 x recent p99 step time of the stuck step's kind) after the step hangs; "
    "stall_deadline_s is the deadline the detector applied (stall_on_time compares with it), target_s the bound "
    "recomputed from the bundle's ledgers (stall_within_target; absent when the kind had < 3 finished steps "
    "or no step was open, e.g. engine-stall)",
    "stall_floor_s": 1.0,
    # ranks out of step are reported as their steps complete, before any stall: from the bite
    "divergence_within_s_of_bite": 1.0,
    "stall_multiplier": 10.0,
    # the watcher polls every 50 ms and then reads the ledgers: a declaration this late past the
    # deadline still counts as on time
    "stall_poll_tolerance_s": 0.25,
    "diagnosis_within_s_of_stall": 3.0,
    "diagnosis_target_tp": 8,
}

DEMO_RUN_TIMEOUT_S = 180.0


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def _stall_of(bundle: str) -> dict[str, Any] | None:
    import json

    try:
        stall = json.loads((Path(bundle) / "evidence.json").read_text()).get("stall")
    except (OSError, ValueError):
        return None
    return stall if isinstance(stall, dict) else None


def _kind_target(bundle: str, stall_step: int | None) -> dict[str, Any]:
    """The target computed from the bundle's rank ledgers, independently of the detector's own
    bookkeeping: max(floor, 10 x p99) of the completed steps of the stuck step's kind (graph mode,
    uniform, token bucket) that finished before it hung; None when that kind has fewer than 3."""
    from collectors.format import StepBegin, StepEnd
    from collectors.reader import LedgerError, read_ledger
    from watchdog.detector import DetectorConfig, Kind, kind_of, p99

    cfg = DetectorConfig()
    durations: dict[Kind, list[tuple[int, float]]] = {}  # kind -> (end ns, seconds)
    stuck: Kind | None = None
    for path in sorted((Path(bundle) / "ledgers").glob("rank*.ledger")):
        try:
            records = read_ledger(path).records
        except (LedgerError, OSError):
            continue
        begun: StepBegin | None = None
        for r in records:
            if isinstance(r, StepBegin):
                begun = r
                if r.step == stall_step:
                    stuck = kind_of(r.key)
            elif isinstance(r, StepEnd) and begun is not None and begun.step == r.step:
                durations.setdefault(kind_of(begun.key), []).append((r.mono_ns, (r.mono_ns - begun.mono_ns) / 1e9))
                begun = None
    if stuck is None:
        return {"target_kind": None, "target_samples": 0, "target_s": None}
    recent = deque(s for _, s in sorted(durations.get(stuck, []))[-cfg.history :])
    enough = len(recent) >= cfg.min_samples
    return {
        "target_kind": f"{stuck[0]}/{'uniform' if stuck[1] else 'mixed'}/<={stuck[2]} tokens",
        "target_samples": len(recent),
        "target_p99_step_s": round(p99(recent), 4) if recent else None,
        "target_s": round(max(cfg.floor_s, cfg.multiplier * p99(recent)), 3) if enough else None,
    }


def _detect_run(tp: int, fault: str, seed: int, requests: int, native: bool, fault_rank: int = 1) -> dict[str, Any]:
    """One injection; never raises: an error becomes a string in the record."""
    from watchdog.demo.run import DemoOptions, run_demo

    rec: dict[str, Any] = {"seed": seed, "fault_rank": fault_rank}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="watchdog-bench-detect-", ignore_cleanup_errors=True) as d:
        try:
            opts = DemoOptions(
                tp=tp,
                requests=requests,
                fault=fault,
                fault_rank=fault_rank,
                seed=seed,
                workdir=d,
                timeout_s=DEMO_RUN_TIMEOUT_S,
                native_stacks=native,
            )
            res = run_demo(opts)
        except Exception as exc:  # a failed run is a figure, not a crash of the bench
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["elapsed_s"] = round(time.monotonic() - t0, 3)
            return rec
        rec["elapsed_s"] = res.get("elapsed_s")
        rec["requests_succeeded"] = res["requests"]["succeeded"]
        if not res["incidents"]:
            rec["incident"] = False
            # every request served: the workload never ran into the defect; otherwise the run hung
            # (or ended early, or was still crawling at the timeout) and the watchdog said nothing
            rec["miss_kind"] = "fault_never_bit" if rec["requests_succeeded"] == requests else "undetected"
            rec["hit_timeout"] = float(res.get("elapsed_s") or 0.0) >= DEMO_RUN_TIMEOUT_S
            return rec
        inc = res["incidents"][0]
        diag = inc["diagnosis"]
        expected = EXPECTED_VERDICTS.get(fault)
        detected, diagnosed = float(inc["detected_after_s"]), float(inc["diagnosed_after_s"])
        rec.update(
            incident=True,
            verdict=diag["verdict"],
            matched=diag["verdict"] == expected,
            culprit_ranks=diag["culprit_ranks"],
            no_stall_yet=bool(diag.get("no_stall_yet")),
            fault_to_stall_s=detected,
            stall_to_diagnosis_s=round(diagnosed - detected, 3),
            fault_to_diagnosis_s=diagnosed,
        )
        stall = _stall_of(inc["bundle"])
        if stall is not None:
            deadline = float(stall["deadline_s"])
            rec.update(
                stall_kind=stall.get("kind"),
                stall_step=stall.get("step"),
                stall_age_s=round(float(stall["age_s"]), 3),
                stall_deadline_s=round(deadline, 3),
                stall_on_time=detected <= deadline + DETECT_TARGETS["stall_poll_tolerance_s"],
            )
            tgt = _kind_target(inc["bundle"], stall.get("step"))
            rec.update(tgt)
            if tgt["target_s"] is not None:
                rec["stall_within_target"] = detected <= tgt["target_s"] + DETECT_TARGETS["stall_poll_tolerance_s"]
    return rec


def _summarise(tp: int, fault: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    hits = [r for r in runs if r.get("incident")]
    verdicts: dict[str, int] = {}
    for r in hits:
        verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
    stall_to_diag = [r["stall_to_diagnosis_s"] for r in hits]
    out: dict[str, Any] = {
        "tp": tp,
        "fault": fault,
        "expected_verdict": EXPECTED_VERDICTS.get(fault),
        "n": len(runs),
        "incidents": len(hits),
        "misses": sum(1 for r in runs if "error" not in r and not r.get("incident")),
        "misses_fault_never_bit": sum(1 for r in runs if r.get("miss_kind") == "fault_never_bit"),
        "misses_undetected": sum(1 for r in runs if r.get("miss_kind") == "undetected"),
        "errors": [r["error"] for r in runs if "error" in r],
        "verdicts": verdicts,
        "verdicts_matched": sum(1 for r in hits if r["matched"]),
        "all_matched": bool(hits) and len(hits) == len(runs) and all(r["matched"] for r in hits),
        "fault_to_stall_s": _stats([r["fault_to_stall_s"] for r in hits]),
        "stall_to_diagnosis_s": _stats(stall_to_diag),
        "fault_to_diagnosis_s": _stats([r["fault_to_diagnosis_s"] for r in hits]),
        "stall_deadline_s": _stats([r["stall_deadline_s"] for r in hits if "stall_deadline_s" in r]),
        "stall_on_time": sum(1 for r in hits if r.get("stall_on_time")),
        "stall_within_target": sum(1 for r in hits if r.get("stall_within_target")),
        "stall_target_not_applicable": sum(1 for r in hits if "stall_within_target" not in r),
        "diagnosis_within_target": sum(1 for s in stall_to_diag if s <= DETECT_TARGETS["diagnosis_within_s_of_stall"]),
        "divergences_no_stall_yet": sum(1 for r in hits if r.get("no_stall_yet")),
        "divergences_within_target": sum(
            1
            for r in hits
            if r.get("no_stall_yet") and r["fault_to_stall_s"] <= DETECT_TARGETS["divergence_within_s_of_bite"]
        ),
        "runs": runs,
    }
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_json(port: int, path: str) -> Any:
    return _http_get(port, path).json()


def _http_get(port: int, path: str) -> httpx.Response:
    """GET a local agent's endpoint (raises on a non-2xx answer)."""
    import httpx

    resp = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5, verify=False, trust_env=False)
    resp.raise_for_status()
    return resp


def _engine_step(ledger: Path) -> tuple[int, int] | None:
    """(highest engine step in the ledger, its monotonic ns), or None before the first step."""
    from collectors.format import EngineStep
    from collectors.reader import LedgerError, read_ledger

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
    import psutil

    t = proc.cpu_times()
    total = float(t.user + t.system + t.children_user + t.children_system)
    for child in proc.children(recursive=True):
        try:
            c = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += float(c.user + c.system)
    return total


def _stop_group(p: Any, sigint_first: bool) -> None:
    import contextlib
    import os
    import signal
    import subprocess

    if sigint_first:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def agent_cpu_share(tp: int, cpu_seconds: float, say: Callable[[str], None]) -> dict[str, Any]:
    """A real agent process beside a healthy demo deployment: its CPU share of one core."""
    import shutil
    import subprocess
    import sys

    import psutil

    workdir = Path(tempfile.mkdtemp(prefix="watchdog-bench-cpu-"))
    ledger_dir = workdir / "ledgers"
    ledger_dir.mkdir()
    port = _free_port()

    def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as f:
            return subprocess.Popen(
                [sys.executable, "-m", "watchdog.cli", *args],
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def tail(log: Path) -> str:
        try:
            return log.read_text(errors="replace")[-800:]
        except OSError:
            return ""

    out: dict[str, Any] = {"cpu_tp": tp, "cpu_window_s": cpu_seconds}
    agent = start(
        ["agent", "--ledger-dir", str(ledger_dir), "--incidents-dir", str(workdir / "incidents"), "--port", str(port)],
        workdir / "agent.log",
    )
    demo = None
    try:
        demo = start(
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
            raise RuntimeError(f"the agent exited (code {agent.returncode}): {tail(workdir / 'agent.log')}")
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
            out["agent_exit"] = {"code": agent.returncode, "log_tail": tail(workdir / "agent.log")}
        say(f"agent CPU: {out['error']}")
    finally:
        if demo is not None:
            _stop_group(demo, sigint_first=True)
        _stop_group(agent, sigint_first=False)
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def bench_detect(
    *,
    tps: list[int],
    faults: list[str] | None,
    repeats: int,
    requests: int,
    cpu_seconds: float,
    say: Callable[[str], None],
    fault_rank: int | None = None,
) -> dict[str, Any]:
    """``fault_rank``: the culprit of rank faults (None: rank 1, the demo's default; capped at the last rank)."""
    import os

    from watchdog.demo.faults import FAULTS

    chosen = [f for f in FAULTS if f != "none"] if not faults else list(faults)
    unknown = [f for f in chosen if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    native = True
    out: dict[str, Any] = {
        "schema": DETECT_SCHEMA,
        "tps": list(tps),
        "faults": chosen,
        "repeats": repeats,
        "requests": requests,
        "native_stacks": native,
        "demo_run_timeout_s": DEMO_RUN_TIMEOUT_S,
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "targets": DETECT_TARGETS,
        "latency": [],
    }
    started = time.monotonic()
    for tp in tps:
        for fault in chosen:
            runs = []
            for seed in range(repeats):
                culprit = min(1 if fault_rank is None else fault_rank, tp - 1)
                say(f"detect: TP={tp} fault={fault} rank={culprit} seed={seed} ...")
                rec = _detect_run(tp, fault, seed, requests, native, culprit)
                runs.append(rec)
                if "error" in rec:
                    say(f"detect: TP={tp} {fault} seed={seed}: error {rec['error']}")
                elif not rec.get("incident"):
                    say(f"detect: TP={tp} {fault} seed={seed}: MISS (no incident) after {rec.get('elapsed_s')} s")
                else:
                    say(
                        f"detect: TP={tp} {fault} seed={seed}: {rec['verdict']}"
                        f"{'' if rec['matched'] else ' (MISMATCH)'} fault->stall {rec['fault_to_stall_s']:.2f} s "
                        f"(deadline {rec.get('stall_deadline_s')}) stall->diag {rec['stall_to_diagnosis_s']:.2f} s"
                    )
            out["latency"].append(_summarise(tp, fault, runs))
    out["latency_elapsed_s"] = round(time.monotonic() - started, 1)
    tp8 = [s for s in out["latency"] if s["tp"] == DETECT_TARGETS["diagnosis_target_tp"]]
    if tp8:
        diag = [r["stall_to_diagnosis_s"] for s in tp8 for r in s["runs"] if r.get("incident")]
        out["tp8_diagnosis_within_3s"] = f"{sum(1 for d in diag if d <= 3.0)}/{len(diag)}"
    all_hits = [r for s in out["latency"] for r in s["runs"] if r.get("incident")]
    out["stall_on_time"] = f"{sum(1 for r in all_hits if r.get('stall_on_time'))}/{len(all_hits)}"
    judged = [r for r in all_hits if "stall_within_target" in r]
    out["stall_within_target"] = f"{sum(1 for r in judged if r['stall_within_target'])}/{len(judged)}"
    out["verdicts_matched"] = f"{sum(1 for r in all_hits if r['matched'])}/{len(all_hits)}"
    if cpu_seconds > 0:
        out["agent_cpu"] = agent_cpu_share(4, cpu_seconds, say)
    out["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out
