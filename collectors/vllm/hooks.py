"""Where the plugin hooks real vLLM, and the wrappers it installs there.

Every hook target is named once, in ``TARGETS``, with the parameters the wrapper relies on; the
contract tests (tests/test_vllm_contract.py) check that list against each supported vLLM, so a
target that moves fails loudly, by name. Targets are found by feature detection (import the
module, look the attribute up), never by comparing version strings: a runner generation whose
classes are absent is simply not hooked.

A wrapper always calls the original exactly once and passes its result or exception through
untouched. Its own work runs in ``try``; the first failure switches that hook off with one
warning (``Hook.fail``) and vLLM carries on as if the plugin were not there.

Wrappers take the original's exact parameters (``exact``: generated from its signature) and pass
them on by position: a ``(*args, **kwargs)`` wrapper pays for building and unpacking a tuple and a
dict on every call, as much as the records it writes, and the step hooks run four times a step.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import keyword
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from collectors.format import GraphKey, Role, pack_collective
from collectors.vllm import compiled
from collectors.vllm.state import (
    STATE,
    WorkerState,
    dispatch_config,
    dtype_name,
    engine_batch,
    key_from_descriptor,
    key_from_execution_descriptor,
    mode_of,
    tensor_op,
)

log = logging.getLogger("watchdog.vllm")

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


_PS = "vllm.distributed.parallel_state"
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
    Target(_PS, "GroupCoordinator._all_reduce_out_place", ("input_",), "comm"),
    Target(_PS, "GroupCoordinator._all_gather_out_place", ("input_", "dim"), "comm"),
    Target(_PS, "GroupCoordinator._reduce_scatter_out_place", ("input_", "dim"), "comm"),
    Target(_PS, "GroupCoordinator.all_gatherv", ("input_",), "comm"),
    Target(_PS, "GroupCoordinator.reduce_scatterv", ("input_",), "comm"),
    Target(_PS, "GroupCoordinator.broadcast", ("input_",), "comm"),
    Target(_PS, "get_tp_group", (), "comm"),
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
    "all_gatherv": "all_gather",
    "reduce_scatterv": "reduce_scatter",
    "broadcast": "broadcast",
}


def resolve(target: Target) -> tuple[Any, str, Any]:
    """(owner, attribute, current value) of a target; ImportError / AttributeError if it is gone."""
    owner: Any = importlib.import_module(target.module)
    *path, attr = target.qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attr, getattr(owner, attr)


@dataclass
class Hook:
    """One installed wrapper's on/off switch."""

    target: Target
    on: bool = True
    error: str = ""

    def fail(self, exc: BaseException) -> None:
        if self.on:
            self.on = False
            self.error = repr(exc)
            log.warning("watchdog: hook %s disabled after an error: %r", self.target.name, exc)


@dataclass
class Installed:
    hooks: dict[str, Hook] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)  # target name -> why it was not hooked


INSTALLED = Installed()


def _wrap(target: Target, make: Callable[[Hook, Any], Callable[..., Any]]) -> None:
    try:
        owner, attr, orig = resolve(target)
    except Exception as exc:  # absent in this vLLM (another runner generation) or not importable here
        INSTALLED.absent[target.name] = f"{type(exc).__name__}: {exc}"
        return
    if getattr(orig, WRAPPED, False):
        return  # plugins load more than once per process
    hook = Hook(target)
    try:
        wrapper = functools.wraps(orig)(make(hook, orig))
        setattr(wrapper, WRAPPED, True)
        setattr(owner, attr, wrapper)
    except Exception as exc:
        hook.fail(exc)
        return
    INSTALLED.hooks[target.name] = hook


# ---- exact-signature wrappers ------------------------------------------------------------

Body = Callable[..., None]


def exact(
    hook: Hook,
    orig: Callable[..., Any],
    names: tuple[str, ...] = (),
    *,
    before: Body | None = None,
    after: Body | None = None,
    failed: Body | None = None,
) -> Callable[..., Any]:
    """A wrapper with ``orig``'s own parameters that calls ``orig`` once, forwarding every argument.

    Around the call, while ``hook`` is on: ``before(self, *named)``, then ``after(self, *named, result)``
    or, if ``orig`` raised, ``failed(self, *named)`` before the exception goes on; ``named`` are the
    arguments of the parameters ``names``. A body that raises switches the hook off (``Hook.fail``).
    ValueError if ``orig`` has no such parameters (or no readable signature)."""
    sig = inspect.signature(orig)
    params = list(sig.parameters.values())
    have = {p.name for p in params}
    for name in ("self", *names):
        if name not in have or keyword.iskeyword(name):
            raise ValueError(f"{getattr(orig, '__qualname__', orig)!r} has no parameter {name!r}")
    ns: dict[str, Any] = {"_orig": orig, "_hook": hook, "_before": before, "_after": after, "_failed": failed}
    head: list[str] = []
    call: list[str] = []
    star = False
    P = inspect.Parameter
    for i, p in enumerate(params):
        text = p.name
        if p.default is not P.empty:
            ns[f"_d{i}"] = p.default
            text += f"=_d{i}"
        if p.kind is P.VAR_POSITIONAL:
            head.append(f"*{p.name}")
            call.append(f"*{p.name}")
            star = True
        elif p.kind is P.VAR_KEYWORD:
            head.append(f"**{p.name}")
            call.append(f"**{p.name}")
        elif p.kind is P.KEYWORD_ONLY:
            if not star:
                head.append("*")
                star = True
            head.append(text)
            call.append(f"{p.name}={p.name}")
        else:
            head.append(text)
            call.append(p.name)
            if p.kind is P.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind is not P.POSITIONAL_ONLY):
                head.append("/")
    args = ", ".join(("self", *names))
    lines = [f"def wrapper({', '.join(head)}):"]
    if before is not None:
        lines += [
            "    if _hook.on:",
            "        try:",
            f"            _before({args})",
            "        except Exception as exc:",
            "            _hook.fail(exc)",
        ]
    if failed is not None:
        lines += [
            "    try:",
            f"        result = _orig({', '.join(call)})",
            "    except BaseException:",
            "        if _hook.on:",
            "            try:",
            f"                _failed({args})",
            "            except Exception as exc:",
            "                _hook.fail(exc)",
            "        raise",
        ]
    else:
        lines.append(f"    result = _orig({', '.join(call)})")
    if after is not None:
        lines += [
            "    if _hook.on:",
            "        try:",
            f"            _after({args}, result)",
            "        except Exception as exc:",
            "            _hook.fail(exc)",
        ]
    lines.append("    return result")
    if {"result", "exc", "wrapper"} & have or any(n.startswith("_") and n in ns for n in have):
        raise ValueError(f"{getattr(orig, '__qualname__', orig)!r}: a parameter name the wrapper uses itself")
    exec("\n".join(lines), ns)  # the source is built above from the signature's names only
    return ns["wrapper"]  # type: ignore[no-any-return]


# ---- worker-side description (rank, TP size, dispatcher config) -----------------------


def _describe(vllm_config: Any) -> Callable[[], tuple[int, int, dict[str, Any]]]:
    def describe() -> tuple[int, int, dict[str, Any]]:
        ps = importlib.import_module(_PS)
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

    return exact(hook, orig, ("num_tokens", "num_reqs"), after=after)


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

    return exact(hook, orig, ("num_tokens",), after=after)


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

    return exact(hook, orig, ("num_reqs", "num_tokens"), after=after)


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

    return exact(hook, orig, ("scheduler_output",), before=before, after=after, failed=failed)


def _sample_tokens(hook: Hook, orig: Any) -> Callable[..., Any]:
    def after(self: Any, out: Any) -> None:
        ws = STATE.ws  # _end inlined: this runs every step
        if ws is not None:
            ws.end_step(True)

    def failed(self: Any) -> None:
        _end(False)

    return exact(hook, orig, after=after, failed=failed)


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
        # (group's unique_name, torch dtype) -> (group, packed group/op/dtype): one lookup per eager call
        idents: dict[tuple[Any, Any], tuple[str, bytes]] = {}

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
                    group = _group(self.unique_name)
                    ident = (group, pack_collective(group, op_name, dtype_name(input_.dtype)))
                    if len(idents) < 256:
                        idents[ck] = ident
                ws.rec.collective_packed(ws.step, ident[0], ident[1], input_.numel())

        # where Dynamo traces through the method (the CPU platform), the compiled graph calls a
        # watchdog op instead, which records at run time (compiled.py)
        return compiled.route(method, orig, exact(hook, orig, ("input_",), before=before), before)

    return make


# ---- engine side --------------------------------------------------------------------------


def _mq_spec(mq: Any) -> dict[str, Any] | None:
    buf = getattr(mq, "buffer", None)
    if buf is None:  # remote readers have no local segment
        return None
    return {
        "name": str(buf.shared_memory.name).lstrip("/"),
        "n_readers": int(buf.n_reader),
        "max_chunks": int(buf.max_chunks),
        "max_chunk_bytes": int(buf.max_chunk_bytes),
    }


def _init_executor(hook: Hook, orig: Any) -> Callable[..., Any]:
    def after(self: Any, out: Any) -> None:
        rec = STATE.engine(lambda: int(self.parallel_config.tensor_parallel_size))
        bcast = _mq_spec(getattr(self, "rpc_broadcast_mq", None))
        if rec is not None and bcast is not None:
            responses = []
            for rank, mq in enumerate(getattr(self, "response_mqs", None) or ()):
                spec = _mq_spec(mq)
                if spec is not None:
                    responses.append({**spec, "rank": rank})
            rec.meta({"t": "rings", "broadcast": bcast, "responses": responses})

    return exact(hook, orig, after=after)


def _engine_execute(hook: Hook, orig: Any) -> Callable[..., Any]:
    def before(self: Any, scheduler_output: Any) -> None:
        rec = STATE.eng or STATE.engine(lambda: int(self.parallel_config.tensor_parallel_size))
        if rec is not None:
            STATE.engine_step += 1
            step = STATE.engine_step
            STATE.engine_steps[id(scheduler_output)] = step
            b = engine_batch(scheduler_output)
            running, waiting = STATE.engine_counts
            rec.engine_step(
                step,
                total_tokens=b.total_tokens,
                num_reqs=b.num_reqs,
                num_decode_reqs=b.num_decode_reqs,
                placeholders=b.placeholders,
                max_query_len=b.max_query_len,
                min_query_len=b.min_query_len,
                running=running,
                waiting=waiting,
            )

    return exact(hook, orig, ("scheduler_output",), before=before)


def _schedule(hook: Hook, orig: Any) -> Callable[..., Any]:
    def after(self: Any, out: Any) -> None:
        STATE.engine_counts = (len(self.running), len(self.waiting))

    return exact(hook, orig, after=after)


def _update_from_output(hook: Hook, orig: Any) -> Callable[..., Any]:
    def after(self: Any, scheduler_output: Any, out: Any) -> None:
        _engine_result(self, scheduler_output, True)

    def failed(self: Any, scheduler_output: Any) -> None:
        _engine_result(self, scheduler_output, False)

    return exact(hook, orig, ("scheduler_output",), after=after, failed=failed)


def _engine_result(sched: Any, scheduler_output: Any, ok: bool) -> None:
    rec = STATE.current_engine()
    step = STATE.engine_steps.pop(id(scheduler_output), None)
    if rec is not None and step is not None:
        STATE.engine_finished += len(getattr(scheduler_output, "finished_req_ids", ()) or ())
        running, waiting = len(sched.running), len(sched.waiting)
        rec.engine_result(step, ok=ok, running=running, waiting=waiting, finished=STATE.engine_finished)


# ---- installation -------------------------------------------------------------------------

_MAKERS: dict[str, Callable[[Hook, Any], Callable[..., Any]]] = {
    "GPUModelRunner._determine_batch_execution_and_padding": _v1_model_dispatch,
    "GPUModelRunner.capture_model": _v1_capture,
    "SpecDecodeBaseProposer._determine_batch_execution_and_padding": _v1_drafter_dispatch,
    "CudaGraphManager.dispatch": _v2_dispatch,
    "CudaGraphManager.capture": _v2_capture,
    "Worker.execute_model": _execute_model,
    "Worker.sample_tokens": _sample_tokens,
    "MultiprocExecutor._init_executor": _init_executor,
    "MultiprocExecutor.execute_model": _engine_execute,
    "Scheduler.schedule": _schedule,
    "Scheduler.update_from_output": _update_from_output,
    **{f"GroupCoordinator.{m}": _collective(op, m) for m, op in COLLECTIVE_OPS.items()},
}


def install(groups: frozenset[str] | None = None) -> Installed:
    """Wrap every target present in this vLLM (only ``groups`` if given). Never raises."""
    for target in TARGETS:
        make = _MAKERS.get(target.qualname)
        if make is None or (groups is not None and target.group not in groups):
            continue
        try:
            _wrap(target, make)
        except Exception as exc:  # belt and braces: installation must not break vLLM start-up
            INSTALLED.absent[target.name] = repr(exc)
    return INSTALLED
