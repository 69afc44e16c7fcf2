"""A tiny record factory: real ledgers written by the real Recorder, shaped by a test.

dep = Deployment(tmp_path, tp=2, mode="FULL_AND_PIECEWISE")
dep.decode_step(0, reqs=16)                 # every rank, every record, step closed
dep.decode_step(1, reqs=15, open_on=[0, 1])  # stuck: begun + launched (one record), not ended
snap = dep.snapshot(host={0: "sync", 1: "sync"}, device={0: "kernel", 1: "kernel"})
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from collectors.format import CollectiveOp, CUDAGraphMode, GraphKey, ProcessKind, Role
from collectors.reader import read_ledger
from collectors.recorder import Recorder
from watchdog.keys import DispatchConfig, default_capture_sizes, dispatch, drafter_dispatch
from watchdog.types import Frame, ProcessEvidence, ProcInfo, Snapshot, StackDump, StallInfo, ThreadStack

HIDDEN = 32
LAYERS = 4

HOST_FRAMES = {
    "sync": [("Stream.synchronize", "device.py"), ("Worker.execute_model", "worker.py")],
    "ring": [("ShmRing.acquire_read", "shmring.py"), ("ShmRing.dequeue", "shmring.py")],
    "host": [("Worker._update_step_stats", "worker.py"), ("Worker.execute_model", "worker.py")],
    "sched": [("Scheduler._rebalance", "engine.py"), ("Engine.execute_step", "engine.py")],
    # vLLM's CPU shm all-gather of the logits (eager, after the compiled model)
    "gather": [
        ("_CPUSHMDistributed.all_gather_into_tensor", "cpu_communicator.py"),
        ("GroupCoordinator.all_gather", "parallel_state.py"),
        ("LogitsProcessor._gather_logits", "logits_processor.py"),
    ],
    # a torch.compile'd model calling a native op: py-spy's Python frames end in the op call
    "op": [("OpOverload.__call__", "_ops.py"), ("Runner.call", "graph.py"), ("LlamaModel.forward", "llama.py")],
}
# native stacks (py-spy --native) of the host thread: vLLM's CPU shm all-reduce below the op call
NATIVE_FRAMES = {
    "shm": [
        ("get_curr_stamp", "shm.cpp"),
        ("wait_for_all<bool (&)(char, char, char, char)>", "shm.cpp"),
        ("shm_allreduce", "shm.cpp"),
        ("c10::Dispatcher::callBoxed", "libtorch_cpu.so"),
        ("OpOverload.__call__", "_ops.py"),
        ("LlamaModel.forward", "llama.py"),
    ],
}
DEVICE_FRAMES = {
    "kernel": [("sparse_indexer_topk", "model.py"), ("Stream._run", "device.py")],
    "collective": [
        ("all_reduce", "distributed_c10d.py"),
        ("chunked_all_reduce", "model.py"),
        ("Stream._run", "device.py"),
    ],
    "idle": [("Stream._run", "device.py"), ("Thread.run", "threading.py")],
}


def ops(tokens: int, layers: int = LAYERS) -> list[CollectiveOp]:
    return [CollectiveOp("all_reduce", "tp", "float32", tokens * HIDDEN)] * (2 * layers)


def thread(name: str, frames: Iterable[tuple[str, str]]) -> ThreadStack:
    return ThreadStack(name, hash(name) & 0xFFFF, True, tuple(Frame(n, f"/x/{f}", 1) for n, f in frames))


class Deployment:
    def __init__(self, tmp: Path, tp: int = 2, mode: str = "FULL_AND_PIECEWISE", num_spec: int = 1) -> None:
        self.dir = tmp / "ledgers"
        self.tp = tp
        q = 1 + num_spec
        self.cfg = DispatchConfig(mode, default_capture_sizes(64, q), q)
        self.num_spec = num_spec
        self.ranks = [
            Recorder(self.dir, kind=ProcessKind.WORKER, rank=r, world_size=tp, n_slots=4096) for r in range(tp)
        ]
        self.engine = Recorder(self.dir, kind=ProcessKind.ENGINE, rank=-1, world_size=tp, n_slots=4096)
        self.hashes: dict[tuple[Role, GraphKey], int] = {}
        for rec in self.ranks:
            rec.config(**self.cfg.to_json(), num_speculative_tokens=num_spec)
        for size in self.cfg.capture_sizes:
            keys = [(Role.MODEL, GraphKey(CUDAGraphMode.FULL, size, size // q, uniform=True), LAYERS)]
            if self.cfg.mixed_mode is CUDAGraphMode.PIECEWISE:
                keys.append((Role.MODEL, GraphKey(CUDAGraphMode.PIECEWISE, size), LAYERS))
                keys.append((Role.DRAFTER, GraphKey(CUDAGraphMode.PIECEWISE, size), 1))
            for role, key, layers in keys:
                for rec in self.ranks:
                    self.hashes[(role, key)] = rec.manifest(role, key, ops(key.num_tokens, layers))

    def engine_step(self, step: int, tokens: int, reqs: int, decode: int, running: int, waiting: int = 0) -> None:
        q = self.cfg.uniform_decode_query_len
        self.engine.engine_step(
            step,
            total_tokens=tokens,
            num_reqs=reqs,
            num_decode_reqs=decode,
            placeholders=decode * self.num_spec,
            max_query_len=q if decode == reqs else tokens,
            min_query_len=q,
            running=running,
            waiting=waiting,
        )

    def engine_result(self, step: int, running: int, waiting: int = 0) -> None:
        self.engine.engine_result(step, ok=True, running=running, waiting=waiting, finished=0)

    def launch(
        self, rank: int, step: int, role: Role, key: GraphKey, eager_layers: int = LAYERS, skip_last: bool = False
    ) -> None:
        rec = self.ranks[rank]
        if key.mode is CUDAGraphMode.NONE:
            rec.launch(step, role, key, 0)
            seq = ops(key.num_tokens, eager_layers)
            for op in seq[:-1] if skip_last else seq:
                rec.collective(step, op.group, op.op, op.dtype, op.numel)
        else:
            rec.launch(step, role, key, self.hashes[(role, key)])

    def decode_step(
        self,
        step: int,
        reqs: int,
        *,
        open_on: Iterable[int] = (),
        drafter_override: Mapping[int, int] | None = None,
        not_launched: Iterable[int] = (),
        skip: Iterable[int] = (),
        result: bool = True,
    ) -> None:
        """A uniform decode step of ``reqs`` requests on every rank (engine record included)."""
        q = self.cfg.uniform_decode_query_len
        tokens = reqs * q
        self.engine_step(step, tokens, reqs, reqs, running=reqs)
        d = dispatch(self.cfg, tokens, reqs, uniform=True)
        open_on, not_launched, skip = set(open_on), set(not_launched), set(skip)
        for r, rec in enumerate(self.ranks):
            if r in skip:
                continue
            # As the vLLM plugin writes it: a graphed model launch folded into the step's begin record.
            fold = r not in not_launched and d.key.mode is not CUDAGraphMode.NONE
            rec.step_begin(
                step,
                d.key,
                unpadded_tokens=tokens,
                unpadded_reqs=reqs,
                padded_reqs=d.padded_reqs,
                placeholders=reqs * self.num_spec,
                launch_manifest=self.hashes[(Role.MODEL, d.key)] if fold else None,
            )
            if r in not_launched:
                continue
            if not fold:
                self.launch(r, step, Role.MODEL, d.key)
            if self.num_spec:
                dtok = (drafter_override or {}).get(r, tokens)
                self.launch(r, step, Role.DRAFTER, drafter_dispatch(self.cfg, dtok), eager_layers=1)
            if r not in open_on:
                rec.step_end(step)
        if result and not open_on and not not_launched and not skip:
            self.engine_result(step, running=reqs)

    def eager_step(
        self,
        step: int,
        tokens: int,
        reqs: int,
        decode: int,
        *,
        skip_last_on: Iterable[int] = (),
        open_on: Iterable[int] = (),
    ) -> None:
        self.engine_step(step, tokens, reqs, decode, running=reqs)
        key = GraphKey(CUDAGraphMode.NONE, tokens)
        skip_last_on, open_on = set(skip_last_on), set(open_on)
        for r, rec in enumerate(self.ranks):
            rec.step_begin(step, key, unpadded_tokens=tokens, unpadded_reqs=reqs)
            self.launch(r, step, Role.MODEL, key, skip_last=r in skip_last_on)
            if self.num_spec:
                self.launch(r, step, Role.DRAFTER, GraphKey(CUDAGraphMode.NONE, tokens), eager_layers=1)
            if r not in open_on:
                rec.step_end(step)
        if not open_on:
            self.engine_result(step, running=reqs)

    def snapshot(
        self,
        *,
        host: Mapping[int, str] | None = None,
        device: Mapping[int, str] | None = None,
        engine_host: str | None = None,
        dead: Iterable[int] = (),
        stall: StallInfo | None = None,
        procs: bool = True,
        engine_ledger: bool = True,
        native: Mapping[int, str] | None = None,
    ) -> Snapshot:
        dead = set(dead)

        def native_dump(pid: int, n: str | None) -> StackDump | None:
            return None if n is None else StackDump(pid, (thread("MainThread", NATIVE_FRAMES[n]),), native=True)

        def dump(pid: int, h: str | None, d: str | None) -> StackDump | None:
            threads = []
            if h is not None:
                threads.append(thread("MainThread", HOST_FRAMES[h]))
            if d is not None:
                threads.append(thread("device", DEVICE_FRAMES[d]))
            return StackDump(pid, tuple(threads)) if threads else None

        ranks = {}
        for r, rec in enumerate(self.ranks):
            ledger = read_ledger(rec.path)
            pid = 10_000 + r
            alive = r not in dead
            ranks[r] = ProcessEvidence(
                r,
                pid,
                ledger,
                dump(pid, (host or {}).get(r), (device or {}).get(r)) if alive else None,
                native_dump(pid, (native or {}).get(r)) if alive else None,
                ProcInfo(pid, alive) if procs else None,
            )
        engine = None
        if engine_ledger:
            eng = read_ledger(self.engine.path)
            engine_proc = ProcInfo(9_999, True) if procs else None
            engine = ProcessEvidence(None, 9_999, eng, dump(9_999, engine_host, None), None, engine_proc)
        return Snapshot(time.monotonic_ns(), time.time_ns(), "", ranks, engine, stall=stall, live=True)
