"""The translations from vLLM's objects to ledger values: graph keys, dtypes, collectives, batch counts.

No vLLM import here: everything takes plain values or duck-typed vLLM objects (``Any``), so this
module is unit-testable without vLLM. Counts and shapes only: no request id, prompt or token leaves it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from collectors.format import CollectiveOp, CUDAGraphMode, GraphKey

_MODES = {"NONE": CUDAGraphMode.NONE, "PIECEWISE": CUDAGraphMode.PIECEWISE, "FULL": CUDAGraphMode.FULL}

# torch dtype -> the ledger's dtype name (collectors.format.DTYPES); unknown ones read "unknown".
_DTYPE_NAMES = {
    "torch.float32": "float32",
    "torch.float16": "float16",
    "torch.bfloat16": "bfloat16",
    "torch.int32": "int32",
    "torch.int64": "int64",
    "torch.uint8": "uint8",
    "torch.float8_e4m3fn": "float8_e4m3fn",
    "torch.float64": "float64",
    "torch.int8": "int8",
}


def mode_of(mode: Any) -> CUDAGraphMode:
    """vLLM's ``CUDAGraphMode`` member (or its name) as the ledger's mode. Runtime modes are NONE,
    PIECEWISE or FULL; anything else is a KeyError (the hook then disables itself)."""
    return _MODES[getattr(mode, "name", str(mode))]


def key_from_descriptor(mode: Any, desc: Any) -> GraphKey:
    """V1 runner: ``(CUDAGraphMode, BatchDescriptor)`` as the dispatcher returned them."""
    return GraphKey(
        mode=mode_of(mode),
        num_tokens=int(desc.num_tokens),
        num_reqs=None if desc.num_reqs is None else int(desc.num_reqs),
        uniform=bool(desc.uniform),
        has_lora=bool(desc.has_lora),
        num_active_loras=int(getattr(desc, "num_active_loras", 0) or 0),
    )


def key_from_execution_descriptor(desc: Any) -> GraphKey:
    """V2 runner: a ``BatchExecutionDescriptor`` (``uniform_token_count`` set for uniform decode)."""
    loras = int(getattr(desc, "num_active_loras", 0) or 0)
    return GraphKey(
        mode=mode_of(desc.cg_mode),
        num_tokens=int(desc.num_tokens),
        num_reqs=None if desc.num_reqs is None else int(desc.num_reqs),
        uniform=getattr(desc, "uniform_token_count", None) is not None,
        has_lora=loras > 0,
        num_active_loras=loras,
    )


def padded_slots(key: GraphKey, unpadded_reqs: int) -> int:
    """Request slots a FULL graph holds beyond the real requests (seq_len 0 in vLLM)."""
    if key.mode is CUDAGraphMode.FULL and key.num_reqs is not None:
        return max(0, key.num_reqs - unpadded_reqs)
    return 0


_DTYPE_CACHE: dict[Any, str] = {}  # torch.dtype object -> name (str(dtype) costs more than the record)


def dtype_name(dtype: Any) -> str:
    name = _DTYPE_CACHE.get(dtype)
    if name is None:
        name = _DTYPE_NAMES.get(str(dtype), "unknown")
        if len(_DTYPE_CACHE) < 64:
            _DTYPE_CACHE[dtype] = name
    return name


def tensor_op(op: str, group: str, tensor: Any) -> CollectiveOp:
    """A collective on ``tensor`` (or a list of tensors): shapes only, never values."""
    if isinstance(tensor, list | tuple):
        numel = sum(int(t.numel()) for t in tensor)
        dtype = dtype_name(tensor[0].dtype) if tensor else "unknown"
    else:
        numel, dtype = int(tensor.numel()), dtype_name(tensor.dtype)
    return CollectiveOp(op, group, dtype, numel)


@dataclass(frozen=True)
class EngineBatch:
    """What a SchedulerOutput schedules, in counts only (no request ids leave this function)."""

    total_tokens: int
    num_reqs: int
    num_decode_reqs: int
    placeholders: int
    max_query_len: int
    min_query_len: int


def engine_batch(scheduler_output: Any) -> EngineBatch:
    """Counts from vLLM's ``SchedulerOutput``. A decode request is one whose query is exactly its
    one sampled token plus its draft placeholders (``scheduled_spec_decode_tokens``, ``[-1]`` under
    async scheduling)."""
    per_req: dict[Any, int] = scheduler_output.num_scheduled_tokens
    spec: dict[Any, list[int]] = getattr(scheduler_output, "scheduled_spec_decode_tokens", None) or {}
    placeholders = 0
    decode = 0
    for rid, n in per_req.items():
        drafts = len(spec.get(rid, ()))
        placeholders += drafts
        decode += n == 1 + drafts
    lens = per_req.values()
    return EngineBatch(
        total_tokens=int(scheduler_output.total_num_scheduled_tokens),
        num_reqs=len(per_req),
        num_decode_reqs=decode,
        placeholders=placeholders,
        max_query_len=max(lens, default=0),
        min_query_len=min(lens, default=0),
    )


def dispatch_config(cudagraph_mode: Any, capture_sizes: Iterable[int], query_len: int, num_spec: int) -> dict[str, Any]:
    """The worker ledger's ``config`` entry the analyzer reads (watchdog.keys.DispatchConfig + num_spec)."""
    return {
        "cudagraph_mode": getattr(cudagraph_mode, "name", str(cudagraph_mode)),
        "capture_sizes": sorted(int(s) for s in capture_sizes),
        "uniform_decode_query_len": int(query_len),
        "num_speculative_tokens": int(num_spec),
    }
