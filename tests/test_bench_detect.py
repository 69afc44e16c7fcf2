"""`watchdog bench detect` on one small case: a real TP=2 deployment, engine-stall injected once.

engine-stall bites when a request is admitted into a busy batch after step 10: with the demo's
concurrency of 32, 16 requests are all admitted at once and it never bites, so 48 are sent."""

from __future__ import annotations

import json

import pytest

from watchdog.bench.detect import DETECT_SCHEMA, bench_detect


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_detect_engine_stall_tp2() -> None:
    said: list[str] = []
    result = bench_detect(tps=[2], faults=["engine-stall"], repeats=1, requests=48, cpu_seconds=0, say=said.append)
    assert result["schema"] == DETECT_SCHEMA
    json.dumps(result)  # JSON-serialisable
    assert "agent_cpu" not in result
    assert result["targets"]["diagnosis_within_s_of_stall"] == 3.0
    [case] = result["latency"]
    assert (case["tp"], case["fault"], case["n"]) == (2, "engine-stall", 1)
    assert case["errors"] == [] and case["misses"] == 0 and case["incidents"] == 1
    assert case["expected_verdict"] == "engine_stall"
    assert case["verdicts"] == {"engine_stall": 1} and case["all_matched"]
    [run] = case["runs"]
    assert run["matched"] and run["fault_to_stall_s"] > 0 and run["stall_to_diagnosis_s"] >= 0
    assert case["fault_to_stall_s"]["median"] == case["fault_to_stall_s"]["max"] == run["fault_to_stall_s"]
    assert run["stall_deadline_s"] >= 1.0
    assert any("engine-stall" in m for m in said)
