"""The engine-side wrappers: the referee ledger (engine steps and their results) and the shm rings.

They run in EngineCore: ``MultiprocExecutor`` names the rings and starts each step's RPC, the
``Scheduler`` counts what is running and waiting and learns each step's outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from collectors.vllm.state import STATE
from collectors.vllm.translate import engine_batch
from collectors.vllm.wrap import Hook, wrap


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

    return wrap(hook, orig, after=after)


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

    return wrap(hook, orig, ("scheduler_output",), before=before)


def _schedule(hook: Hook, orig: Any) -> Callable[..., Any]:
    def after(self: Any, out: Any) -> None:
        STATE.engine_counts = (len(self.running), len(self.waiting))

    return wrap(hook, orig, after=after)


def _update_from_output(hook: Hook, orig: Any) -> Callable[..., Any]:
    def after(self: Any, scheduler_output: Any, out: Any) -> None:
        _engine_result(self, scheduler_output, True)

    def failed(self: Any, scheduler_output: Any) -> None:
        _engine_result(self, scheduler_output, False)

    return wrap(hook, orig, ("scheduler_output",), after=after, failed=failed)


def _engine_result(sched: Any, scheduler_output: Any, ok: bool) -> None:
    rec = STATE.current_engine()
    step = STATE.engine_steps.pop(id(scheduler_output), None)
    if rec is not None and step is not None:
        STATE.engine_finished += len(getattr(scheduler_output, "finished_req_ids", ()) or ())
        running, waiting = len(sched.running), len(sched.waiting)
        rec.engine_result(step, ok=ok, running=running, waiting=waiting, finished=STATE.engine_finished)


# Target qualname -> wrapper maker (collectors.vllm.install wraps each target present with its maker).
MAKERS: dict[str, Callable[[Hook, Any], Callable[..., Any]]] = {
    "MultiprocExecutor._init_executor": _init_executor,
    "MultiprocExecutor.execute_model": _engine_execute,
    "Scheduler.schedule": _schedule,
    "Scheduler.update_from_output": _update_from_output,
}
