"""``watchdog bench plugin``: what the vLLM plugin's hooks cost per step per rank.

One decode step under FULL_AND_PIECEWISE with MTP=1 goes through four hooks on each rank and
writes three records: ``Worker.execute_model`` (step number, draft placeholders), the model's
graph-key choice (the step's begin with the model launch folded in: one ``STEP_BEGIN_LAUNCH``
record), the drafter's graph-key choice (``LAUNCH``) and ``Worker.sample_tokens`` (``STEP_END``).
This times exactly those wrappers (collectors.vllm.hooks) around do-nothing originals, fed
descriptor objects shaped like vLLM's (``BatchDescriptor``, ``CUDAGraphMode``), so the figure is
the plugin's own cost, not vLLM's. Median of ``repeats`` runs. An eager collective (one record
each) is timed separately: eager steps issue one per all-reduce.

The same three records written straight through the recorder (keys pre-packed, as the plugin
does) are timed too (``records_floor``): what any plugin recording them pays. Bare, hooked and
floor runs alternate within each repeat, so all three see the same machine noise (the CI machine
has 2 busy cores: quote medians). ``tests/vllm_dispatch_child.py bench`` times the same wrappers
around vLLM's real classes instead of stand-ins.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SCHEMA = "watchdog.bench.plugin/v1"
TARGET_US_PER_STEP = 2.0


@dataclass(frozen=True)
class _Mode:
    name: str


@dataclass(frozen=True)
class _BatchDescriptor:  # the fields of vllm.forward_context.BatchDescriptor the hook reads
    num_tokens: int
    num_reqs: int | None = None
    uniform: bool = False
    has_lora: bool = False
    num_active_loras: int = 0


class _Tensor:
    dtype = "torch.bfloat16"

    def numel(self) -> int:
        return 4096


class _Config:
    class compilation_config:  # mirrors vllm_config.compilation_config
        cudagraph_mode = _Mode("FULL_AND_PIECEWISE")
        cudagraph_capture_sizes = (2, 4, 8, 16, 24, 32, 40, 48)

    class speculative_config:
        num_speculative_tokens = 1


class _Owner:
    vllm_config = _Config
    unique_name = "tp:0"


class _SchedulerOutput:
    def __init__(self, reqs: int) -> None:
        self.scheduled_spec_decode_tokens = {i: [-1] for i in range(reqs)}


def _median_ns(fn: Callable[[], None], n: int, repeats: int) -> float:
    return statistics.median(_interleaved([fn], n, repeats)[0])


def _interleaved(fns: list[Callable[[], None]], n: int, repeats: int) -> list[list[float]]:
    """ns per call of each function, ``repeats`` runs each, the functions alternating run by run."""
    runs: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter_ns()
            for _ in range(n):
                fn()
            runs[i].append((time.perf_counter_ns() - t0) / n)
    return runs


def bench_plugin(*, steps: int = 20000, repeats: int = 7, reqs: int = 15) -> dict[str, Any]:
    """Median ns per step (hooked minus bare) for a ``reqs`` x 2-token decode step, and per eager collective."""
    from collectors.format import CUDAGraphMode, GraphKey, Role, pack_key, pack_launch
    from collectors.vllm import hooks, state
    from collectors.vllm.hooks import Hook, Target

    def bare(self: Any, *a: Any, **k: Any) -> Any:
        return None

    full = (_Mode("FULL"), _BatchDescriptor(32, 16, uniform=True), False, None, None)
    drafted = (_Mode("PIECEWISE"), 32, None)

    def t(name: str) -> Target:
        return Target("bench", name, (), "bench")

    with tempfile.TemporaryDirectory(prefix="watchdog-bench-plugin-") as d:
        old = os.environ.get(state.ENV_LEDGER_DIR)
        os.environ[state.ENV_LEDGER_DIR] = d
        # A private ProcessState: the hooks read the module global, swapped for the run.
        saved = getattr(hooks, "STATE")  # noqa: B009
        proc = state.ProcessState()
        setattr(hooks, "STATE", proc)  # noqa: B010
        try:
            proc.worker(lambda: (0, 2, state.dispatch_config("FULL_AND_PIECEWISE", (2, 4, 8, 16, 32), 2, 1)))
            execute = hooks._execute_model(Hook(t("execute_model")), bare)
            sample = hooks._sample_tokens(Hook(t("sample_tokens")), bare)
            model = hooks._v1_model_dispatch(Hook(t("model")), lambda self, n, r, *a, **k: full)
            drafter = hooks._v1_drafter_dispatch(Hook(t("drafter")), lambda self, n, *a, **k: drafted)
            coll = hooks._collective("all_reduce")(Hook(t("coll")), lambda self, x, *a, **k: x)
            owner, out, tensor = _Owner(), _SchedulerOutput(reqs), _Tensor()

            def hooked_step() -> None:
                execute(owner, out)
                model(owner, 2 * reqs, reqs)
                drafter(owner, 2 * reqs)
                sample(owner, None)

            def bare_step() -> None:
                bare(owner, out)
                bare(owner, 2 * reqs, reqs)
                bare(owner, 2 * reqs)
                bare(owner, None)

            ws = proc.current_worker()
            assert ws is not None
            rec = ws.rec
            key = GraphKey(CUDAGraphMode.FULL, 32, 16, uniform=True)
            dkey = GraphKey(CUDAGraphMode.PIECEWISE, 32)

            packed_key, drafter_launch = pack_key(key), pack_launch(Role.DRAFTER, dkey, 0)

            def floor_step() -> None:  # the same three records, no hook
                rec.step_begin_packed(0, packed_key, 2 * reqs, reqs, 1, reqs, 0)
                rec.launch_packed(0, drafter_launch)
                rec.step_end(0, True)

            def eager() -> None:
                coll(owner, tensor)

            hooked_runs, bare_runs, floor_runs = _interleaved([hooked_step, bare_step, floor_step], steps, repeats)
            hooked = statistics.median(hooked_runs)
            base = statistics.median(bare_runs)
            floor = statistics.median(floor_runs)
            per_run = sorted((h - b) / 1000 for h, b in zip(hooked_runs, bare_runs, strict=True))
            ws.next_step()  # eager collectives are recorded inside a step
            coll_ns = _median_ns(eager, steps, repeats)
            ledger_ok = ws.rec.enabled
            ws.rec.close()
        finally:
            setattr(hooks, "STATE", saved)  # noqa: B010
            if old is None:
                os.environ.pop(state.ENV_LEDGER_DIR, None)
            else:
                os.environ[state.ENV_LEDGER_DIR] = old
    per_step_us = (hooked - base) / 1000
    return {
        "schema": SCHEMA,
        "step": f"decode, {reqs} requests x 2 tokens, FULL model graph + PIECEWISE drafter (4 hooks, 3 records)",
        "us_per_step_median": round(per_step_us, 3),
        "us_per_step_runs": [round(x, 3) for x in per_run],
        "us_records_floor_median": round(floor / 1000, 3),
        "us_plugin_own_median": round(per_step_us - floor / 1000, 3),
        "us_per_eager_collective_median": round(coll_ns / 1000, 3),
        "target_us_per_step": TARGET_US_PER_STEP,
        "within_target": per_step_us < TARGET_US_PER_STEP,
        "ledger_enabled_throughout": ledger_ok,
        "steps": steps,
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
    }
