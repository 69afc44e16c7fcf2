# mypy: ignore-errors
# (triton has no type information and is absent on CPU-only machines; this module is imported
# only on the CUDA path.)
"""The sparse indexer's top-k kernel, in Triton, with vLLM #51593's defect.

Each request slot gets ``TILES`` blocks. A slot's context length is ``seq_len - 1``, read as
uint32; every tile covering part of it reports to a per-slot arrival counter in global memory,
and the slot's lead block (tile 0) waits on that counter until all ``ceil(length / TILE)`` tiles
have arrived. A padded graph slot has seq_len 0: without the clamp its length is 2**32 - 1, the
barrier expects 16384 arrivals while only ``TILES`` blocks exist, and the lead block spins
forever. The kernel never retires, so the graph replay that contains it never finishes: the host
sits in ``torch.cuda.synchronize`` with the GPU at 100 % utilization.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Blocks per slot x positions per block: contexts up to 4M positions are covered (a healthy decode
# that runs for hours stays far inside), while 2**32 - 1 needs 16384 tiles. 16 one-warp blocks per
# slot keep every FULL graph's grid (<= 128 slots here) resident at once on an H100/H200.
TILE = 1 << 18
TILES = 16


@triton.jit
def _indexer_topk_kernel(seq_lens_ptr, clamp_ptr, arrivals_ptr, lengths_ptr, TILE: tl.constexpr):
    tile = tl.program_id(0)  # a slot's tiles are neighbours in launch order: its lead never starves them
    slot = tl.program_id(1)
    ctx = tl.load(seq_lens_ptr + slot) - 1
    if tl.load(clamp_ptr) != 0:
        ctx = tl.maximum(ctx, 0)
    length = tl.where(ctx < 0, ctx + 4294967296, ctx)  # the uint32 read of a negative length
    expected = (length + TILE - 1) // TILE
    if tile < expected:
        tl.atomic_add(arrivals_ptr + slot, 1)
    if tile == 0:
        while tl.atomic_add(arrivals_ptr + slot, 0) < expected:
            pass
        tl.atomic_xchg(arrivals_ptr + slot, 0)  # every tile has arrived: ready for the next launch
        tl.store(lengths_ptr + slot, length)


def indexer_topk(seq_lens: torch.Tensor, clamp: torch.Tensor, arrivals: torch.Tensor, lengths: torch.Tensor) -> None:
    slots = seq_lens.shape[0]
    if slots == 0:
        return
    _indexer_topk_kernel[(TILES, slots)](seq_lens, clamp, arrivals, lengths, TILE=TILE, num_warps=1)
