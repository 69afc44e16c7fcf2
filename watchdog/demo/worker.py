"""A demo TP worker: reads each step from the broadcast ring, dispatches a graph key, replays.

Shaped like vLLM's GPU worker + model runner: ``execute_model`` builds the batch view from the
scheduler output, dispatches ``(mode, BatchDescriptor)``, replays a captured graph (or runs
eagerly), runs the MTP drafter the same way, synchronizes, and the output rank replies.

``device="cpu"``: the emulated stream and gloo. ``device="cuda"``: one GPU per rank (cuda:rank),
NCCL, real ``torch.cuda.CUDAGraph`` captures (``watchdog/demo/cuda``); the same code path.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.queues import Queue
from typing import Any

import torch
import torch.distributed as dist

from collectors.format import CUDAGraphMode, GraphKey, ProcessKind, Role
from collectors.recorder import Recorder, open_recorder
from watchdog.demo.cuda import CudaStream, apply_safe_env
from watchdog.demo.device import Stream
from watchdog.demo.faults import WorkerBugs
from watchdog.demo.model import (
    CapturedGraph,
    Device,
    TinyModel,
    TPComm,
    capture,
    indexer_kernel,
    reference_row,
    step_input,
)
from watchdog.demo.shmring import ShmRing
from watchdog.evidence.rings import RingLayout
from watchdog.keys import Dispatch, DispatchConfig, dispatch, drafter_dispatch
from watchdog.supervisor.proc import die_with_parent

DEMO_ENV = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class WorkerArgs:
    rank: int
    world_size: int
    ledger_dir: str
    store_path: str
    bcast_name: str
    bcast_layout: RingLayout
    resp_name: str
    resp_layout: RingLayout
    dispatch: DispatchConfig
    num_spec: int
    hidden: int
    layers: int
    drafter_layers: int
    chunk_rows: int
    seed: int
    pg_timeout_s: float
    ledger_slots: int
    instance: str
    device: str = "cpu"  # "cpu" (emulated stream, gloo) or "cuda" (cuda:rank, NCCL, CUDA graphs)


@dataclass(frozen=True)
class Batch:
    step: int
    query_lens: list[int]
    seq_lens: list[int]
    decode: list[bool]
    placeholders: int

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def num_reqs(self) -> int:
        return len(self.query_lens)

    def uniform(self, q: int) -> bool:
        return bool(self.query_lens) and all(d and n == q for d, n in zip(self.decode, self.query_lens, strict=True))

    @property
    def mixed_prefill_decode(self) -> bool:
        return any(self.decode) and not all(self.decode)


class Worker:
    def __init__(self, args: WorkerArgs, bugs: WorkerBugs, bites: Queue[Any] | None, rec: Recorder | None) -> None:
        self.args = args
        self.bugs = bugs
        self.bites = bites
        self.rec = rec
        self.stream: Device = CudaStream(args.rank) if args.device == "cuda" else Stream("device")
        self.comm = TPComm(self.stream, rec, args.chunk_rows)
        self.model = TinyModel(args.hidden, args.layers, args.seed, self.stream.device)
        self.drafter = TinyModel(args.hidden, args.drafter_layers, args.seed + 1, self.stream.device)
        self.graphs: dict[tuple[Role, GraphKey], CapturedGraph] = {}
        self.bcast = ShmRing.attach(args.bcast_name, args.bcast_layout, reader_rank=args.rank)
        self.resp = ShmRing.attach(args.resp_name, args.resp_layout)
        self.q = args.dispatch.uniform_decode_query_len
        self._last_num_reqs = 0
        self._forgot = False
        self._stats: dict[str, int] = {"step": -1, "finished": 0}
        self._stats_lock = threading.Lock()
        self._stats_leaked = False
        threading.Thread(target=self._report_stats, name="stats-reporter", daemon=True).start()

    # ---- start-up ------------------------------------------------------------------

    def _clamp(self) -> bool:
        return not (self.bugs.unclamped_indexer and self.bugs.at(self.comm.step))

    def capture_all(self) -> None:
        """Capture every key the dispatcher can return, as vLLM does at start-up."""
        cfg = self.args.dispatch
        keys: list[tuple[Role, GraphKey, int | None]] = []
        for size in cfg.capture_sizes:
            if cfg.full_decode and size % self.q == 0:
                keys.append(
                    (Role.MODEL, GraphKey(CUDAGraphMode.FULL, size, size // self.q, uniform=True), size // self.q)
                )
            if cfg.mixed_mode is CUDAGraphMode.PIECEWISE:
                keys.append((Role.MODEL, GraphKey(CUDAGraphMode.PIECEWISE, size), None))
                if self.args.num_spec:
                    keys.append((Role.DRAFTER, GraphKey(CUDAGraphMode.PIECEWISE, size), None))
        if isinstance(self.stream, CudaStream):
            self._warm_up()
        for role, key, slots in keys:
            model = self.model if role is Role.MODEL else self.drafter
            g = capture(model, self.stream, self.comm, key.num_tokens, slots, self._clamp)
            if self.rec is not None:
                g.hash = self.rec.manifest(role, key, g.manifest)
            self.graphs[(role, key)] = g

    def _warm_up(self) -> None:
        """Eager forwards before any capture, as vLLM's warm-up runs: cuBLAS handles and the
        Triton kernel are loaded outside capture. Every rank runs the same collectives; they are
        start-up, not steps, so the ledger does not see them."""
        rec, self.comm.recorder = self.comm.recorder, None
        n = self.args.dispatch.capture_sizes[0] if self.args.dispatch.capture_sizes else self.q
        x = torch.full((n, self.args.hidden), 0.01, device=self.stream.device)
        lens = torch.ones(max(1, n // self.q), dtype=torch.int64, device=self.stream.device)
        for model in (self.model, self.drafter):
            self.comm.begin_forward()
            model.forward(self.stream, self.comm, x, lens, lambda: True)
        self.stream.synchronize()
        self.comm.recorder = rec

    # ---- the step ------------------------------------------------------------------

    def execute_model(self, msg: dict[str, Any]) -> None:
        batch = Batch(msg["step"], msg["q"], msg["seq_lens"], msg["decode"], msg["placeholders"])
        step = batch.step
        self.comm.step = step
        d = dispatch(self.args.dispatch, batch.num_tokens, batch.num_reqs, batch.uniform(self.q))
        if self.rec is not None:  # as the vLLM plugin writes it: the model's launch folded into the begin
            graph = self.graphs.get((Role.MODEL, d.key))
            self.rec.step_begin(
                step,
                d.key,
                unpadded_tokens=batch.num_tokens,
                unpadded_reqs=batch.num_reqs,
                padded_reqs=d.padded_reqs,
                placeholders=batch.placeholders,
                launch_manifest=0 if graph is None or d.key.mode is CUDAGraphMode.NONE else graph.hash,
            )
        self._update_step_stats(batch)
        out = self._forward(Role.MODEL, d, batch)
        if self.args.num_spec:
            dk = self._drafter_key(batch)
            self._forward(Role.DRAFTER, Dispatch(dk, 0), batch)
        self.stream.synchronize()
        if self.rec is not None:
            self.rec.step_end(step)
        self._last_num_reqs = batch.num_reqs
        if self.args.rank == 0:  # the output rank answers for all, as in vLLM
            # The tokens come from the reduced activations, as a model's logits do: a reduction that
            # mixed steps of ranks out of step gives other values, and the engine's text goes wrong.
            self.resp.enqueue({"step": step, "ok": True, "exact": self._exact(out, step)})

    def _exact(self, out: torch.Tensor | None, step: int) -> bool:
        if out is None or out.shape[0] == 0:
            return True
        ref = reference_row(self.model, step_input(step), self.args.world_size)
        return bool(torch.allclose(out[:1], ref, rtol=1e-3, atol=1e-4))

    def _drafter_key(self, batch: Batch) -> GraphKey:
        key = drafter_dispatch(self.args.dispatch, batch.num_tokens)
        window = self.bugs.drafter_pads_by_requests
        if key.mode is CUDAGraphMode.NONE or window is None or not self.bugs.at(batch.step):
            return key
        # The defect: when every request is a decode holding only draft placeholders, this
        # rank sizes the drafter's graph by request count rather than by token count.
        lo, hi = window
        if batch.uniform(self.q) and batch.placeholders == batch.num_reqs * (self.q - 1) and lo <= batch.num_reqs <= hi:
            wrong = drafter_dispatch(self.args.dispatch, batch.num_reqs)
            if wrong != key:
                self._bite()
            return wrong
        return key

    def _forward(self, role: Role, d: Dispatch, batch: Batch) -> torch.Tensor | None:
        """Launch one forward; returns its output buffer (valid once the stream is synchronized)."""
        key = d.key
        model = self.model if role is Role.MODEL else self.drafter
        n = key.num_tokens
        if isinstance(self.stream, CudaStream):
            seq_lens = self.stream.upload(batch.seq_lens)
            self.stream.set_clamp(self._clamp())  # what this step's indexer launches will read
        else:
            seq_lens = torch.tensor(batch.seq_lens, dtype=torch.int64)
        if key.mode is CUDAGraphMode.NONE:
            if self.rec is not None and role is Role.DRAFTER:  # the model's is in the step's begin
                self.rec.launch(batch.step, role, key, 0)
            x = torch.empty(n, self.args.hidden, device=self.stream.device)
            value = step_input(batch.step)
            self.stream.launch(lambda: x.fill_(value))
            if (
                role is Role.MODEL
                and self.bugs.forgets_collective_on_mixed_eager
                and self.bugs.at(batch.step)
                and batch.mixed_prefill_decode
                and not self._forgot
            ):
                self._forgot = True  # once: the defect is on one rarely taken branch
                self.comm.forget = len(self.model.weights) - 1  # the last all-reduce
                self._bite()
            self.comm.begin_forward()
            return model.forward(self.stream, self.comm, x, seq_lens, self._clamp)
        g = self.graphs[(role, key)]
        if self.rec is not None and role is Role.DRAFTER:
            self.rec.launch(batch.step, role, key, g.hash)
        self._load_inputs(g, batch)
        if g.seq_lens is None:  # PIECEWISE: attention runs eagerly, on the real requests only
            self.stream.launch(indexer_kernel(self.stream, seq_lens, self._clamp))
        elif d.padded_reqs and not self._clamp():
            self._bite()
        self.stream.replay(g.graph)
        if (
            role is Role.MODEL
            and self.bugs.dies_mid_step
            and self.bugs.at(batch.step)
            and key.mode is CUDAGraphMode.FULL
            and batch.num_reqs >= 8
        ):
            self._bite()
            time.sleep(0.002)  # let the replay get into its collectives
            os.kill(os.getpid(), signal.SIGKILL)
        return g.out

    def _load_inputs(self, g: CapturedGraph, batch: Batch) -> None:
        x, lens = g.x, g.seq_lens
        real = list(batch.seq_lens)
        value = step_input(batch.step)
        if isinstance(self.stream, CudaStream):
            x.fill_(value)
            if lens is not None:
                lens.zero_()  # padded slots keep seq_len 0, as in vLLM
                lens[: len(real)].copy_(self.stream.upload(real))
            return

        def copy_inputs() -> None:
            x.fill_(value)
            if lens is not None:
                lens.zero_()  # padded slots keep seq_len 0, as in vLLM
                lens[: len(real)] = torch.tensor(real, dtype=torch.int64)

        self.stream.launch(copy_inputs)

    # ---- host-side bookkeeping ---------------------------------------------------------

    def _update_step_stats(self, batch: Batch) -> None:
        if self._stats_leaked:
            self._bite()
        with self._stats_lock:
            finished = max(0, self._last_num_reqs - batch.num_reqs)
            self._stats = {"step": batch.step, "finished": finished}

    def _report_stats(self) -> None:
        """Publishes step statistics a few times a second (like a metrics logger thread)."""
        while True:
            time.sleep(0.02)
            self._stats_lock.acquire()
            stats = dict(self._stats)
            if (
                self.bugs.stats_lock_leak
                and stats["finished"] > 0
                and stats["step"] >= 3
                and self.bugs.at(stats["step"])
            ):
                # The defect: this early exit forgets to release the lock.
                self._stats_leaked = True
                return
            self._stats_lock.release()

    def _bite(self) -> None:
        if self.bites is not None:
            self.bites.put((self.args.rank, time.monotonic_ns()))
            # Flush it through the pipe now: a worker-killed bite is followed by SIGKILL 2 ms
            # later, and under load the queue's feeder thread had not written it yet.
            self.bites.close()
            self.bites.join_thread()
            self.bites = None  # the first bite is the one the demo times


def worker_main(args: WorkerArgs, bugs: WorkerBugs, bites: Queue[Any] | None) -> None:
    die_with_parent()
    os.environ.update(DEMO_ENV)
    cuda = args.device == "cuda"
    if cuda:
        apply_safe_env()
        torch.cuda.set_device(args.rank)
    torch.set_num_threads(1)
    rec = open_recorder(
        args.ledger_dir,
        kind=ProcessKind.WORKER,
        rank=args.rank,
        world_size=args.world_size,
        n_slots=args.ledger_slots,
        instance=args.instance,
    )
    if rec is not None:
        rec.config(
            role="worker",
            tp_rank=args.rank,
            **args.dispatch.to_json(),
            num_speculative_tokens=args.num_spec,
        )
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{args.store_path}",
        rank=args.rank,
        world_size=args.world_size,
        timeout=datetime.timedelta(seconds=args.pg_timeout_s),
        device_id=torch.device("cuda", args.rank) if cuda else None,
    )
    # Warm the process group's connections up before serving, as vLLM's warm-up runs do, so the
    # first real steps do not pay for them (on NCCL: the communicator exists before any capture).
    warm = torch.zeros(args.chunk_rows, args.hidden, device=f"cuda:{args.rank}" if cuda else "cpu")
    for _ in range(3):
        dist.all_reduce(warm)
    if cuda:
        torch.cuda.synchronize()
    worker = Worker(args, bugs, bites, rec)
    worker.capture_all()
    worker.resp.enqueue({"ready": args.rank})
    while True:
        msg = worker.bcast.dequeue()
        if msg is None:
            break
        if "control" in msg:
            if rec is not None and "ledger" in msg["control"]:
                rec.enabled = bool(msg["control"]["ledger"])
            continue
        worker.execute_model(msg)
    dist.destroy_process_group()
