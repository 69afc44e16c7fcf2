"""The demo's tensor-parallel model: layers whose outputs are all-reduced across ranks.

Collectives go through ``TPComm``, the demo's counterpart of vLLM's ``GroupCoordinator``: while
the stream is capturing a graph they are appended to that graph's capture manifest, otherwise
they are eager and recorded in the ledger with a per-group sequence number. That is exactly
what the vLLM plugin records, from the same two places.

On the emulated device (CPU, gloo) the wire format moves fixed-size chunks (like a custom
all-reduce's fixed IPC buffer): a [T, H] all-reduce is ceil(T / chunk_rows) chunk all-reduces of
identical size. So ranks that replay graphs of different sizes issue different *counts* of
identical transfers, which gloo, like NCCL, cannot detect: the ranks with more transfers wait
forever. On CUDA (``watchdog/demo/cuda``) each all-reduce is one NCCL all_reduce, captured into
the graph, and the indexer is a Triton kernel: the mismatches and the hang are NCCL's and the GPU's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from collectors.format import CollectiveOp
from collectors.recorder import Recorder
from watchdog.demo.cuda import CudaStream
from watchdog.demo.device import Kernel, Stream

Device = Stream | CudaStream

GROUP = "tp"
DTYPE = "float32"
INDEXER_TILE = 64
INDEXER_MAX_GRID = 4096


def chunked_all_reduce(t: torch.Tensor, chunk_rows: int) -> None:
    rows, hidden = t.shape
    buf = torch.zeros(chunk_rows, hidden)
    for start in range(0, rows, chunk_rows):
        part = t[start : start + chunk_rows]
        buf.zero_()
        buf[: part.shape[0]].copy_(part)
        dist.all_reduce(buf)
        part.copy_(buf[: part.shape[0]])


def sparse_indexer_topk(seq_lens: torch.Tensor, clamp: Callable[[], bool]) -> None:
    """Top-k over each slot's context. Its lead block waits until every tile has reported.

    The context length is seq_len - 1, read as uint32. A padded graph slot has seq_len 0: without
    the clamp its length is 2**32 - 1, the barrier expects more tiles than the grid launches,
    and the lead block waits forever (vLLM #51593's mechanism, fixed by clamping).
    """
    lens = [s - 1 for s in seq_lens.tolist()]
    lens = [max(n, 0) for n in lens] if clamp() else [n & 0xFFFFFFFF for n in lens]
    expected = -(-max(lens, default=0) // INDEXER_TILE)
    arrived = min(expected, INDEXER_MAX_GRID)
    while arrived < expected:  # tiles beyond the grid never arrive
        time.sleep(0.0005)


def indexer_kernel(stream: Device, seq_lens: torch.Tensor, clamp: Callable[[], bool]) -> Kernel:
    """The indexer on this device. On CUDA the clamp is a flag the host sets before each forward."""
    if isinstance(stream, CudaStream):
        return stream.indexer(seq_lens)
    return partial(sparse_indexer_topk, seq_lens, clamp)


@dataclass
class TPComm:
    stream: Device
    recorder: Recorder | None
    chunk_rows: int
    step: int = 0
    capture_log: list[CollectiveOp] = field(default_factory=list)
    forget: int = -1  # index in the next eager forward of a collective a buggy path leaves out
    _issued: int = 0

    def begin_forward(self) -> None:
        self._issued = 0

    def all_reduce(self, t: torch.Tensor) -> None:
        op = CollectiveOp("all_reduce", GROUP, DTYPE, t.numel())
        if self.stream.capturing:
            self.capture_log.append(op)
        else:
            index, self._issued = self._issued, self._issued + 1
            if index == self.forget:
                self.forget = -1
                return
            if self.recorder is not None:
                self.recorder.collective(self.step, op.group, op.op, op.dtype, op.numel)
        if isinstance(self.stream, CudaStream):
            self.stream.launch(self.stream.all_reduce(t))
        else:
            self.stream.launch(partial(chunked_all_reduce, t, self.chunk_rows))


class TinyModel:
    """``layers`` blocks of (attention-proj, mlp) matmuls, each followed by an all-reduce."""

    def __init__(self, hidden: int, layers: int, seed: int, device: str = "cpu") -> None:
        gen = torch.Generator().manual_seed(seed)
        self.hidden = hidden
        self.weights = [
            (torch.randn(hidden, hidden, generator=gen) / hidden**0.5).to(device) for _ in range(2 * layers)
        ]

    def forward(
        self,
        stream: Device,
        comm: TPComm,
        x: torch.Tensor,
        seq_lens: torch.Tensor | None,
        clamp: Callable[[], bool],
    ) -> torch.Tensor:
        """Launch the forward's kernels (into a graph while capturing); returns the output buffer."""
        if seq_lens is not None:
            stream.launch(indexer_kernel(stream, seq_lens, clamp))
        h = x
        for w in self.weights:
            out = torch.empty(x.shape[0], self.hidden, device=x.device)
            stream.launch(partial(torch.matmul, h, w, out=out))
            comm.all_reduce(out)
            stream.launch(partial(torch.tanh, out, out=out))
            h = out
        return h


@dataclass
class CapturedGraph:
    graph: Any  # device.Graph, or torch.cuda.CUDAGraph on CUDA
    x: torch.Tensor  # static input [num_tokens, hidden]
    seq_lens: torch.Tensor | None  # static per-slot lengths (FULL graphs only)
    manifest: tuple[CollectiveOp, ...]
    hash: int = 0
    out: torch.Tensor | None = None  # static output [num_tokens, hidden]


def capture(
    model: TinyModel,
    stream: Device,
    comm: TPComm,
    num_tokens: int,
    num_slots: int | None,
    clamp: Callable[[], bool],
) -> CapturedGraph:
    device = stream.device
    x = torch.zeros(num_tokens, model.hidden, device=device)
    seq_lens = None if num_slots is None else torch.zeros(num_slots, dtype=torch.int64, device=device)
    comm.capture_log = []
    with stream.capture() as graph:
        out = model.forward(stream, comm, x, seq_lens, clamp)
    return CapturedGraph(graph, x, seq_lens, tuple(comm.capture_log), out=out)


def step_input(step: int) -> float:
    """The value every input row holds in ``step``: it changes from step to step, so a reduction that
    pairs one rank's step with another rank's different step sums partials of different inputs."""
    return 0.01 * (1 + step % 5)


def reference_row(model: TinyModel, value: float, world: int) -> torch.Tensor:
    """One output row computed without any collective: what the all-reduced forward must give when every
    rank contributed the same step (each rank's partial is the same, so the sum is ``world`` times it)."""
    h = torch.full((1, model.hidden), value, device=model.weights[0].device)
    for w in model.weights:
        h = torch.tanh(world * (h @ w))
    return h
