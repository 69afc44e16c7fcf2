"""``watchdog bench plugin``: what the vLLM plugin's hooks cost per step per rank.

One decode step under FULL_AND_PIECEWISE with MTP=1 goes through four hooks on each rank and
writes one record plus three word stores: ``Worker.execute_model`` (step number, draft
placeholders), the model's graph-key choice (the STEP record: the step's begin with the model
launch), the drafter's graph-key choice (its launch, stored into that record) and
``Worker.sample_tokens`` (the step's end, stored into it too). This times exactly those wrappers
(collectors.vllm.hooks) around do-nothing originals with vLLM's parameters, called the way vLLM
calls them and fed descriptor objects shaped like vLLM's (``BatchDescriptor``, ``CUDAGraphMode``),
so the figure is the plugin's own cost, not vLLM's. Median of ``repeats`` runs. An eager
collective (one record each) is timed separately: eager steps issue one per all-reduce.

The same writes made straight through the recorder (key code pre-computed, as the plugin does)
are timed too (``records_floor``): what any plugin recording them pays. So are the four calls
through wrappers that only forward (``wrapper_frames``) and the two key-cache lookups on their own
(``key_lookups``); with the writes they add up to ``lower_bound``: what a Python plugin recording
the same facts pays before any bookkeeping of its own. All runs alternate within each repeat, so
they see the same machine noise (the CI machine has 2 busy cores: quote medians).
``tests/vllm_dispatch_child.py bench`` times the same wrappers around vLLM's real classes instead
of stand-ins.
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
    from collectors.format import CollectiveOp, CUDAGraphMode, GraphKey, Role
    from collectors.reader import read_ledger
    from collectors.vllm import state, translate
    from collectors.vllm import worker as wrappers
    from collectors.vllm.hooks import Hook, Target, wrap

    full = (_Mode("FULL"), _BatchDescriptor(32, 16, uniform=True), False, None, None)
    drafted = (_Mode("PIECEWISE"), 32, None)

    # Do-nothing originals with the parameters of vLLM 0.20.1's (the wrappers take them over).
    def execute_model(self: Any, scheduler_output: Any) -> Any:
        return None  # async scheduling: sample_tokens returns the output and ends the step

    def sample_tokens(self: Any, grammar_output: Any) -> Any:
        return None

    def determine_batch(
        self: Any,
        num_tokens: int,
        num_reqs: int,
        num_scheduled_tokens_np: Any,
        max_num_scheduled_tokens: int,
        use_cascade_attn: bool,
        allow_microbatching: bool = True,
        force_eager: bool = False,
        force_uniform_decode: bool | None = None,
        force_has_lora: bool | None = None,
        force_num_active_loras: int | None = None,
        num_encoder_reqs: int = 0,
    ) -> Any:
        return full

    def drafter_determine_batch(self: Any, num_tokens: int, use_cudagraphs: bool = True) -> Any:
        return drafted

    def all_reduce(self: Any, input_: Any) -> Any:
        return input_

    def t(name: str) -> Target:
        return Target("bench", name, (), "bench")

    with tempfile.TemporaryDirectory(prefix="watchdog-bench-plugin-") as d:
        old = os.environ.get(state.ENV_LEDGER_DIR)
        os.environ[state.ENV_LEDGER_DIR] = d
        # A private ProcessState: the hooks read the module global, swapped for the run.
        saved = getattr(wrappers, "STATE")  # noqa: B009
        proc = state.ProcessState()
        setattr(wrappers, "STATE", proc)  # noqa: B010
        try:
            proc.worker(lambda: (0, 2, translate.dispatch_config("FULL_AND_PIECEWISE", (2, 4, 8, 16, 32), 2, 1)))
            execute = wrappers._execute_model(Hook(t("execute_model")), execute_model)
            sample = wrappers._sample_tokens(Hook(t("sample_tokens")), sample_tokens)
            model = wrappers._v1_model_dispatch(Hook(t("model")), determine_batch)
            drafter = wrappers._v1_drafter_dispatch(Hook(t("drafter")), drafter_determine_batch)
            coll = wrappers._collective("all_reduce", "_all_reduce_out_place")(Hook(t("coll")), all_reduce)
            owner, out, tensor = _Owner(), _SchedulerOutput(reqs), _Tensor()

            def step_through(execute: Any, model: Any, drafter: Any, sample: Any) -> Callable[[], None]:
                def step() -> None:  # the calls as vLLM's GPUModelRunner and Worker make them
                    execute(owner, out)
                    model(
                        owner,
                        num_tokens=2 * reqs,
                        num_reqs=reqs,
                        num_scheduled_tokens_np=None,
                        max_num_scheduled_tokens=2,
                        use_cascade_attn=False,
                        num_encoder_reqs=0,
                    )
                    drafter(owner, 2 * reqs)
                    sample(owner, None)

                return step

            hooked_step = step_through(execute, model, drafter, sample)
            bare_step = step_through(execute_model, determine_batch, drafter_determine_batch, sample_tokens)
            # The same four calls through wrappers that do nothing but forward: the frames alone.
            originals = (execute_model, determine_batch, drafter_determine_batch, sample_tokens)
            frames_step = step_through(*(wrap(Hook(t(f.__name__)), f) for f in originals))

            ws = proc.current_worker()
            assert ws is not None
            rec = ws.rec
            key = GraphKey(CUDAGraphMode.FULL, 32, 16, uniform=True)
            dkey = GraphKey(CUDAGraphMode.PIECEWISE, 32)
            # The two graphs captured, as vLLM captures them at start-up: their manifests are recorded.
            ws.begin_capture()
            for role, k in ((Role.MODEL, key), (Role.DRAFTER, dkey)):
                ws.dispatched(role, k, 0, 0, 0)
                ws.collective(CollectiveOp("all_reduce", "tp", "bfloat16", 4096 * k.num_tokens), lambda: True)
            ws.end_capture()
            h, hd = rec.recorded_manifest(Role.MODEL, key), rec.recorded_manifest(Role.DRAFTER, dkey)

            def floor_step() -> None:  # the same writes, no hook
                rec.step_begin(
                    0,
                    key,
                    unpadded_tokens=2 * reqs,
                    unpadded_reqs=reqs,
                    padded_reqs=1,
                    placeholders=reqs,
                    launch_manifest=h,
                )
                rec.launch(0, Role.DRAFTER, dkey, hd)
                rec.step_end(0, True)

            def cursor() -> int:
                return read_ledger(rec.path).cursor

            before = cursor()
            hooked_step()
            records_per_step = cursor() - before  # the decode step's own records (1: parts stored in place)

            keys: dict[Any, Any] = {}
            model_out, drafter_out = full, drafted

            def lookups_step() -> None:  # the two cache lookups the hooks make to find their keys
                mode, d = model_out[0], model_out[1]
                keys.get((id(mode), d.num_tokens, d.num_reqs, d.uniform, d.has_lora, d.num_active_loras))
                keys.get((id(drafter_out[0]), drafter_out[1]))

            def nothing() -> None:
                pass

            def eager() -> None:
                coll(owner, tensor)

            timed = [hooked_step, bare_step, floor_step, frames_step, lookups_step, nothing]
            runs = _interleaved(timed, steps, repeats)
            hooked, base, floor, framed, looked, empty = (statistics.median(r) for r in runs)
            hooked_runs, bare_runs = runs[0], runs[1]
            floor -= empty
            lower = floor + (framed - base) + (looked - empty)
            per_run = sorted((h - b) / 1000 for h, b in zip(hooked_runs, bare_runs, strict=True))
            ws.next_step()  # eager collectives are recorded inside a step
            coll_ns = _median_ns(eager, steps, repeats)
            ledger_ok = ws.rec.enabled
            ws.rec.close()
        finally:
            setattr(wrappers, "STATE", saved)  # noqa: B010
            if old is None:
                os.environ.pop(state.ENV_LEDGER_DIR, None)
            else:
                os.environ[state.ENV_LEDGER_DIR] = old
    per_step_us = (hooked - base) / 1000
    return {
        "schema": SCHEMA,
        "step": f"decode, {reqs} requests x 2 tokens, FULL model graph + PIECEWISE drafter "
        "(4 hooks, 1 record + 3 word stores)",
        "us_per_step_median": round(per_step_us, 3),
        "us_per_step_runs": [round(x, 3) for x in per_run],
        "us_records_floor_median": round(floor / 1000, 3),
        "us_plugin_own_median": round(per_step_us - floor / 1000, 3),
        "us_wrapper_frames_median": round((framed - base) / 1000, 3),
        "us_key_lookups_median": round((looked - empty) / 1000, 3),
        "us_lower_bound": round(lower / 1000, 3),
        "us_per_eager_collective_median": round(coll_ns / 1000, 3),
        "records_per_step": records_per_step,
        "target_us_per_step": TARGET_US_PER_STEP,
        "within_target": per_step_us < TARGET_US_PER_STEP,
        "ledger_enabled_throughout": ledger_ok,
        "steps": steps,
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
    }
