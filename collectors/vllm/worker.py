"""The worker-side wrappers: graph-key choice, graph capture, step boundaries and collectives.

Each wrapper maker takes the hook's switch and the original and returns the wrapper
(``collectors.vllm.wrap``'s forwarder around the hook's bodies). All of them write through this process's
``STATE`` (collectors.vllm.state), which opens the worker ledger on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from collectors.format import GraphKey, Role
from collectors.vllm import compiled
from collectors.vllm.state import STATE, WorkerState
from collectors.vllm.targets import COLLECTIVE_OPS, PARALLEL_STATE
from collectors.vllm.translate import (
    dispatch_config,
    dtype_name,
    key_from_descriptor,
    key_from_execution_descriptor,
    mode_of,
    tensor_op,
)
from collectors.vllm.wrap import Hook, wrap

# ---- worker-side description (rank, TP size, dispatcher config) -----------------------


def _describe(vllm_config: Any) -> Callable[[], tuple[int, int, dict[str, Any]]]:
    def describe() -> tuple[int, int, dict[str, Any]]:
        ps = importlib.import_module(PARALLEL_STATE)
        tp = ps.get_tp_group()
        comp = vllm_config.compilation_config
        spec = getattr(vllm_config, "speculative_config", None)
        num_spec = int(getattr(spec, "num_speculative_tokens", 0) or 0) if spec is not None else 0
        sizes = getattr(comp, "cudagraph_capture_sizes", None) or []
        config = dispatch_config(comp.cudagraph_mode, sizes, 1 + num_spec, num_spec)
        return int(tp.rank_in_group), int(tp.world_size), config

    return describe


def _worker_of(obj: Any) -> WorkerState | None:
    """This process's worker ledger; the first call creates it (from ``obj.vllm_config``)."""
    state = STATE
    ws = state.ws
    if ws is not None or state.worker_gave_up:
        return ws
    return state.worker(_describe(obj.vllm_config))


# ---- graph keys -------------------------------------------------------------------------
# Each key is translated once per process and cached in ``WorkerState.keys``. The cache key is a
# tuple of the descriptor's plain fields and ``id(mode)``: vLLM's descriptors are frozen dataclasses
# and its CUDAGraphMode an Enum, whose hashes run Python code; ints, bools and None hash in C. The
# cached entry keeps the mode object (``Keyed.src``) and is used only if it is that same object.


def _v1_model_dispatch(hook: Hook, orig: Any) -> Callable[..., Any]:
    def after(self: Any, num_tokens: int, num_reqs: int, out: Any) -> None:
        ws = STATE.ws or _worker_of(self)
        if ws is not None:
            mode, d = out[0], out[1]
            ck = (id(mode), d.num_tokens, d.num_reqs, d.uniform, d.has_lora, getattr(d, "num_active_loras", 0))
            k = ws.keys.get(ck)
            if k is None or k.src is not mode:
                k = ws.keyed(ck, key_from_descriptor(mode, d), mode)
            ws.launch(0, k, num_tokens, num_reqs)

    return wrap(hook, orig, ("num_tokens", "num_reqs"), after=after)


def _v1_drafter_dispatch(hook: Hook, orig: Any) -> Callable[..., Any]:
    def after(self: Any, num_tokens: int, out: Any) -> None:
        ws = STATE.ws or _worker_of(self)
        if ws is not None:
            mode, padded = out[0], out[1]
            ck = (id(mode), padded)
            k = ws.keys.get(ck)
            if k is None or k.src is not mode:
                k = ws.keyed(ck, GraphKey(mode_of(mode), int(padded)), mode)
            ws.launch(1, k, num_tokens, 0)

    return wrap(hook, orig, ("num_tokens",), after=after)


def _v2_role(manager: Any) -> Role | None:
    name = type(manager).__name__
    if name.startswith("Model"):
        return Role.MODEL
    if "Speculator" in name or "DFlash" in name or "Eagle" in name:
        return Role.DRAFTER
    return None  # encoder graphs and the like: not part of the step's collective sequence


_V2_ROLES: dict[type, int] = {}  # manager class -> int(Role), -1: not hooked (encoder graphs and the like)


def _v2_dispatch(hook: Hook, orig: Any) -> Callable[..., Any]:
    def after(self: Any, num_reqs: int, num_tokens: int, out: Any) -> None:
        role = _V2_ROLES.get(type(self))
        if role is None:
            r = _v2_role(self)
            role = _V2_ROLES[type(self)] = -1 if r is None else int(r)
        ws = (STATE.ws or _worker_of(self)) if role >= 0 else None
        if ws is not None:
            mode = out.cg_mode
            loras = getattr(out, "num_active_loras", 0)  # absent in 0.20.x
            ck = (id(mode), out.num_tokens, out.num_reqs, out.uniform_token_count, loras)
            k = ws.keys.get(ck)
            if k is None or k.src is not mode:
                k = ws.keyed(ck, key_from_execution_descriptor(out), mode)
            ws.launch(role, k, num_tokens, num_reqs)

    return wrap(hook, orig, ("num_reqs", "num_tokens"), after=after)


def _capturing() -> bool:
    torch = importlib.import_module("torch")
    return bool(torch.cuda.is_current_stream_capturing())


def _capture_phase(hook: Hook, ws_of: Callable[[Any], WorkerState | None], body: Callable[..., Any]) -> Any:
    """Run ``body`` (the original capture) with the worker's capture phase open around it."""

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        ws: WorkerState | None = None
        if hook.on:
            try:
                ws = ws_of(self)
                if ws is not None:
                    ws.begin_capture()
            except Exception as exc:
                hook.fail(exc)
        try:
            return body(self, *args, **kwargs)
        finally:
            if ws is not None and hook.on:
                try:
                    ws.end_capture()
                except Exception as exc:
                    hook.fail(exc)

    return run


def _v1_capture(hook: Hook, orig: Any) -> Callable[..., Any]:
    return _capture_phase(hook, _worker_of, orig)  # type: ignore[no-any-return]


def _v2_capture(hook: Hook, orig: Any) -> Callable[..., Any]:
    def body(self: Any, create_forward_fn: Any, *args: Any, **kwargs: Any) -> Any:
        role = _v2_role(self)

        def tracked(desc: Any, *a: Any, **kw: Any) -> Any:
            # Each graph is captured from the forward function made for its descriptor: that
            # descriptor names the graph the next captured collectives belong to.
            if hook.on and role is not None:
                try:
                    ws = _worker_of(self)
                    if ws is not None and ws.capture is not None:
                        ws.dispatched(role, key_from_execution_descriptor(desc), 0, 0, 0)
                except Exception as exc:
                    hook.fail(exc)
            return create_forward_fn(desc, *a, **kw)

        return orig(self, tracked, *args, **kwargs)

    return _capture_phase(hook, _worker_of, body)  # type: ignore[no-any-return]


# ---- step boundaries ----------------------------------------------------------------------


def _execute_model(hook: Hook, orig: Any) -> Callable[..., Any]:
    def before(self: Any, scheduler_output: Any) -> None:
        ws = STATE.ws or _worker_of(self)
        if ws is not None:
            spec = getattr(scheduler_output, "scheduled_spec_decode_tokens", None)
            # vLLM schedules a request's drafts only if it has some: with one draft token per
            # request each list holds exactly one
            ws.begin_step((len(spec) if ws.one_draft else sum(map(len, spec.values()))) if spec else 0)

    def after(self: Any, scheduler_output: Any, out: Any) -> None:
        if out is not None:  # sampled here; with sampling deferred, sample_tokens ends the step
            _end(True)

    def failed(self: Any, scheduler_output: Any) -> None:
        _end(False)

    return wrap(hook, orig, ("scheduler_output",), before=before, after=after, failed=failed)


def _sample_tokens(hook: Hook, orig: Any) -> Callable[..., Any]:
    def after(self: Any, out: Any) -> None:
        ws = STATE.ws  # _end inlined: this runs every step
        if ws is not None:
            ws.end_step(True)

    def failed(self: Any) -> None:
        _end(False)

    return wrap(hook, orig, after=after, failed=failed)


def _end(ok: bool) -> None:
    """End the current step (a step only begins in ``execute_model``: no ledger is opened here)."""
    ws = STATE.ws
    if ws is not None:
        ws.end_step(ok)


# ---- collectives --------------------------------------------------------------------------


_GROUPS: dict[Any, str] = {}  # GroupCoordinator.unique_name ("tp:0") -> group name ("tp")


def _group(unique_name: Any) -> str:
    name = _GROUPS.get(unique_name)
    if name is None:
        name = _GROUPS[unique_name] = str(unique_name).split(":", 1)[0]
    return name


def _collective(op_name: str, method: str) -> Callable[[Hook, Any], Callable[..., Any]]:
    def make(hook: Hook, orig: Any) -> Callable[..., Any]:
        # (group's unique_name, torch dtype) -> (group, dtype name): one lookup per eager call
        idents: dict[tuple[Any, Any], tuple[str, str]] = {}

        def before(self: Any, input_: Any) -> None:
            ws = STATE.ws
            if ws is None:
                return
            if ws.capture is not None:
                ws.collective(tensor_op(op_name, _group(self.unique_name), input_), _capturing)
            elif not ws.ended:  # eager, inside a step: straight to the ledger
                if isinstance(input_, list | tuple):
                    op = tensor_op(op_name, "", input_)
                    ws.rec.collective(ws.step, _group(self.unique_name), op_name, op.dtype, op.numel)
                    return
                ck = (self.unique_name, input_.dtype)
                ident = idents.get(ck)
                if ident is None:
                    ident = (_group(self.unique_name), dtype_name(input_.dtype))
                    if len(idents) < 256:
                        idents[ck] = ident
                ws.rec.collective(ws.step, ident[0], op_name, ident[1], input_.numel())

        # where Dynamo traces through the method (the CPU platform), the compiled graph calls a
        # watchdog op instead, which records at run time (compiled.py)
        return compiled.route(method, orig, wrap(hook, orig, ("input_",), before=before), before)

    return make


# Target qualname -> wrapper maker (collectors.vllm.install wraps each target present with its maker).
MAKERS: dict[str, Callable[[Hook, Any], Callable[..., Any]]] = {
    "GPUModelRunner._determine_batch_execution_and_padding": _v1_model_dispatch,
    "GPUModelRunner.capture_model": _v1_capture,
    "SpecDecodeBaseProposer._determine_batch_execution_and_padding": _v1_drafter_dispatch,
    "CudaGraphManager.dispatch": _v2_dispatch,
    "CudaGraphManager.capture": _v2_capture,
    "Worker.execute_model": _execute_model,
    "Worker.sample_tokens": _sample_tokens,
    **{f"GroupCoordinator.{m}": _collective(op, m) for m, op in COLLECTIVE_OPS.items()},
}
