"""The demo's EngineCore: a scheduler shaped like vLLM's, a broadcast ring, N worker processes.

Each step the engine schedules a batch (decodes with 1 + k query tokens and k async-scheduling
draft placeholders each; prefill chunks under a token budget), records it in the engine ledger
(the referee the analyzer trusts), writes it to the broadcast ring, and waits for the output
rank's reply on its response ring, as vLLM's multiproc executor does.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

from collectors.format import ProcessKind
from collectors.recorder import Recorder, open_recorder
from watchdog.demo.faults import EngineBugs, FaultPlan
from watchdog.demo.shmring import ShmRing
from watchdog.evidence.rings import RingLayout
from watchdog.keys import DispatchConfig
from watchdog.supervisor.proc import die_with_parent, spawn_args, spawn_entry


@dataclass(frozen=True)
class EngineArgs:
    tp: int
    workdir: str
    ledger_dir: str
    dispatch: DispatchConfig
    num_spec: int = 1
    hidden: int = 32
    layers: int = 4
    drafter_layers: int = 1
    chunk_rows: int = 16
    seed: int = 0
    pg_timeout_s: float = 3600.0
    execute_timeout_s: float = 300.0
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    ledger_slots: int = 4096
    ring_chunks: int = 10
    ring_chunk_bytes: int = 1 << 16
    instance: str = ""
    progress: bool = False  # per-step token progress on the results queue (the HTTP front streams it)
    device: str = "cpu"  # "cuda": one GPU per worker rank, NCCL, CUDA graphs (watchdog/demo/cuda)


@dataclass
class Request:
    rid: int
    prompt_len: int
    output_len: int
    computed: int = 0  # prompt tokens already prefilled
    generated: int = 0

    @property
    def decoding(self) -> bool:
        return self.computed >= self.prompt_len


@dataclass
class Scheduler:
    args: EngineArgs
    bugs: EngineBugs
    on_bite: Any = None
    waiting: deque[Request] = field(default_factory=deque)
    running: list[Request] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def schedule(self, step: int) -> tuple[dict[str, Any], list[tuple[Request, int]]]:
        k = self.args.num_spec
        budget = self.args.max_num_batched_tokens
        plan: list[tuple[Request, int]] = []
        for req in self.running:
            n = 1 + k if req.decoding else min(req.prompt_len - req.computed, budget)
            if n <= 0 or budget < n:
                continue
            plan.append((req, n))
            budget -= n
        while self.waiting and len(self.running) < self.args.max_num_seqs and budget > 0:
            req = self.waiting.popleft()
            self._admit(req, step)
            n = min(req.prompt_len, budget)
            plan.append((req, n))
            budget -= n
        msg = {
            "step": step,
            "q": [n for _, n in plan],
            "seq_lens": [self._seq_len(r, n) for r, n in plan],
            "decode": [r.decoding for r, _ in plan],
            "placeholders": sum(k for r, _ in plan if r.decoding),
        }
        return msg, plan

    @staticmethod
    def _seq_len(req: Request, n: int) -> int:
        return (req.prompt_len + req.generated + n) if req.decoding else (req.computed + n)

    def _admit(self, req: Request, step: int) -> None:
        with self._lock:
            self.running.append(req)
            if len(self.running) > 8 and step >= 10:
                self._rebalance(step)

    def _rebalance(self, step: int) -> None:
        """Re-sort a busy batch by remaining work (called with the lock held)."""
        if self.bugs.scheduler_lock_reentry and self.bugs.at(step):
            # The defect: this path was written for callers that do not hold the lock.
            if self.on_bite is not None:
                self.on_bite()
            self._lock.acquire()
        self.running.sort(key=lambda r: r.output_len - r.generated)

    def abort(self, rid: int) -> None:
        with self._lock:
            self.waiting = deque(r for r in self.waiting if r.rid != rid)
            self.running = [r for r in self.running if r.rid != rid]

    def update(self, plan: list[tuple[Request, int]], seed: int) -> list[Request]:
        finished: list[Request] = []
        for req, n in plan:
            if req.decoding:
                accepted = 1 + sum(_accepts(seed, req.rid, req.generated + i) for i in range(n - 1))
                req.generated = min(req.output_len, req.generated + accepted)
            else:
                req.computed += n
                if req.decoding:
                    req.generated = 1  # the prefill's last position samples the first token
            if req.generated >= req.output_len:
                finished.append(req)
        if finished:
            done = {id(r) for r in finished}
            self.running = [r for r in self.running if id(r) not in done]
        return finished


def _accepts(seed: int, rid: int, pos: int) -> bool:
    """Whether the draft token at this position is accepted: deterministic, about half the time."""
    return zlib.crc32(f"{seed}:{rid}:{pos}".encode()) % 2 == 0


class Engine:
    def __init__(self, args: EngineArgs, plan: FaultPlan, bites: Queue[Any] | None) -> None:
        self.args = args
        self.bites = bites
        self.rec: Recorder | None = open_recorder(
            args.ledger_dir, kind=ProcessKind.ENGINE, rank=-1, world_size=args.tp, instance=args.instance
        )
        self.sched = Scheduler(args, plan.engine_bugs(), on_bite=self._bite)
        self.bcast_layout = RingLayout(args.tp, args.ring_chunks, args.ring_chunk_bytes)
        self.resp_layout = RingLayout(1, args.ring_chunks, args.ring_chunk_bytes)
        self.bcast = ShmRing.create(self.bcast_layout)
        self.resps = [ShmRing.create(self.resp_layout, reader_rank=0) for _ in range(args.tp)]
        if self.rec is not None:
            self.rec.config(role="engine", tp=args.tp, **args.dispatch.to_json(), num_speculative_tokens=args.num_spec)
            self.rec.meta(
                {
                    "t": "rings",
                    "broadcast": {"name": self.bcast.name, **self.bcast_layout.to_json()},
                    "responses": [
                        {"name": r.name, "rank": i, **self.resp_layout.to_json()} for i, r in enumerate(self.resps)
                    ],
                }
            )
        self.workers: list[BaseProcess] = []
        self._plan = plan
        self.step = 0
        self.finished = 0
        # Per request, the first token position sampled from activations a mismatched reduction produced:
        # from there on its text is not the model's.
        self.corrupt_from: dict[int, int] = {}

    def _bite(self) -> None:
        if self.bites is not None:
            self.bites.put((-1, time.monotonic_ns()))
            self.bites = None

    def start_workers(self) -> None:
        from watchdog.demo.worker import WorkerArgs  # not at module level: it imports torch

        ctx = mp.get_context("spawn")
        store = Path(self.args.workdir) / f"pg-store-{os.getpid()}"
        store.unlink(missing_ok=True)
        for rank in range(self.args.tp):
            wargs = WorkerArgs(
                rank=rank,
                world_size=self.args.tp,
                ledger_dir=self.args.ledger_dir,
                store_path=str(store),
                bcast_name=self.bcast.name,
                bcast_layout=self.bcast_layout,
                resp_name=self.resps[rank].name,
                resp_layout=self.resp_layout,
                dispatch=self.args.dispatch,
                num_spec=self.args.num_spec,
                hidden=self.args.hidden,
                layers=self.args.layers,
                drafter_layers=self.args.drafter_layers,
                chunk_rows=self.args.chunk_rows,
                seed=self.args.seed,
                pg_timeout_s=self.args.pg_timeout_s,
                ledger_slots=self.args.ledger_slots,
                instance=self.args.instance,
                device=self.args.device,
            )
            # spawn_entry: the death signal is armed before the worker imports torch
            args = spawn_args("watchdog.demo.worker:worker_main", (wargs, self._plan.worker_bugs(rank)), (self.bites,))
            p = ctx.Process(target=spawn_entry, args=args, daemon=False)
            p.start()
            self.workers.append(p)
        for rank, resp in enumerate(self.resps):
            msg = resp.dequeue(timeout=180)
            if msg != {"ready": rank}:
                raise RuntimeError(f"worker {rank} sent {msg!r} instead of ready")

    def run(self, requests: Queue[Any], results: Queue[Any]) -> None:
        while True:
            if not self._take_requests(requests, results):
                break
            if not self.sched.running and not self.sched.waiting:
                continue
            self.execute_step(results)
        self.shutdown()

    def _control(self, settings: dict[str, Any], results: Queue[Any]) -> None:
        if self.rec is not None and "ledger" in settings:
            self.rec.enabled = bool(settings["ledger"])
        self.bcast.enqueue({"control": settings}, timeout=self.args.execute_timeout_s)
        results.put(("control", self.step, time.monotonic_ns()))

    def _take_requests(self, requests: Queue[Any], results: Queue[Any]) -> bool:
        idle = not self.sched.running and not self.sched.waiting
        arrived = False
        while True:
            try:
                item = requests.get(timeout=0.05) if idle and not arrived else requests.get_nowait()
            except Exception:  # queue.Empty
                break
            if item is None:
                return False
            if item[0] == "control":  # `watchdog bench recorder` switches the ledgers on and off
                self._control(item[1], results)
                continue
            if item[0] == "abort":  # the HTTP front's client went away
                self.sched.abort(item[1])
                continue
            rid, prompt_len, output_len = item
            self.sched.waiting.append(Request(rid, prompt_len, output_len))
            arrived = True
        if arrived and idle and self.rec is not None:
            self.rec.engine_queue(running=len(self.sched.running), waiting=len(self.sched.waiting))
        return True

    def execute_step(self, results: Queue[Any]) -> None:
        step = self.step
        msg, plan = self.sched.schedule(step)
        q = msg["q"]
        if self.rec is not None:
            self.rec.engine_step(
                step,
                total_tokens=sum(q),
                num_reqs=len(q),
                num_decode_reqs=sum(msg["decode"]),
                placeholders=msg["placeholders"],
                max_query_len=max(q, default=0),
                min_query_len=min(q, default=0),
                running=len(self.sched.running),
                waiting=len(self.sched.waiting),
            )
        self.bcast.enqueue(msg, timeout=self.args.execute_timeout_s)
        reply = self.resps[0].dequeue(timeout=self.args.execute_timeout_s)
        ok = isinstance(reply, dict) and reply.get("step") == step
        exact = not isinstance(reply, dict) or bool(reply.get("exact", True))
        before = {r.rid: r.generated for r, _ in plan}
        finished = self.sched.update(plan, self.args.seed)
        if not exact:
            for r, _ in plan:
                if r.generated > before[r.rid]:
                    self.corrupt_from.setdefault(r.rid, before[r.rid])
        if self.args.progress:
            tokens = [(r.rid, r.generated, self.corrupt_from.get(r.rid, -1)) for r, _ in plan if r.generated]
            results.put(("progress", len(self.sched.running), len(self.sched.waiting), tokens))
        for req in finished:
            bad = self.corrupt_from.pop(req.rid, -1)
            results.put((req.rid, bad < 0, req.generated, bad))
            self.finished += 1
        if self.rec is not None:
            self.rec.engine_result(
                step, ok=ok, running=len(self.sched.running), waiting=len(self.sched.waiting), finished=self.finished
            )
        self.step += 1

    def shutdown(self) -> None:
        with contextlib.suppress(TimeoutError):
            self.bcast.enqueue(None, timeout=5)
        for p in self.workers:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        for ring in (self.bcast, *self.resps):
            ring.close()
            ring.unlink()


def engine_main(
    args: EngineArgs,
    plan: FaultPlan,
    requests: Queue[Any],
    results: Queue[Any],
    bites: Queue[Any] | None,
    ready: Connection,
) -> None:
    die_with_parent()
    if args.device == "cuda":
        from watchdog.demo.cuda import apply_safe_env

        apply_safe_env()  # the workers inherit it
    engine = Engine(args, plan, bites)
    try:
        engine.start_workers()
    except Exception as exc:
        ready.send({"error": f"{type(exc).__name__}: {exc}"})
        for p in engine.workers:
            p.kill()
        for ring in (engine.bcast, *engine.resps):
            ring.unlink()
        raise SystemExit(1) from None
    ready.send({"pids": [p.pid for p in engine.workers]})
    engine.run(requests, results)
