"""``watchdog bench recorder`` and ``watchdog bench detect``: figures (medians, maxima, ratios).

``watchdog bench recorder``: what the ledger costs (``watchdog.demo.overhead``): ns per record on the
recorder's hot path, median of ``repeats`` timing runs, and demo engine steps/s with the ledgers on
vs off in ONE deployment.

``watchdog bench detect``: the fault catalogue injected into real demo deployments, ``repeats`` seeds
each: whether the expected verdict (``watchdog.demo.faults.EXPECTED_VERDICTS``) came, and how long
the stall declaration and the diagnosis took (and, with ``cpu_seconds``, the agent's CPU share
beside a healthy deployment, ``watchdog.bench.agent``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from collectors.format import StepBegin, StepEnd
from collectors.reader import LedgerError, read_ledger
from watchdog.bench.agent import agent_cpu_share
from watchdog.demo.faults import EXPECTED_VERDICTS, FAULTS
from watchdog.demo.options import DemoOptions
from watchdog.demo.overhead import demo_on_off, recorder_ns
from watchdog.demo.run import run_demo
from watchdog.detector import DetectorConfig, Kind, kind_of, p99


def bench_recorder(*, records: int, repeats: int, tp: int, steps: int, say: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"schema": "watchdog.bench.recorder/v1", **recorder_ns(records, repeats)}
    if tp > 0:
        # about 100 steps/s on the 2-core CI machine at TP=2: ``steps`` per block sets its length
        out.update(demo_on_off(tp, blocks=3, block_s=max(0.5, steps / 100), say=say))
    return out


DETECT_SCHEMA = "watchdog.bench.detect/v1"

DETECT_TARGETS: dict[str, Any] = {
    "stall_declared_within": "max(1 s, 10 x recent p99 step time of the stuck step's kind) after the step hangs; "
    "stall_deadline_s is the deadline the detector applied (stall_on_time compares with it), target_s the bound "
    "recomputed from the bundle's ledgers (stall_within_target; absent when the kind had < 3 finished steps "
    "or no step was open, e.g. engine-stall)",
    "stall_floor_s": 1.0,
    # ranks out of step are reported as their steps complete, before any stall: from the bite
    "divergence_within_s_of_bite": 1.0,
    # no record shows a divergence before a rank finished the divergent step (a rank still issuing its
    # launches may yet catch up), so the watchdog's own share is timed from that first end (an upper
    # bound: to when the evidence was taken)
    "divergence_within_s_of_step_end": 1.0,
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
        return {"median": None, "p95": None, "max": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]  # nearest rank
    return {"median": round(statistics.median(values), 3), "p95": round(p95, 3), "max": round(max(values), 3)}


def _stall_of(bundle: str) -> dict[str, Any] | None:
    try:
        stall = json.loads((Path(bundle) / "evidence.json").read_text()).get("stall")
    except (OSError, ValueError):
        return None
    return stall if isinstance(stall, dict) else None


def _kind_target(bundle: str, stall_step: int | None) -> dict[str, Any]:
    """The target computed from the bundle's rank ledgers, independently of the detector's own
    bookkeeping: max(floor, 10 x p99) of the completed steps of the stuck step's kind (graph mode,
    uniform, token bucket) that finished before it hung; None when that kind has fewer than 3."""
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


def _divergent_step(bundle: str, step: int) -> dict[str, Any]:
    """Where a divergence's time from the bite went, read from its bundle as any reader would: how long
    the divergent step ran before the first rank finished it (until then no rank's records can show the
    disagreement: a step's launches and collectives are recorded as they are issued, and a rank still
    issuing them may yet catch up) and how soon after that first end the evidence was taken (gathering
    starts right after the declaration: an upper bound of the watchdog's own share)."""
    begins: list[int] = []
    ends: list[int] = []
    for path in sorted((Path(bundle) / "ledgers").glob("rank*.ledger")):
        try:
            records = read_ledger(path).records
        except (LedgerError, OSError):
            continue
        begins += [r.mono_ns for r in records if isinstance(r, StepBegin) and r.step == step]
        ends += [r.mono_ns for r in records if isinstance(r, StepEnd) and r.step == step]
    try:
        taken = int(json.loads((Path(bundle) / "evidence.json").read_text())["taken_mono_ns"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out: dict[str, Any] = {}
    if ends:
        out["evidence_after_step_end_s"] = round((taken - min(ends)) / 1e9, 3)
        if begins:
            out["divergent_step_s"] = round((min(ends) - min(begins)) / 1e9, 3)
    return out


def _detect_run(tp: int, fault: str, seed: int, requests: int, native: bool, fault_rank: int = 1) -> dict[str, Any]:
    """One injection; never raises: an error becomes a string in the record."""
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
        rec["elapsed_s"] = res.elapsed_s
        rec["requests_succeeded"] = res.requests.succeeded
        if not res.incidents:
            rec["incident"] = False
            # every request served: the workload never ran into the defect; otherwise the run hung
            # (or ended early, or was still crawling at the timeout) and the watchdog said nothing
            rec["miss_kind"] = "fault_never_bit" if rec["requests_succeeded"] == requests else "undetected"
            rec["hit_timeout"] = res.elapsed_s >= DEMO_RUN_TIMEOUT_S
            return rec
        inc = res.incidents[0]
        diag = inc.diagnosis
        expected = EXPECTED_VERDICTS.get(fault)
        detected, diagnosed = inc.detected_after_s, inc.diagnosed_after_s
        rec.update(
            incident=True,
            verdict=diag.verdict.value,
            matched=diag.verdict.value == expected,
            culprit_ranks=list(diag.culprit_ranks),
            no_stall_yet=diag.no_stall_yet,
            fault_to_stall_s=detected,
            stall_to_diagnosis_s=round(diagnosed - detected, 3),
            fault_to_diagnosis_s=diagnosed,
        )
        if not rec["matched"]:
            rec["report"] = inc.report  # the bundle goes with the run's directory: keep what it said
        stall = _stall_of(inc.bundle)
        if stall is not None:
            deadline = float(stall["deadline_s"])
            rec.update(
                stall_kind=stall.get("kind"),
                stall_step=stall.get("step"),
                stall_age_s=round(float(stall["age_s"]), 3),
                stall_deadline_s=round(deadline, 3),
                stall_on_time=detected <= deadline + DETECT_TARGETS["stall_poll_tolerance_s"],
            )
            tgt = _kind_target(inc.bundle, stall.get("step"))
            rec.update(tgt)
            if tgt["target_s"] is not None:
                rec["stall_within_target"] = detected <= tgt["target_s"] + DETECT_TARGETS["stall_poll_tolerance_s"]
            if diag.no_stall_yet and isinstance(stall.get("step"), int):
                rec.update(_divergent_step(inc.bundle, stall["step"]))
    return rec


def _summarise(tp: int, fault: str, culprit: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    hits = [r for r in runs if r.get("incident")]
    verdicts: dict[str, int] = {}
    for r in hits:
        verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
    stall_to_diag = [r["stall_to_diagnosis_s"] for r in hits]
    out: dict[str, Any] = {
        "tp": tp,
        "fault": fault,
        "fault_rank": culprit,
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
        "divergences_within_target_of_step_end": sum(
            1
            for r in hits
            if r.get("no_stall_yet")
            and r.get("evidence_after_step_end_s", math.inf) <= DETECT_TARGETS["divergence_within_s_of_step_end"]
        ),
        "divergent_step_s": _stats([r["divergent_step_s"] for r in hits if "divergent_step_s" in r]),
        "evidence_after_step_end_s": _stats(
            [r["evidence_after_step_end_s"] for r in hits if "evidence_after_step_end_s" in r]
        ),
        "runs": runs,
    }
    return out


def bench_detect(
    *,
    tps: list[int],
    faults: list[str] | None,
    repeats: int,
    requests: int,
    cpu_seconds: float,
    say: Callable[[str], None],
    fault_ranks: list[int] | None = None,
) -> dict[str, Any]:
    """``fault_ranks``: the culprits of rank faults, each measured in turn (None: rank 1, the demo's
    default; -1 or a rank past the last: the last rank of each TP size)."""
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
        culprits = list(dict.fromkeys(tp - 1 if r < 0 else min(r, tp - 1) for r in fault_ranks or [1]))
        for fault, culprit in ((f, c) for f in chosen for c in culprits):
            runs = []
            for seed in range(repeats):
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
            out["latency"].append(_summarise(tp, fault, culprit, runs))
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
    divs = [s for s in out["latency"] if s["divergences_no_stall_yet"]]
    if divs:
        n = sum(s["divergences_no_stall_yet"] for s in divs)
        out["divergences_within_target_of_bite"] = f"{sum(s['divergences_within_target'] for s in divs)}/{n}"
        ends = sum(s["divergences_within_target_of_step_end"] for s in divs)
        out["divergences_within_target_of_step_end"] = f"{ends}/{n}"
    if cpu_seconds > 0:
        out["agent_cpu"] = agent_cpu_share(4, cpu_seconds, say)
    out["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out
