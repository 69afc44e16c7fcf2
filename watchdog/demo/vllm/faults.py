"""The vLLM demo's fault plugin: real defects switched on inside real vLLM code.

Loaded by vLLM like the watchdog's own plugin (entry point group ``vllm.general_plugins``, name
``watchdog_demo_faults``; ``watchdog.demo.vllm.serve.overlay`` puts it on the server's path for
``watchdog demo --engine vllm`` and the tests) in the API server, EngineCore and every worker.
Nothing in the product imports it. It does nothing unless ``VLLM_TEST_FAULT`` is set to ``KIND:RANK:STEP``; the watchdog
never reads that variable (its settings are ``WATCHDOG_*``), and nothing it reads (ledgers, rings,
stacks, process state) names the fault. Each kind switches on a bug in one code path, and what
follows (a hang, a crash, ranks out of step) comes from vLLM's own mechanism:

- ``host-hang``: rank RANK's input preparation (``GPUModelRunner._update_states``, which the CPU
  runner inherits) takes a bookkeeping lock it leaked at step STEP: the host thread blocks forever
  while its peer waits for it inside the step's first all-reduce.
- ``skip-allreduce``: rank RANK's model skips its first tensor-parallel all-reduce of step STEP
  (``GroupCoordinator.all_reduce``, the call model code makes, returns its input unreduced: one
  collective fewer on that rank, as a rank-dependent branch in a model would).
- ``size-mismatch``: rank RANK's logits all-gather at step STEP (eager: after the compiled model)
  sends its shard one vocabulary column short.
- ``worker-killed``: rank RANK is SIGKILLed inside the first all-reduce of step STEP.
- ``engine-stall``: the scheduler takes a lock it leaked on the first step at or after STEP that has
  requests waiting: EngineCore blocks in ``Scheduler.schedule`` with requests pending.

With ``VLLM_TEST_FAULT_ONCE=PATH`` the defect is there only until it first bites (the file is
created then): a server restarted after the incident runs clean, as one whose bug a safer
configuration avoided would.

With ``VLLM_TEST_FAULT_FILE=PATH`` instead, the faults that need nothing in the compiled graph
(``host-hang``, ``engine-stall``, ``size-mismatch``) are armed while the server runs, so tests can
share one server: writing ``KIND:RANK:AFTER`` into PATH arms the fault to bite ``AFTER`` steps after the
process reads it (``PATH.bit`` is written when it bites). The hangs are released by removing or
rewriting PATH (the leaked lock is let go and the server goes on); a size mismatch is final.

Steps count the model runner's ``execute_model`` calls with a forward pass, from 1, on each rank
(the engine counts its ``schedule`` calls). The all-reduce faults wrap the tensor-parallel group's
``all_reduce`` in a ``torch.library`` custom op so they decide at run time inside torch.compile'd
code (the compiled graph calls the op; Dynamo does not trace into it).
"""

# No ``from __future__ import annotations``: torch.library reads the custom op's annotations as types.
import os
import signal
import threading
import time
from typing import Any

ENV = "VLLM_TEST_FAULT"
ONCE_ENV = "VLLM_TEST_FAULT_ONCE"
FILE_ENV = "VLLM_TEST_FAULT_FILE"
DESCRIPTIONS = {
    "none": "no fault: a healthy server (any incident is a false alarm)",
    "host-hang": "rank R blocks on a leaked lock in its input preparation at step S (host code)",
    "skip-allreduce": "rank R's model skips its first tensor-parallel all-reduce of step S (compiled code)",
    "size-mismatch": "rank R's logits all-gather at step S sends a shard one column short",
    "worker-killed": "rank R is SIGKILLed inside the first all-reduce of step S",
    "engine-stall": "the scheduler re-enters its own lock at the first step >= S with requests waiting",
}
KINDS = tuple(k for k in DESCRIPTIONS if k != "none")
# Faults that make the ranks compute wrong tokens before anything can be detected: the step they bite
# in is already sampled and streamed when its collectives are compared, so completions in flight then
# differ from an uninterrupted run's (the watchdog catches the step; it cannot recall its tokens).
CORRUPTS_OUTPUT = ("skip-allreduce", "size-mismatch")
# The faults that wrap the all-reduce in a custom op change the compiled graph: their servers need a
# compile cache of their own (a cached graph calling the op cannot load where it is not registered).
WRAPS_ALLREDUCE = ("skip-allreduce", "worker-killed")
# The faults armed at run time (VLLM_TEST_FAULT_FILE); the hangs are released the same way.
ARMABLE = ("host-hang", "engine-stall", "size-mismatch")


def _fixed() -> tuple[str, int, int] | None:
    """The fault ``VLLM_TEST_FAULT`` sets from the start, unless ``VLLM_TEST_FAULT_ONCE`` says it bit."""
    raw = os.environ.get(ENV, "")
    once = os.environ.get(ONCE_ENV, "")
    if not raw or (once and os.path.exists(once)):
        return None
    kind, rank, step = raw.split(":")
    if kind not in KINDS:
        raise ValueError(f"{ENV}: unknown fault {kind!r}")
    return kind, int(rank), int(step)


class _Worker:
    steps = 0  # model-runner execute_model calls with a forward pass
    reduces = 0  # all-reduces issued in the current step
    rank = -1


class _Plan:
    """When and where the fault bites (once): set from the start (``VLLM_TEST_FAULT``), or armed and,
    for a hang, released at run time through the control file (``VLLM_TEST_FAULT_FILE``)."""

    def __init__(self, plan: tuple[str, int, int] | None, control: str = "") -> None:
        self.plan = plan  # kind, rank, the step from which it bites; None: nothing (more) to bite
        self.control = control
        self.seen: tuple[int, int] | None = None  # the control file's (mtime, size) last read

    def _key(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.control)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def poll(self, count: int) -> None:
        """Once per step (one stat, with a control file): a new plan when the file changed, none when it is gone."""
        if not self.control:
            return
        key = self._key()
        if key == self.seen:
            return
        self.seen, self.plan = key, None
        if key is None:
            return
        try:
            with open(self.control) as f:
                kind, rank, after = f.read().strip().split(":")
        except (OSError, ValueError):
            return
        if kind in ARMABLE:
            self.plan = kind, int(rank), count + int(after)

    def bites(self, kind: str, rank: int | None, count: int) -> bool:
        """Whether ``kind`` bites now on ``rank`` (None: wherever it is set) at step ``count``."""
        plan = self.plan
        return plan is not None and plan[0] == kind and rank in (None, plan[1]) and count >= plan[2]

    def bit(self) -> None:
        """It bites: never again; the file that says so (``VLLM_TEST_FAULT_ONCE``, or the control file's ``.bit``)."""
        self.plan = None
        if self.control:
            with open(self.control + ".bit", "w") as f:
                f.write(str(os.getpid()))
            return
        once = os.environ.get(ONCE_ENV, "")
        if once:
            with open(once, "w") as f:
                f.write(os.environ.get(ENV, ""))

    def leak(self) -> threading.Lock:
        """The defect of the hangs: a lock leaked (held), which the caller takes again and blocks on. With a
        control file a thread releases it once the file changes; otherwise it is held for good."""
        self.bit()
        leaked, armed = threading.Lock(), self.seen
        leaked.acquire()

        def release() -> None:
            while self._key() == armed:
                time.sleep(0.1)
            leaked.release()

        if self.control:
            threading.Thread(target=release, name="fault-release", daemon=True).start()
        return leaked


def register() -> None:
    if getattr(register, "done", False):
        return
    control = os.environ.get(FILE_ENV, "")
    fixed = None if control else _fixed()
    if fixed is None and not control:
        return
    register.done = True  # type: ignore[attr-defined]
    _install(_Plan(fixed, control), ARMABLE if fixed is None else (fixed[0],))


def _install(plan: _Plan, kinds: tuple[str, ...]) -> None:
    """Wrap what ``kinds`` need: the engine's scheduler (its calls counted), a worker's step, input
    preparation and logits gather (its model-runner steps counted), the tensor-parallel all-reduce."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    run, update = GPUModelRunner.execute_model, GPUModelRunner._update_states

    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        if scheduler_output.total_num_scheduled_tokens > 0:
            _Worker.steps += 1
            _Worker.reduces = 0
            plan.poll(_Worker.steps)
            if _Worker.rank < 0:
                from vllm.distributed.parallel_state import get_tp_group

                _Worker.rank = get_tp_group().rank_in_group
        return run(self, scheduler_output, *args, **kwargs)

    def _update_states(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        if plan.bites("host-hang", _Worker.rank, _Worker.steps):
            plan.leak().acquire()  # blocks here, in the input preparation
        return update(self, scheduler_output, *args, **kwargs)

    GPUModelRunner.execute_model = execute_model
    GPUModelRunner._update_states = _update_states
    if "engine-stall" in kinds:
        _scheduler_fault(plan)
    if "size-mismatch" in kinds:
        _gather_fault(plan)
    for kind in set(kinds) & set(WRAPS_ALLREDUCE):
        _allreduce_fault(plan, kind)


def _scheduler_fault(plan: _Plan) -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    orig = Scheduler.schedule
    calls = [0]

    def schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        plan.poll(calls[0])
        if plan.bites("engine-stall", None, calls[0]) and self.waiting and self.running:
            plan.leak().acquire()  # blocks here, in the scheduler's call, with requests waiting
        return orig(self, *args, **kwargs)

    Scheduler.schedule = schedule


def _gather_fault(plan: _Plan) -> None:
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    orig = LogitsProcessor._gather_logits

    def _gather_logits(self: Any, logits: Any) -> Any:
        if plan.bites("size-mismatch", _Worker.rank, _Worker.steps):
            plan.bit()
            logits = logits[..., :-1]  # the defect: a shard sliced one column short
        return orig(self, logits)

    LogitsProcessor._gather_logits = _gather_logits


def _allreduce_fault(plan: _Plan, kind: str) -> None:
    import torch
    from vllm.distributed.parallel_state import GroupCoordinator, get_tp_group

    orig = GroupCoordinator.all_reduce

    @torch.library.custom_op("watchdog_test::all_reduce", mutates_args=())
    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        # Decided here, at run time: a compiled graph (traced once, or loaded from vLLM's compile
        # cache) calls this op on every step without running the Python that traced it.
        _Worker.reduces += 1
        bites = _Worker.reduces == 1 and plan.bites(kind, _Worker.rank, _Worker.steps)
        if bites:
            plan.bit()
        if bites and kind == "skip-allreduce":
            return x.clone()  # the defect: the model's all-reduce not issued on this rank
        if bites and kind == "worker-killed":
            os.kill(os.getpid(), signal.SIGKILL)
        # vLLM's own path from here on (the watchdog's hooks included), on a copy: the CPU communicator
        # reduces in place, and a custom op may not return (or mutate) its input
        return orig(get_tp_group(), x.clone())  # type: ignore[no-any-return]

    @all_reduce.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    def patched(self: Any, input_: torch.Tensor) -> torch.Tensor:
        if str(getattr(self, "unique_name", "")).split(":")[0] != "tp" or self.world_size == 1:
            return orig(self, input_)  # type: ignore[no-any-return]
        return torch.ops.watchdog_test.all_reduce(input_)  # type: ignore[no-any-return]

    GroupCoordinator.all_reduce = patched
