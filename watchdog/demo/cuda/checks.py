"""The GPU checks behind docs/gpu-results.md: ``python -m watchdog.demo.cuda.checks --tp N --out DIR``.

For the TP size given (one GPU per rank): a healthy run (zero incidents), every fault class that
the TP size allows (TP=1 has no peer, so only the classes that need none), each with what NCCL
RAS and PyTorch's flight recorder report during the same hang, and the ledger's cost on GPU
(decode steps/s with the ledger on vs off in one deployment, ns per record). Writes
``DIR/gpu-checks-tp<N>.json`` and prints a table last. Every deployment ends killed (run_demo's
finally), so a hung GPU is freed before the next check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from watchdog.demo.cuda import SAFE_ENV, apply_safe_env, cuda_problem
from watchdog.demo.cuda.probes import clear_dumps, flight_recorder, flight_recorder_env, nccl_ras
from watchdog.demo.faults import EXPECTED_VERDICTS
from watchdog.demo.options import DemoOptions
from watchdog.demo.overhead import demo_on_off, recorder_ns
from watchdog.demo.result import DemoResult
from watchdog.demo.run import run_demo
from watchdog.incident import Incident

# Fault classes that need a peer rank: a TP=1 deployment cannot have them.
NEEDS_PEERS = ("graph-key-divergence", "rank-skips-collective", "host-hang")
GPU_FAULTS = ("graph-key-divergence", "padded-slot-kernel-hang", "rank-skips-collective", "host-hang", "worker-killed")


def faults_for(tp: int) -> tuple[str, ...]:
    return tuple(f for f in GPU_FAULTS if tp >= 2 or f not in NEEDS_PEERS)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def summarise(result: DemoResult, fault: str) -> dict[str, Any]:
    """The figures docs/gpu-results.md shows for one run."""
    out: dict[str, Any] = {
        "fault": fault,
        "tp": result.tp,
        "requests": result.requests.to_json(),
        "elapsed_s": result.elapsed_s,
        "incidents": len(result.incidents),
    }
    if not result.incidents:
        return out
    inc = result.incidents[0].to_json()
    d = inc["diagnosis"]
    expected = EXPECTED_VERDICTS.get(fault)
    out.update(
        verdict=d["verdict"],
        expected_verdict=expected,
        matched=d["verdict"] == expected,
        step=d.get("step"),
        culprit_ranks=d.get("culprit_ranks"),
        summary=d.get("summary"),
        keys={
            r: {"state": v.get("state"), "graph_key": v.get("graph_key"), "drafter_key": v.get("drafter_key")}
            for r, v in d.get("ranks", {}).items()
        },
        first_divergence=d.get("first_divergence"),
        novelty=d.get("novelty"),
        evidence=d.get("evidence"),
        missing=d.get("missing"),
        detected_after_s=inc["detected_after_s"],
        diagnosed_after_s=inc["diagnosed_after_s"],
        bundle=inc["bundle"],
    )
    try:
        ev = json.loads((Path(inc["bundle"]) / "evidence.json").read_text())
        out["gpus"] = ev.get("gpus")
    except (OSError, ValueError) as exc:
        out["gpus"] = f"unreadable: {exc}"
    return out


def run_check(fault: str, tp: int, workdir: Path, requests: int, fr_env: dict[str, str]) -> dict[str, Any]:
    ranks = range(tp)
    clear_dumps(fr_env, ranks)

    def probe(_inc: Incident) -> dict[str, Any]:
        # Asked while every rank is still hung, after the watchdog's own diagnosis.
        return {"nccl_ras": nccl_ras(), "flight_recorder": flight_recorder(ranks, fr_env)}

    opts = DemoOptions(
        tp=tp,
        requests=requests,
        fault=fault,
        fault_rank=tp - 1 if fault != "none" else 1,
        workdir=str(workdir),
        timeout_s=180.0,
        fallback=False,
        device="cuda",
    )
    t0 = time.monotonic()
    try:
        result = run_demo(opts, say=_say, probe=probe)
    except Exception as exc:  # a failed check is a figure
        return {"fault": fault, "tp": tp, "error": f"{type(exc).__name__}: {exc}", "elapsed_s": time.monotonic() - t0}
    out = summarise(result, fault)
    out["probes"] = list(result.probes or ())
    return out


def _row(c: dict[str, Any]) -> str:
    if "error" in c:
        return f"{c['fault']:<26} ERROR {c['error']}"
    if not c["incidents"]:
        return f"{c['fault']:<26} no incident, {c['requests']['succeeded']}/{c['requests']['total']} requests"
    ok = "ok" if c["matched"] else f"MISMATCH (expected {c['expected_verdict']})"
    return (
        f"{c['fault']:<26} {c['verdict']:<20} {ok:<4} culprit {c['culprit_ranks']} step {c['step']} "
        f"detected {c['detected_after_s']:.2f} s diagnosed {c['diagnosed_after_s']:.2f} s"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m watchdog.demo.cuda.checks", description=__doc__)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--faults", default=",".join(("none", *GPU_FAULTS)), help="comma-separated; 'none' = healthy")
    ap.add_argument("--overhead-blocks", type=int, default=6, help="on/off blocks each (0 skips the overhead)")
    ap.add_argument("--overhead-block-s", type=float, default=4.0)
    a = ap.parse_args(argv)
    problem = cuda_problem(a.tp)
    if problem is not None:
        _say(f"gpu checks: {problem}")
        return 1
    apply_safe_env()
    work = Path(tempfile.mkdtemp(prefix=f"watchdog-gpu-tp{a.tp}-"))
    fr_env = flight_recorder_env(work / "flight-recorder")
    os.environ.update(fr_env)  # the workers inherit it (spawned after this)
    wanted = [f for f in a.faults.split(",") if f]
    report: dict[str, Any] = {
        "schema": "watchdog.gpu-checks/v1",
        "tp": a.tp,
        "env": {k: os.environ.get(k) for k in (*SAFE_ENV, *fr_env)},
        "skipped": [f for f in wanted if f != "none" and f not in faults_for(a.tp)],
        "checks": [],
    }
    for fault in wanted:
        if fault != "none" and fault not in faults_for(a.tp):
            continue
        _say(f"gpu checks: TP={a.tp} fault={fault}")
        report["checks"].append(run_check(fault, a.tp, work / fault, a.requests, fr_env))
    if a.overhead_blocks > 0:
        _say(f"gpu checks: TP={a.tp} ledger on/off")
        try:
            report["overhead"] = demo_on_off(a.tp, a.overhead_blocks, a.overhead_block_s, _say, device="cuda")
        except Exception as exc:
            report["overhead"] = {"error": f"{type(exc).__name__}: {exc}"}
        report["recorder_ns"] = recorder_ns(20000, 7)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"gpu-checks-tp{a.tp}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nGPU checks TP={a.tp} ({path})")
    for c in report["checks"]:
        print("  " + _row(c))
    if "overhead" in report:
        print(f"  ledger on/off: {report['overhead']}")
        print(f"  recorder ns: {report['recorder_ns']}")
    if report["skipped"]:
        print(f"  not run at TP={a.tp} (need a peer rank): {', '.join(report['skipped'])}")
    bad = [c for c in report["checks"] if "error" in c or (c["fault"] != "none") != bool(c.get("incidents"))]
    bad += [c for c in report["checks"] if c.get("incidents") and not c.get("matched")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
