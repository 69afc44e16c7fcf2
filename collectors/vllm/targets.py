"""Where the plugin hooks real vLLM.

Every hook target is named once, in ``TARGETS``, with the parameters the wrapper relies on; the
contract tests (tests/test_vllm_contract.py) check that list against each supported vLLM, so a
target that moves fails loudly, by name. Targets are found by feature detection (import the
module, look the attribute up), never by comparing version strings: a runner generation whose
classes are absent is simply not hooked.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

# Set on every installed wrapper: plugins load more than once per process, a target is wrapped once.
WRAPPED = "__watchdog_wrapped__"


@dataclass(frozen=True)
class Target:
    """One attribute of vLLM the plugin wraps: ``module:Class.method``, with the leading parameters
    (after ``self``) the wrapper reads or passes on by position."""

    module: str
    qualname: str
    params: tuple[str, ...]
    group: str  # "v1" (GPUModelRunner, 0.20.x), "v2" (vllm/v1/worker/gpu, 0.33.x), "worker", "comm", "engine"

    @property
    def name(self) -> str:
        return f"{self.module}:{self.qualname}"


PARALLEL_STATE = "vllm.distributed.parallel_state"
_V1 = "vllm.v1.worker.gpu_model_runner"
_V2 = "vllm.v1.worker.gpu.cudagraph_utils"

TARGETS: tuple[Target, ...] = (
    # graph-key choice, V1 runner and its drafter
    Target(_V1, "GPUModelRunner._determine_batch_execution_and_padding", ("num_tokens", "num_reqs"), "v1"),
    Target(_V1, "GPUModelRunner.capture_model", (), "v1"),
    Target(
        "vllm.v1.spec_decode.llm_base_proposer",
        "SpecDecodeBaseProposer._determine_batch_execution_and_padding",
        ("num_tokens",),
        "v1",
    ),
    # graph-key choice, V2 runner (target and drafter managers alike)
    Target(
        _V2,
        "CudaGraphManager.dispatch",
        ("num_reqs", "num_tokens", "uniform_token_count"),  # num_active_loras came after 0.20.1
        "v2",
    ),
    Target(_V2, "CudaGraphManager.capture", ("create_forward_fn",), "v2"),
    # step boundaries, both generations: one execute_model RPC per engine step on every rank
    Target("vllm.v1.worker.gpu_worker", "Worker.execute_model", ("scheduler_output",), "worker"),
    Target("vllm.v1.worker.gpu_worker", "Worker.sample_tokens", ("grammar_output",), "worker"),
    # collectives through GroupCoordinator (the *_out_place methods are what both the direct call and
    # the torch.compile custom op reach, so each collective is seen once)
    Target(PARALLEL_STATE, "GroupCoordinator._all_reduce_out_place", ("input_",), "comm"),
    Target(PARALLEL_STATE, "GroupCoordinator._all_gather_out_place", ("input_", "dim"), "comm"),
    Target(PARALLEL_STATE, "GroupCoordinator._reduce_scatter_out_place", ("input_", "dim"), "comm"),
    Target(PARALLEL_STATE, "GroupCoordinator.all_gatherv", ("input_",), "comm"),
    Target(PARALLEL_STATE, "GroupCoordinator.reduce_scatterv", ("input_",), "comm"),
    Target(PARALLEL_STATE, "GroupCoordinator.broadcast", ("input_",), "comm"),
    Target(PARALLEL_STATE, "get_tp_group", (), "comm"),
    # engine side: the referee ledger and the shm rings
    Target("vllm.v1.executor.multiproc_executor", "MultiprocExecutor._init_executor", (), "engine"),
    Target("vllm.v1.executor.multiproc_executor", "MultiprocExecutor.execute_model", ("scheduler_output",), "engine"),
    Target("vllm.v1.core.sched.scheduler", "Scheduler.schedule", (), "engine"),
    Target(
        "vllm.v1.core.sched.scheduler",
        "Scheduler.update_from_output",
        ("scheduler_output", "model_runner_output"),
        "engine",
    ),
)

COLLECTIVE_OPS: dict[str, str] = {
    "_all_reduce_out_place": "all_reduce",
    "_all_gather_out_place": "all_gather",
    "_reduce_scatter_out_place": "reduce_scatter",
    "all_gatherv": "all_gatherv",  # sizes per rank differ by design: never compared by numel
    "reduce_scatterv": "reduce_scatterv",
    "broadcast": "broadcast",
}


def resolve(target: Target) -> tuple[Any, str, Any]:
    """(owner, attribute, current value) of a target; ImportError / AttributeError if it is gone."""
    owner: Any = importlib.import_module(target.module)
    *path, attr = target.qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attr, getattr(owner, attr)
