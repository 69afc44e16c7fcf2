"""The demo engine on real GPUs (issue 7): CUDA graphs with NCCL all_reduces inside, each fault a
real hang of the real mechanism, diagnosed from ledgers, stacks, process state and NVML.

Marked ``gpu``. The TP=1 checks need one CUDA GPU, the TP=2 checks two; each skips with the
reason when they are not there. ``scripts/gpu_checks.sh`` runs them on a GPU machine (and the
figures for docs/gpu-results.md). Without CUDA, one test checks that ``--device cuda`` refuses
with a clear line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import demo, run_cli


def _gpus() -> tuple[int, str]:
    try:
        import torch
    except ImportError:
        return 0, "torch is not installed"
    if not torch.cuda.is_available():
        return 0, f"CUDA is not available (torch {torch.__version__})"
    return torch.cuda.device_count(), ""


GPUS, WHY = _gpus()


def needs_gpus(n: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(n > GPUS, reason=f"needs CUDA and {n} GPU(s): {WHY or f'{GPUS} visible'}")


def gpu_test(fn: Any) -> Any:
    """A check that starts a real CUDA deployment: gpu, slow, bounded in time."""
    return pytest.mark.gpu(pytest.mark.slow(pytest.mark.timeout(300)(fn)))


def cuda_demo(tmp: Path, *args: str) -> dict[str, Any]:
    result, _ = demo(tmp, "--device", "cuda", "--timeout", "120", *args, timeout=200)
    assert result.get("device") == "cuda"
    return result


def one_diagnosis(result: dict[str, Any], verdict: str) -> dict[str, Any]:
    assert len(result["incidents"]) == 1, result
    inc = result["incidents"][0]
    assert 0 < inc["detected_after_s"] <= inc["diagnosed_after_s"]
    d: dict[str, Any] = inc["diagnosis"]
    assert d["verdict"] == verdict, d["summary"]
    assert not any(m.startswith("gpus") for m in d["missing"]), d["missing"]  # NVML evidence is real here
    cp = run_cli(["diagnose", inc["bundle"], "--json"], timeout=60)
    assert cp.returncode == 3, cp.stderr
    again = json.loads(cp.stdout)
    for field in ("verdict", "step", "culprit_ranks", "first_divergence", "novelty"):
        assert again[field] == d[field], field
    return d


def gpu_busy(d: dict[str, Any]) -> bool:
    return any(e.startswith("GPU ") and "busy" in e for e in d["evidence"])


@pytest.mark.skipif(GPUS > 0, reason="CUDA is present: the refusal path is not reachable")
@pytest.mark.timeout(60)
def test_cuda_device_refused_without_gpus(tmp_path: Path) -> None:
    cp = run_cli(["demo", "--device", "cuda", "--no-fallback", "--workdir", str(tmp_path)], timeout=60)
    assert cp.returncode == 1
    assert cp.stderr.strip().startswith("watchdog: --device cuda:"), cp.stderr
    assert "Traceback" not in cp.stderr


# ---- TP=1: one GPU -----------------------------------------------------------------------


@pytest.mark.parametrize("tp", [pytest.param(1, marks=needs_gpus(1)), pytest.param(2, marks=needs_gpus(2))])
@gpu_test
def test_healthy_cuda_run_has_no_incident(tmp_path: Path, tp: int) -> None:
    result = cuda_demo(tmp_path, "--tp", str(tp), "--requests", "64")
    assert result["incidents"] == []
    assert result["requests"] == {"total": 64, "succeeded": 64, "failed": 0}


@pytest.mark.parametrize("tp", [pytest.param(1, marks=needs_gpus(1)), pytest.param(2, marks=needs_gpus(2))])
@gpu_test
def test_padded_slot_kernel_hang_on_gpu(tmp_path: Path, tp: int) -> None:
    """The Triton indexer's lead block spins on its barrier: every rank's host in synchronize, GPU busy."""
    result = cuda_demo(tmp_path, "--tp", str(tp), "--fault", "padded-slot-kernel-hang", "--fault-rank", "0")
    d = one_diagnosis(result, "device_hang")
    assert d["culprit_ranks"] == list(range(tp))
    assert any("padded request slots" in n for n in d["novelty"]), d["novelty"]
    assert all(r["graph_key"]["mode"] == "FULL" and r["padded_reqs"] > 0 for r in d["ranks"].values())
    assert all(r["state"] == "waiting_device" for r in d["ranks"].values()), d["ranks"]
    assert gpu_busy(d), d["evidence"]


@pytest.mark.parametrize("tp", [pytest.param(1, marks=needs_gpus(1)), pytest.param(2, marks=needs_gpus(2))])
@gpu_test
def test_worker_killed_on_gpu(tmp_path: Path, tp: int) -> None:
    d = one_diagnosis(
        cuda_demo(tmp_path, "--tp", str(tp), "--fault", "worker-killed", "--fault-rank", str(tp - 1)), "worker_dead"
    )
    assert d["culprit_ranks"] == [tp - 1]


# ---- TP=2: two GPUs ----------------------------------------------------------------------


@needs_gpus(2)
@gpu_test
def test_graph_key_divergence_on_gpu(tmp_path: Path) -> None:
    """Rank 1 replays a smaller drafter graph: a real NCCL size mismatch inside the replays."""
    d = one_diagnosis(cuda_demo(tmp_path, "--tp", "2", "--fault", "graph-key-divergence"), "collective_mismatch")
    assert d["culprit_ranks"] == [1]
    ranks = d["ranks"]
    assert ranks["0"]["graph_key"] == ranks["1"]["graph_key"]
    assert ranks["0"]["drafter_key"]["num_tokens"] > ranks["1"]["drafter_key"]["num_tokens"]
    div = d["first_divergence"]
    assert div["per_rank"]["1"]["numel"] < div["per_rank"]["0"]["numel"]


@needs_gpus(2)
@gpu_test
def test_rank_skips_collective_on_gpu(tmp_path: Path) -> None:
    """Rank 1's eager path drops an all_reduce: NCCL count mismatch, only rank 0 left waiting."""
    d = one_diagnosis(cuda_demo(tmp_path, "--tp", "2", "--fault", "rank-skips-collective"), "collective_mismatch")
    assert d["culprit_ranks"] == [1]
    assert d["first_divergence"] is not None


@needs_gpus(2)
@gpu_test
def test_host_hang_on_gpu(tmp_path: Path) -> None:
    d = one_diagnosis(cuda_demo(tmp_path, "--tp", "2", "--fault", "host-hang"), "host_hang")
    assert d["culprit_ranks"] == [1]
