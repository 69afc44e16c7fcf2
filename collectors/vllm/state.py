"""Per-process state of the vLLM plugin: each process's ledger, its open step, its cached graph keys.

No vLLM import here: everything takes plain values or duck-typed vLLM objects (``Any``), so this
module is unit-testable without vLLM. The wrappers (``collectors.vllm.worker``, ``.engine``) call
into it; the translations from vLLM's objects to ledger values are in ``collectors.vllm.translate``.

Processes: ``load_general_plugins()`` runs in the API server, in EngineCore and in every worker,
and workers may be forked after it ran. So nothing is opened at load time: the first hook that
fires in a process creates that process's recorder, keyed on its pid (a forked child never
writes into its parent's ledger).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from collectors.format import (
    MAX_SLOTS,
    CollectiveOp,
    CUDAGraphMode,
    GraphKey,
    ProcessKind,
    Role,
)
from collectors.recorder import Recorder, open_recorder

log = logging.getLogger("watchdog.vllm")

ENV_LEDGER_DIR = "WATCHDOG_LEDGER_DIR"
ENV_LEDGER_SLOTS = "WATCHDOG_LEDGER_SLOTS"


def ledger_dir() -> str | None:
    return os.environ.get(ENV_LEDGER_DIR) or None


@dataclass
class Capture:
    """Graph capture in progress: collectives recorded into the graph of the current (role, key)."""

    target: tuple[Role, GraphKey] | None = None
    ops: dict[tuple[Role, GraphKey], list[CollectiveOp]] = field(default_factory=dict)


ROLES = (Role.MODEL, Role.DRAFTER)  # by int(role)
MAX_KEYS = 4096  # translated keys kept per process (graph keys are a few dozen; eager ones one per size)


class Keyed:
    """A graph key as the hot path uses it: translated once, with the request count that padding is
    measured against and the manifest hashes of its graphs (the recorder caches the rest by the key
    object's identity, so the same ``key`` object is passed every step)."""

    __slots__ = ("full_reqs", "graphed", "hashes", "key", "src")

    def __init__(self, key: GraphKey, src: Any = None) -> None:
        self.key = key
        self.src = src  # the vLLM mode object the cache key names by id (kept alive, compared by identity)
        self.graphed = key.mode is not CUDAGraphMode.NONE
        self.full_reqs = key.num_reqs if key.mode is CUDAGraphMode.FULL and key.num_reqs is not None else -1
        self.hashes = (0, 0)  # (model, drafter) manifest hash (0: not captured, or eager)


class WorkerState:
    """One worker process's ledger, step counter, capture manifests and group sequence numbers.

    Hot path (every step): ``begin_step``, ``launch`` with a cached ``Keyed`` (``keyed``), ``end_step``,
    and eager ``collective_eager``. Nothing there allocates beyond the record itself, and nothing
    asks the OS anything (``os.getpid`` alone costs ~0.3 us on a busy VM).
    """

    def __init__(self, rec: Recorder, num_spec: int = 0) -> None:
        self.rec = rec
        # With one draft token per request, a step's draft placeholders are the number of requests
        # with drafts: len() of vLLM's dict instead of summing its lists (~1 us at 15 requests).
        self.one_draft = num_spec == 1
        self.step = -1  # the current step: execute_model calls so far - 1
        self.begun = False  # step_begin written for self.step
        self.ended = True
        self.placeholders = 0  # draft placeholders the current step schedules
        self.capture: Capture | None = None
        self.keys: dict[Any, Keyed] = {}  # hook-specific cache key (plain ints/None/ids) -> Keyed

    # ---- keys -------------------------------------------------------------------------

    def keyed(self, cache_key: Any, key: GraphKey, src: Any) -> Keyed:
        """Remember ``key`` under ``cache_key``: a tuple the hook builds from vLLM's descriptor, naming
        vLLM's mode object ``src`` by its id (hashing an Enum member runs Python code)."""
        if len(self.keys) >= MAX_KEYS:
            self.keys.clear()
        k = self.keys[cache_key] = self._keyed(key, src)
        return k

    def _keyed(self, key: GraphKey, src: Any = None) -> Keyed:
        k = Keyed(key, src)
        self._set_hashes(k)
        return k

    def _set_hashes(self, k: Keyed) -> None:
        """``k``'s manifest hashes as the recorder has them (eager keys have none)."""
        rec = self.rec
        k.hashes = (rec.recorded_manifest(Role.MODEL, k.key), rec.recorded_manifest(Role.DRAFTER, k.key))

    # ---- steps ------------------------------------------------------------------------

    def next_step(self) -> int:
        self.step += 1
        self.begun = False
        self.ended = False
        return self.step

    def begin_step(self, placeholders: int) -> None:
        self.step += 1
        self.begun = False
        self.ended = False
        self.placeholders = placeholders

    def dispatched(
        self, role: Role, key: GraphKey, unpadded_tokens: int, unpadded_reqs: int, placeholders: int
    ) -> None:
        """A forward pass's key was chosen: during capture it names the graph being captured,
        in a step it is the step's key (model) or a drafter launch."""
        if self.capture is not None:
            self._capture_target(role, key)
        elif not self.ended:
            saved, self.placeholders = self.placeholders, placeholders
            try:
                self.launch(int(role), self._keyed(key), unpadded_tokens, unpadded_reqs)
            finally:
                self.placeholders = saved

    def launch(self, role: int, k: Keyed, unpadded_tokens: int, unpadded_reqs: int) -> None:
        """``dispatched`` for the hooks: ``role`` as an int, the key already translated. The model's
        first launch in a step is written with the step's begin, as one record."""
        if self.capture is not None:
            self._capture_target(ROLES[role], k.key)
            return
        if self.ended:  # a dummy/profile run outside any execute_model call
            return
        rec = self.rec
        if role == 0 and not self.begun:
            self.begun = True
            padded = k.full_reqs - unpadded_reqs if k.full_reqs > unpadded_reqs else 0
            # The step's begin and the model's launch: one STEP record, which the drafter's launch and
            # the step's end are stored into.
            rec.step_begin(
                self.step,
                k.key,
                unpadded_tokens=unpadded_tokens,
                unpadded_reqs=unpadded_reqs,
                padded_reqs=padded,
                placeholders=self.placeholders,
                launch_manifest=k.hashes[0],
            )
        else:
            rec.launch(self.step, ROLES[role], k.key, k.hashes[role])

    def end_step(self, ok: bool) -> None:
        if not self.ended:
            self.ended = True
            if self.begun:
                self.rec.step_end(self.step, ok)

    # ---- collectives ------------------------------------------------------------------

    def collective(self, op: CollectiveOp, capturing: Callable[[], bool]) -> None:
        cap = self.capture
        if cap is not None:
            if cap.target is not None and capturing():
                cap.ops[cap.target].append(op)
            return  # warm-up runs between captures are not steps
        if not self.ended:
            self.rec.collective(self.step, op.group, op.op, op.dtype, op.numel)

    # ---- capture ----------------------------------------------------------------------

    def _capture_target(self, role: Role, key: GraphKey) -> None:
        cap = self.capture
        assert cap is not None
        cap.target = (role, key)
        cap.ops.setdefault((role, key), [])

    def begin_capture(self) -> None:
        if self.capture is None:
            self.capture = Capture()

    def end_capture(self) -> None:
        """Write one manifest per captured key (keys whose capture issued no collective too)."""
        cap, self.capture = self.capture, None
        if cap is None:
            return
        for (role, key), ops in cap.ops.items():
            if key.mode is CUDAGraphMode.NONE:
                continue
            self.rec.manifest(role, key, ops)
        for k in self.keys.values():  # keys translated before this capture now have manifests
            if k.graphed:
                self._set_hashes(k)


class ProcessState:
    """The plugin's state in the current process, re-created after a fork.

    ``ws`` and ``eng`` are what the hot path reads: the ledger of this process, or None. A forked
    child starts empty (``os.register_at_fork``), so it never writes into its parent's ledger; the
    slow paths (first use) also compare pids, for a fork that bypassed ``os.fork``.
    """

    def __init__(self) -> None:
        self._reset()
        ref = weakref.ref(self)

        def after_fork() -> None:
            me = ref()
            if me is not None:
                me._reset()

        os.register_at_fork(after_in_child=after_fork)

    def _reset(self) -> None:
        self._lock = threading.Lock()  # a lock held by another thread at fork time stays held in the child
        self._pid = -1
        self.ws: WorkerState | None = None
        self.eng: Recorder | None = None
        self._worker_failed = False
        self._engine_failed = False
        self.engine_step = -1
        self.engine_steps: dict[int, int] = {}  # id(SchedulerOutput) -> step
        self.engine_counts = (0, 0)  # running, waiting after the last schedule()
        self.engine_finished = 0

    def _check_pid(self) -> None:
        pid = os.getpid()
        if pid != self._pid:  # first use here, or a forked child: nothing inherited
            self._reset()
            self._pid = pid

    @property
    def worker_gave_up(self) -> bool:
        """This process tried to open its worker ledger and could not (or has no ledger directory)."""
        return self._worker_failed

    def worker(self, describe: Callable[[], tuple[int, int, dict[str, Any]]]) -> WorkerState | None:
        """This process's worker ledger, created on first use. ``describe`` gives (TP rank, TP size,
        config entry); it runs once, when vLLM's TP group exists."""
        if self.ws is not None:
            return self.ws
        with self._lock:
            self._check_pid()
            if self.ws is None and not self._worker_failed:
                self._worker_failed = True  # one attempt per process
                directory = ledger_dir()
                if directory is None:
                    return None
                try:
                    rank, world, config = describe()
                except Exception as exc:
                    log.warning("watchdog: cannot tell this worker's TP rank, no ledger: %r", exc)
                    return None
                rec = open_recorder(directory, kind=ProcessKind.WORKER, rank=rank, world_size=world, **_slots())
                if rec is not None and rec.enabled:
                    rec.config(role="worker", tp_rank=rank, pid=os.getpid(), **config)
                    self.ws = WorkerState(rec, int(config.get("num_speculative_tokens") or 0))
                    self._worker_failed = False
            return self.ws

    def current_worker(self) -> WorkerState | None:
        """This process's worker ledger if one exists (never creates one: collectives also run in
        processes and phases where no step hook has fired)."""
        return self.ws

    def current_engine(self) -> Recorder | None:
        return self.eng

    def engine(self, world_size: Callable[[], int]) -> Recorder | None:
        if self.eng is not None:
            return self.eng
        with self._lock:
            self._check_pid()
            if self.eng is None and not self._engine_failed:
                self._engine_failed = True
                directory = ledger_dir()
                if directory is None:
                    return None
                try:
                    world = world_size()
                except Exception as exc:
                    log.warning("watchdog: cannot tell the TP size, no engine ledger: %r", exc)
                    return None
                rec = open_recorder(directory, kind=ProcessKind.ENGINE, rank=-1, world_size=world, **_slots())
                if rec is not None and rec.enabled:
                    rec.config(role="engine", tp=world, pid=os.getpid())
                    self.eng = rec
                    self._engine_failed = False
            return self.eng


def _slots() -> dict[str, int]:
    raw = os.environ.get(ENV_LEDGER_SLOTS, "")
    # clamped to what readers accept: a larger ring would be a ledger nobody reads
    return {"n_slots": min(int(raw), MAX_SLOTS)} if raw.isdigit() and int(raw) > 0 else {}


STATE = ProcessState()
