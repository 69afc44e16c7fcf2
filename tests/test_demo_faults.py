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

from tests.helpers import DIVERGENT_WORKLOAD, demo, run_cli

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
    assert result["fault_bites"] == []


# Every fault that lives on one rank runs with the culprit first, in between and last: (TP, rank).
CULPRITS = [(2, 0), (3, 1), (4, 3)]


def bit(result: dict[str, Any], culprit: int | None = None) -> None:
    """The demo knows its fault bit (and on which rank); the analyzer never saw that."""
    assert result["fault_bites"], result
    if culprit is not None:
        assert culprit in {b["rank"] for b in result["fault_bites"]}, result["fault_bites"]


@pytest.mark.parametrize(("tp", "culprit"), CULPRITS)
def test_graph_key_divergence(tmp_path: Path, tp: int, culprit: int) -> None:
    args = ("--tp", str(tp), "--fault", "graph-key-divergence", "--fault-rank", str(culprit), *DIVERGENT_WORKLOAD)
    result, _ = demo(tmp_path, *args)
    bit(result, culprit)
    inc = one_incident(result)
    d = inc["diagnosis"]
    assert d["verdict"] == "collective_mismatch", d["summary"]
    assert d["culprit_ranks"] == [culprit]
    ranks = d["ranks"]
    div = d["first_divergence"]
    assert div["step"] == d["step"]
    peers = [r for r in ranks if r != str(culprit)]
    # The culprit's drafter graph is the smaller one: its first divergent all-reduce is smaller.
    assert all(div["per_rank"][str(culprit)]["numel"] < div["per_rank"][p]["numel"] for p in peers)
    assert "drafter graph" in div["sources"][str(culprit)]
    if d["no_stall_yet"]:
        # Caught as the steps completed: within a second of the bite, before any rank hung.
        assert inc["detected_after_s"] < 5, inc["detected_after_s"]  # (1 s on an unloaded machine: README)
        assert "no stall yet" in d["summary"]
    else:
        assert all(ranks[r]["state"] == "waiting_collective" for r in peers)
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


@pytest.mark.parametrize(("tp", "culprit"), CULPRITS)
def test_rank_skips_collective(tmp_path: Path, tp: int, culprit: int) -> None:
    result, _ = demo(tmp_path, "--tp", str(tp), "--fault", "rank-skips-collective", "--fault-rank", str(culprit))
    bit(result, culprit)
    inc = one_incident(result)
    d = inc["diagnosis"]
    assert d["verdict"] == "collective_mismatch", d["summary"]
    assert d["culprit_ranks"] == [culprit]
    assert d["ranks"][str(culprit)]["graph_key"]["mode"] == "NONE"  # the eager path
    div = d["first_divergence"]
    assert div["per_rank"][str(culprit)] is None  # the all-reduce it left out
    assert all(op is not None for r, op in div["per_rank"].items() if r != str(culprit))
    assert_reproduced(inc)


@pytest.mark.parametrize(("tp", "culprit"), CULPRITS)
def test_host_hang(tmp_path: Path, tp: int, culprit: int) -> None:
    result, _ = demo(tmp_path, "--tp", str(tp), "--fault", "host-hang", "--fault-rank", str(culprit))
    bit(result, culprit)
    inc = one_incident(result)
    d = inc["diagnosis"]
    assert d["verdict"] == "host_hang", d["summary"]
    assert d["culprit_ranks"] == [culprit]
    assert d["ranks"][str(culprit)]["state"] == "host_busy"
    peers = [r for r in d["ranks"] if r != str(culprit)]
    assert all(d["ranks"][r]["state"] == "waiting_collective" for r in peers)
    assert len({json.dumps(v["graph_key"], sort_keys=True) for v in d["ranks"].values()}) == 1
    assert "_update_step_stats" in " ".join(d["evidence"])
    assert_reproduced(inc)


@pytest.mark.parametrize(("tp", "culprit"), CULPRITS)
def test_worker_killed(tmp_path: Path, tp: int, culprit: int) -> None:
    result, _ = demo(tmp_path, "--tp", str(tp), "--fault", "worker-killed", "--fault-rank", str(culprit))
    bit(result, culprit)
    inc = one_incident(result)
    d = inc["diagnosis"]
    assert d["verdict"] == "worker_dead", d["summary"]
    assert d["culprit_ranks"] == [culprit]
    assert d["ranks"][str(culprit)]["state"] == "dead"
    assert d["ranks"][str(culprit)]["graph_key"]["mode"] == "FULL"
    assert d["recommendation"]["action"] == "restart"
    assert_reproduced(inc)


def test_a_bite_with_no_incident_fails_the_demo(tmp_path: Path) -> None:
    """A watchdog that misses a fault that bit must never read as "succeeded": here the detector's
    deadline is out of reach and a host hang is no divergence, so nothing fires. (--timeout covers the
    start-up too: 15 s was not enough for it on a loaded 2-core machine; short requests bite within
    a few steps.)"""
    result, cp = demo(
        tmp_path, "--tp", "2", "--fault", "host-hang", "--fault-rank", "0", "--stall-floor-s", "100000",
        "--requests", "16", "--output-len", "8", "--timeout", "30", check=False,
    )  # fmt: skip
    assert cp.returncode == 1, cp.stderr
    assert result["incidents"] == [] and result["fault_bites"]
    # one error line (a child's warning may be printed after it: multiprocessing's resource tracker
    # reports a semaphore another test's clean-up removed first)
    said = [line for line in cp.stderr.splitlines() if line.startswith("watchdog:")]
    assert len(said) == 1, cp.stderr
    assert said[0].startswith("watchdog: the host-hang fault bit (rank 0") and "no incident followed" in said[0]


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


def test_ranks_out_of_step_cannot_produce_correct_text(tmp_path: Path) -> None:
    """Unwatched, the rank that skips an all-reduce runs ahead (it is the output rank here): the
    deployment keeps serving, but every answer sampled from the mixed reductions is wrong text."""
    result, _ = demo(
        tmp_path, "--tp", "2", "--fault", "rank-skips-collective", "--fault-rank", "0", "--no-watch",
        "--requests", "48", "--output-len", "16", "--timeout", "120",
    )  # fmt: skip
    assert result["fault_bites"] and result["incidents"] == []
    assert result["requests"]["failed"] > 0, result["requests"]
