"""The demo model's text: each generated token is a function of the whole text before it.

So generation is deterministic, and continuing from ``prompt + text streamed so far`` yields exactly
the rest of the uninterrupted completion: that is what lets a stream resumed across a restart be
checked against a fault-free run, byte for byte.
"""

from __future__ import annotations

import zlib

MODEL = "watchdog-demo"  # the name the demo server serves in /v1/models, and its clients ask for

VOCAB = (
    "the", "graph", "rank", "step", "ring", "shape", "batch", "token", "decode", "prefill", "kernel", "stream",
    "replay", "capture", "padded", "slot", "draft", "accept", "reduce", "gather", "scatter", "engine", "worker",
    "ledger", "watch", "stall", "key", "mode", "piecewise", "full", "eager", "safe",
)  # fmt: skip


def next_token(text: str) -> str:
    return " " + VOCAB[zlib.crc32(text.encode()) % len(VOCAB)]


def model_text(prefix: str, n: int, sent: int = 0, corrupt_from: int = -1) -> list[str]:
    """The next ``n`` tokens after ``prefix`` (``sent`` already streamed) as the demo model samples them:
    from position ``corrupt_from`` on (when >= 0) the activations came from reductions that mixed
    steps of ranks out of step, and every token sampled from them is a different one."""
    out: list[str] = []
    for i in range(sent, sent + n):
        tok = next_token(prefix)
        if 0 <= corrupt_from <= i:
            tok = " " + VOCAB[(VOCAB.index(tok[1:]) + 1) % len(VOCAB)]
        out.append(tok)
        prefix += tok
    return out


def continue_text(prefix: str, n: int) -> list[str]:
    """The next ``n`` tokens after ``prefix``."""
    out: list[str] = []
    for _ in range(n):
        tok = next_token(prefix)
        out.append(tok)
        prefix += tok
    return out


def prompt_tokens(prompt: str) -> int:
    """The demo's tokenizer: whitespace-separated words (at least one)."""
    return max(1, len(prompt.split()))


def make_prompt(n_tokens: int, seed: int) -> str:
    """A prompt of ``n_tokens`` words for the bench client."""
    return "".join(continue_text(f"request {seed}:", n_tokens)).strip()
