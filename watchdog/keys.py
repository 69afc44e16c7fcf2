"""vLLM's CUDA-graph key rules, as a pure function.

The demo engine's workers dispatch with it, and the analyzer uses it as the referee: from what
the engine scheduled for a step it computes the key every rank should have chosen.

Rules (vLLM's ``CudagraphDispatcher``, checked against 0.33.0 on CPU, see shared/design.md):
* capture sizes are rounded up to multiples of the uniform-decode query length
  (1 + num_speculative_tokens): [1, 2, 4, 8, 16, 24, ...] becomes [2, 4, 8, 16, 24, ...] for MTP=1;
* a uniform decode batch (every request has exactly that query length) under a mode with FULL
  decode graphs pads to the next capture size: FULL(num_tokens=padded, num_reqs=padded // q);
  the difference is the padded request slots (seq_len 0);
* a mixed batch runs PIECEWISE(padded) under FULL_AND_PIECEWISE / PIECEWISE, eagerly otherwise;
* anything larger than the largest capture size runs eagerly, unpadded;
* the MTP drafter replays PIECEWISE graphs only when the mixed mode is PIECEWISE (or FULL),
  and runs eagerly under FULL_DECODE_ONLY and NONE.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import ClassVar

from collectors.format import CUDAGraphMode, GraphKey
from collectors.jsonrecords import JsonRecord

LADDER = ("FULL_AND_PIECEWISE", "FULL_DECODE_ONLY", "NONE")
MODES = ("FULL_AND_PIECEWISE", "FULL_DECODE_ONLY", "PIECEWISE", "FULL", "NONE")


def default_capture_sizes(max_size: int, uniform_decode_query_len: int = 1) -> tuple[int, ...]:
    """vLLM's default list ([1, 2, 4] + multiples of 8, then of 16 past 256), spec-adjusted."""
    base = [1, 2, 4, *range(8, min(max_size, 256) + 1, 8), *range(272, max_size + 1, 16)]
    q = max(1, uniform_decode_query_len)
    rounded = sorted({-(-s // q) * q for s in base if s <= max_size})
    return tuple(s for s in rounded if s <= max_size)


@dataclass(frozen=True)
class DispatchConfig(JsonRecord):
    JSON_NAME: ClassVar[str] = "dispatch config"

    cudagraph_mode: str
    capture_sizes: tuple[int, ...]
    uniform_decode_query_len: int = 1

    def __post_init__(self) -> None:
        if self.cudagraph_mode not in MODES:
            raise ValueError(f"unknown cudagraph_mode {self.cudagraph_mode!r}; expected one of {', '.join(MODES)}")

    @property
    def max_capture_size(self) -> int:
        return self.capture_sizes[-1] if self.capture_sizes else 0

    @property
    def full_decode(self) -> bool:
        return self.cudagraph_mode in ("FULL_AND_PIECEWISE", "FULL_DECODE_ONLY", "FULL")

    @property
    def mixed_mode(self) -> CUDAGraphMode:
        if self.cudagraph_mode in ("FULL_AND_PIECEWISE", "PIECEWISE"):
            return CUDAGraphMode.PIECEWISE
        if self.cudagraph_mode == "FULL":
            return CUDAGraphMode.FULL
        return CUDAGraphMode.NONE

    def pad(self, num_tokens: int) -> int | None:
        """The capture size a batch of num_tokens pads to, or None if it runs eagerly."""
        i = bisect.bisect_left(self.capture_sizes, num_tokens)
        return self.capture_sizes[i] if i < len(self.capture_sizes) else None


@dataclass(frozen=True)
class Dispatch:
    key: GraphKey
    padded_reqs: int  # request slots the graph holds beyond the real requests


def dispatch(cfg: DispatchConfig, num_tokens: int, num_reqs: int, uniform: bool) -> Dispatch:
    """The key for the target model's forward pass."""
    eager = Dispatch(GraphKey(CUDAGraphMode.NONE, num_tokens), 0)
    if cfg.cudagraph_mode == "NONE":
        return eager
    padded = cfg.pad(num_tokens)
    if padded is None:
        return eager
    q = cfg.uniform_decode_query_len
    if uniform and cfg.full_decode and padded % q == 0:
        slots = padded // q
        return Dispatch(GraphKey(CUDAGraphMode.FULL, padded, slots, uniform=True), slots - num_reqs)
    mode = cfg.mixed_mode
    if mode is CUDAGraphMode.NONE:
        return eager
    if mode is CUDAGraphMode.FULL:
        return Dispatch(GraphKey(CUDAGraphMode.FULL, padded, num_reqs), 0)
    return Dispatch(GraphKey(CUDAGraphMode.PIECEWISE, padded), 0)


def drafter_dispatch(cfg: DispatchConfig, num_tokens: int) -> GraphKey:
    """The key for the MTP drafter's forward pass over num_tokens tokens."""
    if cfg.mixed_mode is CUDAGraphMode.NONE:
        return GraphKey(CUDAGraphMode.NONE, num_tokens)
    padded = cfg.pad(num_tokens)
    if padded is None:
        return GraphKey(CUDAGraphMode.NONE, num_tokens)
    return GraphKey(CUDAGraphMode.PIECEWISE, padded)


def next_rung(mode: str, ladder: tuple[str, ...] = LADDER) -> str | None:
    """The next safer cudagraph mode, or None at the bottom of the ladder."""
    if mode not in ladder:
        return ladder[1] if len(ladder) > 1 and mode != ladder[-1] else None
    i = ladder.index(mode)
    return ladder[i + 1] if i + 1 < len(ladder) else None
