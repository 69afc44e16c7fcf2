"""Runs inside a real-vLLM environment (tests/vllm_envs.py): vLLM's real ``CudagraphDispatcher``
driven through the plugin's installed hooks. Prints one ``RESULT {json}`` line.

What is real here: vLLM's ``CompilationConfig`` (FULL_AND_PIECEWISE, VLLM_COMPILE, attention
splitting ops, MTP=1 capture sizes), its ``ParallelConfig``, its TP group (gloo, world size 1, made
by ``init_distributed_environment`` / ``ensure_model_parallel_initialized``: the plugin reads the rank
from ``get_tp_group()`` as it does in a worker), its ``CudagraphDispatcher`` (the target model's and
the MTP drafter's, keys initialised the way the runner and ``SpecDecodeBaseProposer`` do), and the
methods the plugin wraps: ``Worker.execute_model`` / ``Worker.sample_tokens`` (their real bodies),
``GPUModelRunner._determine_batch_execution_and_padding`` and
``SpecDecodeBaseProposer._determine_batch_execution_and_padding`` (real bodies, called unbound on
small stand-in objects that carry exactly the attributes those bodies read). No model, no GPU.

Modes:
  dispatch  run the seed's batch shapes as steps; print what vLLM returned per step (the ledger is
            read by the test, with the project's reader).
  dispatch_v2  the same shapes through the V2 runner's real ``ModelCudaGraphManager.dispatch``.
  bench     time one 15 x 2 decode step through the real wrapped methods with the hooks vs the
            unwrapped originals, alternating blocks; print medians.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any

CAPTURE_SIZES = [2, 4, 8, 16, 24, 32, 40, 48]  # MTP=1: multiples of 1 + num_speculative_tokens
MAX_NUM_SEQS = 128
NUM_SPEC = 1

# (name, per-request scheduled tokens, requests with one draft placeholder)
STEPS: list[tuple[str, list[int], int]] = [
    ("15x2", [2] * 15, 15),
    ("16x2", [2] * 16, 16),
    ("17x2", [2] * 17, 17),
    ("mixed prefill", [2, 2, 2, 24], 3),
    ("3x2", [2] * 3, 3),
    ("long prefill", [300], 0),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup() -> dict[str, Any]:
    from vllm.config import CacheConfig, CompilationConfig, CUDAGraphMode, ParallelConfig, set_current_vllm_config
    from vllm.config.compilation import CompilationMode
    from vllm.distributed import parallel_state as ps
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from collectors.vllm.hooks import install

    cc = CompilationConfig(
        mode=CompilationMode.VLLM_COMPILE,
        cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE,
        splitting_ops=list(CompilationConfig._attention_ops),
        cudagraph_capture_sizes=list(CAPTURE_SIZES),
        max_cudagraph_capture_size=max(CAPTURE_SIZES),
    )
    pc = ParallelConfig()
    vc = SimpleNamespace(
        compilation_config=cc,
        parallel_config=pc,
        cache_config=CacheConfig(),
        num_speculative_tokens=NUM_SPEC,
        speculative_config=SimpleNamespace(
            num_speculative_tokens=NUM_SPEC, enforce_eager=False, uses_dynamic_speculative_decoding=lambda: False
        ),
        lora_config=None,
        scheduler_config=SimpleNamespace(max_num_seqs=MAX_NUM_SEQS),
        observability_config=SimpleNamespace(cudagraph_metrics=False),
        model_config=None,
        engram_config=None,
    )
    # vLLM's own TP group, as a worker has it (gloo on CPU, one rank).
    with set_current_vllm_config(vc):  # type: ignore[arg-type]
        ps.init_distributed_environment(
            world_size=1,
            rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
            local_rank=0,
            backend="gloo",
        )
        ps.ensure_model_parallel_initialized(1, 1)

    target = CudagraphDispatcher(vc)  # type: ignore[arg-type]
    target.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE, uniform_decode_query_len=1 + NUM_SPEC)
    drafter_dispatcher = CudagraphDispatcher(vc)  # type: ignore[arg-type]
    # SpecDecodeBaseProposer.initialize_cudagraph_keys: PIECEWISE when the mixed mode is PIECEWISE or FULL
    drafter_dispatcher.initialize_cudagraph_keys(
        CUDAGraphMode.PIECEWISE
        if CUDAGraphMode.FULL_AND_PIECEWISE.mixed_mode() in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL)
        else CUDAGraphMode.NONE
    )

    originals = {
        "execute": Worker.execute_model,
        "sample": Worker.sample_tokens,
        "determine": GPUModelRunner._determine_batch_execution_and_padding,
        "draft": SpecDecodeBaseProposer._determine_batch_execution_and_padding,
    }
    installed = install(frozenset({"v1", "worker"}))
    hooked = {
        "execute": Worker.execute_model,
        "sample": Worker.sample_tokens,
        "determine": GPUModelRunner._determine_batch_execution_and_padding,
        "draft": SpecDecodeBaseProposer._determine_batch_execution_and_padding,
    }
    cascade = "use_cascade_attn" in inspect.signature(originals["determine"]).parameters

    class Drafter:  # what SpecDecodeBaseProposer._determine_batch_execution_and_padding reads
        def __init__(self) -> None:
            self.vllm_config = vc
            self.cudagraph_dispatcher = drafter_dispatcher

    class Runner:  # what GPUModelRunner._determine_batch_execution_and_padding reads
        _is_uniform_decode = staticmethod(GPUModelRunner._is_uniform_decode)
        if hasattr(GPUModelRunner, "_pad_for_sequence_parallelism"):  # 0.20.x
            _pad_for_sequence_parallelism = GPUModelRunner._pad_for_sequence_parallelism

        def __init__(self) -> None:
            self.vllm_config = vc
            self.compilation_config = cc
            self.parallel_config = pc
            self.uniform_decode_query_len = 1 + NUM_SPEC
            self.model_config = SimpleNamespace(is_encoder_decoder=False)
            self.input_batch = SimpleNamespace(lora_id_to_lora_request={})
            self.cudagraph_dispatcher = target
            self.drafter = Drafter()
            self.fns = hooked
            self.returned: list[dict[str, Any]] = []

        def execute_model(self, so: Any, intermediate_tensors: Any = None) -> None:
            import numpy as np

            counts = np.array(list(so.num_scheduled_tokens.values()), dtype=np.int32)
            kwargs: dict[str, Any] = {"use_cascade_attn": False} if cascade else {}
            mode, desc, *_ = self.fns["determine"](
                self,
                num_tokens=int(so.total_num_scheduled_tokens),
                num_reqs=len(counts),
                num_scheduled_tokens_np=counts,
                max_num_scheduled_tokens=int(counts.max()),
                **kwargs,
            )
            dmode, dpadded, _ = self.fns["draft"](self.drafter, int(so.total_num_scheduled_tokens))
            self.returned.append(
                {
                    "model": [mode.name, desc.num_tokens, desc.num_reqs, desc.uniform, desc.has_lora],
                    "drafter": [dmode.name, int(dpadded)],
                }
            )
            return None  # sampling deferred to sample_tokens, as vLLM's V1 runner does

        def sample_tokens(self, grammar_output: Any) -> Any:
            return SimpleNamespace(sampled=True)

    class StandInWorker:  # what Worker.execute_model / sample_tokens read
        def __init__(self) -> None:
            self.vllm_config = vc
            self.model_runner = Runner()
            self._pp_send_work: list[Any] = []
            self.use_v2_model_runner = False

        def annotate_profile(self, so: Any) -> Any:
            return contextlib.nullcontext()

    return {
        "worker": StandInWorker(),
        "originals": originals,
        "hooked": hooked,
        "installed": sorted(installed.hooks),
    }


def scheduler_output(per_req: list[int], drafted: int) -> Any:
    """Counts only, shaped like vLLM's SchedulerOutput (``[-1]``: an async-scheduling placeholder)."""
    tokens = {f"r{i}": n for i, n in enumerate(per_req)}
    spec = {f"r{i}": [-1] * NUM_SPEC for i in range(drafted)}
    return SimpleNamespace(
        total_num_scheduled_tokens=sum(per_req), num_scheduled_tokens=tokens, scheduled_spec_decode_tokens=spec
    )


def run_steps(env: dict[str, Any], installed: list[str], returned: list[Any]) -> dict[str, Any]:
    """Run ``STEPS`` through the hooked ``Worker.execute_model`` / ``sample_tokens``, close the ledger,
    and say what was hooked, what vLLM returned per step and where the ledger is."""
    w = env["worker"]
    fns = env["hooked"]
    for _, per_req, drafted in STEPS:
        so = scheduler_output(per_req, drafted)
        fns["execute"](w, so)
        fns["sample"](w, None)
    from collectors.vllm.state import STATE

    ws = STATE.current_worker()
    if ws is not None:
        ws.rec.close()
    return {
        "installed": installed,
        "steps": [{"name": n, "per_req": p, "drafted": d} for n, p, d in STEPS],
        "returned": returned,
        "ledger": None if ws is None else str(ws.rec.path),
    }


def run_dispatch() -> dict[str, Any]:
    env = setup()
    return run_steps(env, env["installed"], env["worker"].model_runner.returned)


def run_dispatch_v2() -> dict[str, Any]:
    """The V2 runner's dispatch (``vllm/v1/worker/gpu``): vLLM's real ``ModelCudaGraphManager``, its
    candidates built by its own code from the real ``CompilationConfig``, called the way the V2 runner
    calls it inside the real ``Worker.execute_model``; the plugin's hook on ``CudaGraphManager.dispatch``
    records what it returns. Two stand-ins for what needs a GPU: the platform's CUDA graph memory pool,
    and the capture itself (the manager dispatches to graphs only once ``capture`` has set
    ``_graphs_captured``; capturing needs CUDA)."""
    env = setup()
    import torch
    from vllm.config import CUDAGraphMode, set_current_vllm_config
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu.cudagraph_utils import ModelCudaGraphManager

    from collectors.vllm.hooks import install

    installed = install(frozenset({"v2"}))
    w = env["worker"]
    vc = w.vllm_config
    type(current_platform)._global_graph_pool = object()  # stand-in: no CUDA graph pool on CPU
    with set_current_vllm_config(vc):
        mgr = ModelCudaGraphManager(vc, torch.device("cpu"), CUDAGraphMode.FULL_AND_PIECEWISE, 1 + NUM_SPEC)
    mgr._graphs_captured = True  # stand-in for capture(), which ends by setting it
    loras = "num_active_loras" in inspect.signature(ModelCudaGraphManager.dispatch).parameters
    returned: list[list[Any]] = []

    class RunnerV2:  # calls dispatch as the V2 runner does: requests, tokens, uniform query length
        def execute_model(self, so: Any, intermediate_tensors: Any = None) -> None:
            per_req = list(so.num_scheduled_tokens.values())
            uniform = per_req[0] if len(set(per_req)) == 1 else None
            args = [len(per_req), int(so.total_num_scheduled_tokens), uniform] + ([0] if loras else [])
            d = mgr.dispatch(*args)
            returned.append([d.cg_mode.name, d.num_tokens, d.num_reqs, d.uniform_token_count])
            return None

        def sample_tokens(self, grammar_output: Any) -> Any:
            return SimpleNamespace(sampled=True)

    w.model_runner = RunnerV2()
    return run_steps(env, sorted(installed.hooks), returned)


def captured_graphs() -> None:
    """Stand in for vLLM's graph capture at start-up (it needs a GPU): the plugin records the manifests
    of the two graphs a 15 x 2 decode step replays, so its launches take the path they take in service."""
    from collectors.format import CollectiveOp, CUDAGraphMode, GraphKey, Role
    from collectors.vllm.hooks import STATE

    ws = STATE.ws
    assert ws is not None
    ws.begin_capture()
    for role, key in (
        (Role.MODEL, GraphKey(CUDAGraphMode.FULL, 32, 16, uniform=True)),
        (Role.DRAFTER, GraphKey(CUDAGraphMode.PIECEWISE, 32)),
    ):
        ws.dispatched(role, key, 0, 0, 0)
        ws.collective(CollectiveOp("all_reduce", "tp", "bfloat16", 4096 * key.num_tokens), lambda: True)
    ws.end_capture()


def run_bench(blocks: int = 30, n: int = 1000) -> dict[str, Any]:
    env = setup()
    w = env["worker"]
    runner = w.model_runner
    so = scheduler_output([2] * 15, 15)

    def block(fns: dict[str, Any]) -> float:
        runner.fns = fns
        execute, sample = fns["execute"], fns["sample"]
        t0 = time.perf_counter_ns()
        for _ in range(n):
            execute(w, so)
            sample(w, None)
        return (time.perf_counter_ns() - t0) / n / 1000

    for _ in range(2):  # warm-up: ledger open, caches filled
        block(env["hooked"])
        block(env["originals"])
    captured_graphs()
    runner.returned.clear()
    hooked, bare = [], []
    for i in range(blocks):  # alternating which goes first: no order bias
        if i % 2:
            bare.append(block(env["originals"]))
            hooked.append(block(env["hooked"]))
        else:
            hooked.append(block(env["hooked"]))
            bare.append(block(env["originals"]))
    runner.returned.clear()
    diffs = sorted(h - b for h, b in zip(hooked, bare, strict=True))
    return {
        "step": "15 requests x 2 tokens: Worker.execute_model -> GPUModelRunner/SpecDecodeBaseProposer "
        "._determine_batch_execution_and_padding (real CudagraphDispatcher) -> Worker.sample_tokens",
        "us_per_step_hooked_median": round(statistics.median(hooked), 3),
        "us_per_step_bare_median": round(statistics.median(bare), 3),
        "us_plugin_per_step_median": round(statistics.median(diffs), 3),
        "us_plugin_per_step_blocks": [round(d, 3) for d in diffs],
        "blocks": blocks,
        "steps_per_block": n,
        "cpu_count": os.cpu_count(),
    }


if __name__ == "__main__":
    mode = sys.argv[1]
    out = {"dispatch": run_dispatch, "dispatch_v2": run_dispatch_v2, "bench": run_bench}[mode]()
    from importlib.metadata import version

    out["vllm"] = version("vllm")
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)  # skip interpreter teardown of vLLM's process groups (it can hang on some versions)
