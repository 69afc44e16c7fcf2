"""Collectives inside torch.compile'd code, where vLLM does not route them through its custom ops.

vLLM's ``GroupCoordinator`` sends a collective through ``torch.ops.vllm.*`` only where the platform
says so (``use_custom_op_collectives()``: CUDA, ROCm, XPU); there the compiled graph calls the op at
run time and the op calls ``_all_reduce_out_place``, where the plugin's hook records it. Elsewhere
(the CPU platform) Dynamo traces *through* ``_all_reduce_out_place``, the hook's wrapper included,
into the communicator: the wrapper's body runs once, at trace time, and the compiled code calls the
communicator's C++ op directly from then on. A ledger would hold none of the model's all-reduces,
and ranks that issue different numbers of them (a rank-dependent branch, the seed bug's kind of
divergence) would look the same.

So on such a platform the hook's wrapper, when Dynamo traces it, puts an op of its own into the
graph (``torch.ops.watchdog.all_reduce(x, group)`` etc., the group passed by name as vLLM's own ops
do); at run time that op records the collective (the hook's ``before``) and calls the original
method. Outside a trace the wrapper is the plain hook. The cost is one custom-op dispatch per
collective of the compiled model and, for an all-reduce, a copy of its input (the CPU communicator
reduces in place) -- microseconds on a CPU, where a step takes milliseconds.

No ``from __future__ import annotations``: torch.library reads the ops' annotations as types.
"""

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("watchdog.plugin")

# GroupCoordinator method -> (op name, takes ``dim``)
METHODS: dict[str, tuple[str, bool]] = {
    "_all_reduce_out_place": ("all_reduce", False),
    "_all_gather_out_place": ("all_gather", True),
    "_reduce_scatter_out_place": ("reduce_scatter", True),
}
# op name -> (original method, the hook's before(group, input_)), set when the hooks are installed
_ROUTES: dict[str, tuple[Callable[..., Any], Callable[..., None]]] = {}
_OPS: dict[str, Any] = {}


def needed() -> bool:
    """Whether this process's vLLM platform leaves collectives to Dynamo (False where it cannot tell)."""
    try:
        from vllm.platforms import current_platform

        return not bool(current_platform.use_custom_op_collectives())
    except Exception:
        return False


def _group(name: str) -> Any:
    from vllm.distributed.parallel_state import _groups

    ref = _groups.get(name)
    group = ref() if ref is not None else None
    if group is None:
        raise ValueError(f"watchdog: no GroupCoordinator named {name!r}")
    return group


def _run(op: str, x: Any, group_name: str, *rest: Any) -> Any:
    orig, before = _ROUTES[op]
    group = _group(group_name)
    try:
        before(group, x)
    except Exception as exc:  # recording must never break the model
        _ROUTES[op] = (orig, lambda _g, _x: None)
        log.warning("watchdog: recording compiled %s disabled after an error: %r", op, exc)
    if op == "all_reduce":
        # The CPU communicator reduces in place and returns its input; a custom op may neither mutate
        # an input it did not declare nor return one: reduce a copy (as vLLM's own out-of-place
        # all-reduce does on other platforms).
        x = x.clone()
    out = orig(group, x, *rest)
    return out.clone() if out is x and op != "all_reduce" else out


def _register() -> None:
    if _OPS:
        return
    import torch

    @torch.library.custom_op("watchdog::all_reduce", mutates_args=())
    def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
        return _run("all_reduce", x, group)  # type: ignore[no-any-return]

    @all_reduce.register_fake
    def _(x: torch.Tensor, group: str) -> torch.Tensor:
        return torch.empty_like(x)

    @torch.library.custom_op("watchdog::all_gather", mutates_args=())
    def all_gather(x: torch.Tensor, group: str, dim: int) -> torch.Tensor:
        return _run("all_gather", x, group, dim)  # type: ignore[no-any-return]

    @all_gather.register_fake
    def _(x: torch.Tensor, group: str, dim: int) -> torch.Tensor:
        shape = list(x.shape)
        shape[dim] *= _group(group).world_size
        return x.new_empty(shape)

    @torch.library.custom_op("watchdog::reduce_scatter", mutates_args=())
    def reduce_scatter(x: torch.Tensor, group: str, dim: int) -> torch.Tensor:
        return _run("reduce_scatter", x, group, dim)  # type: ignore[no-any-return]

    @reduce_scatter.register_fake
    def _(x: torch.Tensor, group: str, dim: int) -> torch.Tensor:
        shape = list(x.shape)
        shape[dim] //= _group(group).world_size
        return x.new_empty(shape)

    _OPS.update(all_reduce=all_reduce, all_gather=all_gather, reduce_scatter=reduce_scatter)


def route(
    method: str, orig: Callable[..., Any], hooked: Callable[..., Any], before: Callable[..., None]
) -> Callable[..., Any]:
    """``hooked`` (the plain hook) where collectives reach it at run time; else a wrapper that, under
    a Dynamo trace, calls the watchdog op for ``method`` instead (which records and calls ``orig``)."""
    spec = METHODS.get(method)
    if spec is None or not needed():
        return hooked
    import torch

    op_name, with_dim = spec
    _register()
    _ROUTES[op_name] = (orig, before)
    op = _OPS[op_name]
    compiling = torch.compiler.is_compiling

    if with_dim:

        def routed_dim(self: Any, input_: Any, dim: int = -1) -> Any:
            if compiling():
                return op(input_, self.unique_name, dim)
            return hooked(self, input_, dim)

        return routed_dim

    def routed(self: Any, input_: Any) -> Any:
        if compiling():
            return op(input_, self.unique_name)
        return hooked(self, input_)

    return routed
