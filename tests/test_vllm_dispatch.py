"""vLLM's real ``CudagraphDispatcher`` driven through the plugin's installed hooks (CPU, both vLLM versions).

tests/vllm_dispatch_child.py builds vLLM's real ``CompilationConfig`` (FULL_AND_PIECEWISE, MTP=1
capture sizes, max_num_seqs), its TP group and its dispatchers (target and MTP drafter), installs the
plugin, and runs the seed's batch shapes as steps through vLLM's real ``Worker.execute_model`` ->
``GPUModelRunner._determine_batch_execution_and_padding`` / ``SpecDecodeBaseProposer._determine_batch_
execution_and_padding`` -> ``Worker.sample_tokens``. It reports what vLLM returned; this test reads the
ledger the plugin wrote (with the project's reader, in this process) and checks that it holds exactly
those keys, step by step, with the padded request slots and draft placeholders.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from vllm_envs import VERSIONS, python_or_skip, run_child

from collectors.format import CUDAGraphMode, GraphKey, Role, StepBegin, StepEnd
from collectors.format import launches as format_launches
from collectors.reader import read_ledger

pytestmark = pytest.mark.vllm  # runs real vLLM code (environments built once by tests/vllm_envs.py)


def _child(version: str, mode: str, ledger_dir: Path) -> dict[str, Any]:
    out = run_child(version, "vllm_dispatch_child.py", mode, WATCHDOG_LEDGER_DIR=str(ledger_dir))
    assert out["vllm"] == version
    return out


def _model_key(r: list[Any]) -> GraphKey:
    mode, tokens, reqs, uniform, lora = r
    return GraphKey(CUDAGraphMode(mode), tokens, reqs, uniform=uniform, has_lora=lora)


def assert_the_seed_shapes(steps: list[dict[str, Any]], begins: list[StepBegin]) -> None:
    """The seed's shapes, as vLLM 0.20.1 and 0.33.0 dispatch them (design.md, "Checked on CPU"), in
    either runner generation."""
    by_name = {s["name"]: b for s, b in zip(steps, begins, strict=True)}
    full16 = GraphKey(CUDAGraphMode.FULL, 32, 16, uniform=True)
    assert (by_name["15x2"].key, by_name["15x2"].padded_reqs) == (full16, 1)  # the padded slot
    assert (by_name["16x2"].key, by_name["16x2"].padded_reqs) == (full16, 0)
    assert (by_name["17x2"].key, by_name["17x2"].padded_reqs) == (GraphKey(CUDAGraphMode.FULL, 40, 20, uniform=True), 3)
    assert by_name["mixed prefill"].key == GraphKey(CUDAGraphMode.PIECEWISE, 32)
    assert by_name["long prefill"].key.mode is CUDAGraphMode.NONE


@pytest.mark.timeout(300)
@pytest.mark.parametrize("version", VERSIONS)
def test_ledger_holds_exactly_the_keys_vllm_dispatched(version: str, tmp_path: Path) -> None:
    out = _child(version, "dispatch", tmp_path)
    assert any(h.endswith("GPUModelRunner._determine_batch_execution_and_padding") for h in out["installed"])
    assert out["ledger"] == str(tmp_path / "rank000.ledger")
    ledger = read_ledger(tmp_path / "rank000.ledger")
    assert (ledger.header.rank, ledger.header.world_size) == (0, 1)  # from vLLM's own TP group
    assert ledger.config["cudagraph_mode"] == "FULL_AND_PIECEWISE"
    assert ledger.config["capture_sizes"] == [2, 4, 8, 16, 24, 32, 40, 48]
    assert ledger.config["uniform_decode_query_len"] == 2

    steps, returned = out["steps"], out["returned"]
    assert len(returned) == len(steps) == 6
    recs = ledger.records
    begins = [r for r in recs if isinstance(r, StepBegin)]
    launches = format_launches(recs)
    ends = [r for r in recs if isinstance(r, StepEnd)]
    # begin with the model launch folded in, drafter launch, end: nothing else
    assert len(recs) == 3 * len(steps)
    assert all(b.launch is not None for b in begins)
    assert [b.step for b in begins] == [e.step for e in ends] == list(range(len(steps)))
    assert all(e.ok for e in ends)

    for i, (step, got) in enumerate(zip(steps, returned, strict=True)):
        model = _model_key(got["model"])
        drafter = GraphKey(CUDAGraphMode(got["drafter"][0]), got["drafter"][1])
        b = begins[i]
        mine = [(lk.role, lk.key) for lk in launches if lk.step == i]
        assert b.key == model, f"step {i} ({step['name']}): ledger {b.key} != vLLM {model}"
        assert mine == [(Role.MODEL, model), (Role.DRAFTER, drafter)], f"step {i} ({step['name']})"
        per_req = step["per_req"]
        assert (b.unpadded_tokens, b.unpadded_reqs, b.placeholders) == (sum(per_req), len(per_req), step["drafted"])
        full = model.mode is CUDAGraphMode.FULL and model.num_reqs is not None
        assert b.padded_reqs == (model.num_reqs - len(per_req) if full and model.num_reqs else 0)

    assert_the_seed_shapes(steps, begins)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("version", VERSIONS)
def test_v2_runner_ledger_holds_exactly_the_keys_vllm_dispatched(version: str, tmp_path: Path) -> None:
    """The V2 runner generation: vLLM's real ``ModelCudaGraphManager.dispatch`` (its candidates from the
    real CompilationConfig), hooked through ``CudaGraphManager.dispatch``, inside the real
    ``Worker.execute_model`` / ``sample_tokens``."""
    out = _child(version, "dispatch_v2", tmp_path)
    assert any(h.endswith("CudaGraphManager.dispatch") for h in out["installed"]), out["installed"]
    ledger = read_ledger(tmp_path / "rank000.ledger")
    steps, returned = out["steps"], out["returned"]
    assert len(returned) == len(steps) == 6
    recs = ledger.records
    begins = [r for r in recs if isinstance(r, StepBegin)]
    ends = [r for r in recs if isinstance(r, StepEnd)]
    assert len(recs) == 2 * len(steps)  # begin with the model launch folded in, end (no drafter here)
    assert [b.step for b in begins] == [e.step for e in ends] == list(range(len(steps)))
    for i, (step, (mode, tokens, reqs, uniform)) in enumerate(zip(steps, returned, strict=True)):
        want = GraphKey(CUDAGraphMode(mode), tokens, reqs, uniform=uniform is not None)
        b = begins[i]
        assert b.key == want, f"step {i} ({step['name']}): ledger {b.key} != vLLM {want}"
        assert b.launch is not None and (b.launch.role, b.launch.key) == (Role.MODEL, want)
        full = want.mode is CUDAGraphMode.FULL and want.num_reqs is not None
        assert b.padded_reqs == (want.num_reqs - len(step["per_req"]) if full and want.num_reqs else 0)
    assert_the_seed_shapes(steps, begins)


@pytest.mark.parametrize("version", VERSIONS)
def test_bench_wrappers_times_the_real_targets_both_ways(version: str, tmp_path: Path) -> None:
    """``watchdog bench plugin --wrappers``: plain and exact-signature wrappers around vLLM's real targets,
    measured in the vLLM environment (small counts: this checks the bench, not the figures)."""
    from watchdog.bench.wrappers import SCHEMA, bench_wrappers

    python = python_or_skip(version)
    exe = python.parent / "vllm"
    if not exe.exists():  # a layered environment without the console script: a stand-in naming its python
        exe = tmp_path / "vllm"
        exe.write_text(f"#!{python}\n")
        exe.chmod(0o755)
    out = bench_wrappers(vllm_exe=str(exe), calls=200, repeats=3, step_ms=3.0, collectives=2)
    assert out["schema"] == SCHEMA and out["vllm"] == version
    timed = {name: v for name, v in out["per_call"].items() if "absent" not in v}
    # both runner generations have the step boundaries, the collectives and the engine side
    assert {"Worker.execute_model", "Worker.sample_tokens", "GroupCoordinator._all_reduce_out_place"} <= set(timed)
    assert {"MultiprocExecutor.execute_model", "Scheduler.schedule", "Scheduler.update_from_output"} <= set(timed)
    for v in timed.values():
        assert v["ns_bare_call"] > 0
        assert abs(v["ns_plain_wrapper"] - v["ns_exact_wrapper"] - v["ns_exact_saves"]) < 0.25
    worker = [v for v in timed.values() if v["side"] in ("worker", "drafter", "collective")]
    assert out["calls_per_step_worker"] == sum(2 if v["side"] == "collective" else 1 for v in worker)
    saved = out["ns_exact_saves_per_step_worker"]
    assert abs(out["exact_saves_pct_of_gpu_step"] - 100 * saved / 3e6) < 1e-4
