"""Real hangs: the demo deployment (engine + worker processes, gloo collectives, shm rings) runs
into each fault's defect, the watcher catches the stall, and the analyzer names verdict,
culprit and keys from ledgers, rings, stacks and process state alone. Then `watchdog
diagnose` on the written bundle must reproduce the diagnosis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .demo_util import demo, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def one_incident(result: dict[str, Any]) -> dict[str, Any]:
    assert len(result["incidents"]) == 1, result
    inc = result["incidents"][0]
    assert inc["detected_after_s"] > 0 and inc["diagnosed_after_s"] >= inc["detected_after_s"]
    diagnosis: dict[str, Any] = inc["diagnosis"]
    assert diagnosis["schema"] == "watchdog.diagnosis/v1"
    return inc


def assert_reproduced(inc: dict[str, Any]) -> None:
    cp = run_cli(["diagnose", inc["bundle"], "--json"], timeout=60)
    assert cp.returncode == 3, cp.stderr
    again = json.loads(cp.stdout)
    live = inc["diagnosis"]
    for field in ("verdict", "step", "culprit_ranks", "first_divergence", "novelty"):
        assert again[field] == live[field], field
    assert {r: v["state"] for r, v in again["ranks"].items()} == {r: v["state"] for r, v in live["ranks"].items()}


def test_healthy_run_has_no_incident(tmp_path: Path) -> None:
    result, cp = demo(tmp_path, "--tp", "2", "--requests", "48")
    assert cp.returncode == 0
    assert result["schema"] == "watchdog.demo/v1"
    assert result["incidents"] == []
    assert result["requests"] == {"total": 48, "succeeded": 48, "failed": 0}


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_graph_key_divergence(tmp_path: Path, tp: int) -> None:
    culprit = tp - 1
    result, _ = demo(tmp_path, "--tp", str(tp), "--fault", "graph-key-divergence", "--fault-rank", str(culprit))
    inc = one_incident(result)
    d = inc["diagnosis"]
    assert d["verdict"] == "collective_mismatch"
    assert d["culprit_ranks"] == [culprit]
    ranks = d["ranks"]
    # Every rank replays the same FULL decode graph; only the culprit's drafter graph differs.
    model_keys = {json.dumps(r["graph_key"], sort_keys=True) for r in ranks.values()}
    assert len(model_keys) == 1
    assert ranks["0"]["graph_key"]["mode"] == "FULL" and ranks["0"]["graph_key"]["uniform"] is True
    peers = [r for r in ranks if r != str(culprit)]
    assert all(ranks[r]["drafter_key"]["num_tokens"] > ranks[str(culprit)]["drafter_key"]["num_tokens"] for r in peers)
    assert all(ranks[r]["state"] == "waiting_collective" for r in peers)
    assert ranks[str(culprit)]["state"] == "idle"
    div = d["first_divergence"]
    assert div["step"] == d["step"]
    assert div["per_rank"][str(culprit)]["numel"] < div["per_rank"]["0"]["numel"]
    assert d["recommendation"] == {
        "action": "restart_safer_mode",
        "cudagraph_mode": "FULL_DECODE_ONLY",
        "reason": d["recommendation"]["reason"],
    }
    assert_reproduced(inc)


@pytest.mark.parametrize("tp", [2, 4])
def test_padded_slot_kernel_hang(tmp_path: Path, tp: int) -> None:
    result, _ = demo(tmp_path, "--tp", str(tp), "--fault", "padded-slot-kernel-hang")
    inc = one_incident(result)
    d = inc["diagnosis"]
    assert d["verdict"] == "device_hang"
    assert d["culprit_ranks"] == list(range(tp))
    keys = {json.dumps(r["graph_key"], sort_keys=True) for r in d["ranks"].values()}
    assert len(keys) == 1
    for r in d["ranks"].values():
        assert r["state"] == "waiting_device"
        assert r["graph_key"]["mode"] == "FULL" and r["graph_key"]["uniform"] is True
        assert r["padded_reqs"] >= 1
    assert any("padded request slots" in n or "padded slots" in n for n in d["novelty"]), d["novelty"]
    assert "sparse_indexer_topk" in d["summary"]
    assert_reproduced(inc)


def test_rank_skips_collective(tmp_path: Path) -> None:
    result, _ = demo(tmp_path, "--tp", "2", "--fault", "rank-skips-collective", "--fault-rank", "1")
    inc = one_incident(result)
    d = inc["diagnosis"]
    assert d["verdict"] == "collective_mismatch"
    assert d["culprit_ranks"] == [1]
    assert d["ranks"]["0"]["graph_key"]["mode"] == "NONE"  # the eager path
    assert d["first_divergence"]["per_rank"]["1"] is None
    assert d["ranks"]["0"]["state"] == "waiting_collective"
    assert_reproduced(inc)


def test_host_hang(tmp_path: Path) -> None:
    result, _ = demo(tmp_path, "--tp", "2", "--fault", "host-hang", "--fault-rank", "1")
    inc = one_incident(result)
    d = inc["diagnosis"]
    assert d["verdict"] == "host_hang"
    assert d["culprit_ranks"] == [1]
    assert d["ranks"]["1"]["state"] == "host_busy"
    assert d["ranks"]["0"]["state"] == "waiting_collective"
    assert d["ranks"]["0"]["graph_key"] == d["ranks"]["1"]["graph_key"]
    assert "_update_step_stats" in " ".join(d["evidence"])
    assert_reproduced(inc)


def test_worker_killed(tmp_path: Path) -> None:
    result, _ = demo(tmp_path, "--tp", "2", "--fault", "worker-killed", "--fault-rank", "1")
    inc = one_incident(result)
    d = inc["diagnosis"]
    assert d["verdict"] == "worker_dead"
    assert d["culprit_ranks"] == [1]
    assert d["ranks"]["1"]["state"] == "dead"
    assert d["ranks"]["1"]["graph_key"]["mode"] == "FULL"
    assert d["recommendation"]["action"] == "restart"
    assert_reproduced(inc)


def test_engine_stall(tmp_path: Path) -> None:
    result, _ = demo(tmp_path, "--tp", "2", "--fault", "engine-stall")
    inc = one_incident(result)
    d = inc["diagnosis"]
    assert d["verdict"] == "engine_stall"
    assert d["culprit_ranks"] == []
    assert all(r["state"] == "idle" for r in d["ranks"].values())
    assert "_rebalance" in " ".join(d["evidence"])
    assert result["requests"]["failed"] > 0
    assert_reproduced(inc)
