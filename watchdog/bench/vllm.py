"""``watchdog bench plugin --vllm``: the plugin's cost on a real ``vllm serve``.

Two arms, the same server, model and workload: with the watchdog's plugin loaded by vLLM and writing
its ledgers (``on``), and without it (``off``). The arms run in alternating blocks (on, off, on, off,
...; a fresh server per block, the compile cache shared, so both arms start warm); each block sends
a warm-up, then the timed decode workload (greedy, ``ignore_eos``, fixed output length, bounded
concurrency) and counts output tokens per second. Reported: the medians per arm, the ratio
off/on of the medians and its range over adjacent block pairs, and the per-step cost that the
difference implies, with the decode steps of an ``on`` block counted from its own ledger.

One server at a time: on a CPU machine vLLM's idle workers poll their broadcast ring, so a second
idle server would take CPU from the measured one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from collectors.format import StepBegin
from collectors.reader import read_ledger
from watchdog.demo.httpclient import complete
from watchdog.demo.vllm.serve import MODEL_NAME, VllmServer, find_vllm, tiny_model, vllm_python
from watchdog.errors import WatchdogError


def _block(server: VllmServer, prompts: list[str], output_len: int, concurrency: int) -> tuple[float, int]:
    """(seconds, output tokens) of one timed pass of the workload."""

    def one(prompt: str) -> int:
        _text, why = complete(server.base_url, prompt, output_len, 600.0, model=MODEL_NAME)
        if why:
            raise WatchdogError(f"a bench request to {server.base_url} failed: {why} ({server.log_tail(3)})")
        return output_len

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, prompts[:concurrency]))  # warm-up: first shapes, first compiles
        t0 = time.perf_counter()
        tokens = sum(pool.map(one, prompts))
        return time.perf_counter() - t0, tokens


def _steps(ledgers: Path | None) -> int:
    """Decode/prefill steps rank 0 began (from its ledger)."""
    if ledgers is None or not (ledgers / "rank000.ledger").exists():
        return 0
    return sum(1 for r in read_ledger(ledgers / "rank000.ledger").records if isinstance(r, StepBegin))


def bench_vllm_plugin(
    *,
    vllm: str | None,
    workdir: Path,
    blocks: int = 3,
    requests: int = 64,
    concurrency: int = 16,
    output_len: int = 64,
    tp: int = 2,
    say: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    exe = find_vllm(vllm)
    model = tiny_model(vllm_python(exe))
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    prompts = [" ".join(words[(i + j) % len(words)] for j in range(8)) + f" {i}" for i in range(requests)]
    tput: dict[str, list[float]] = {"on": [], "off": []}
    secs: dict[str, list[float]] = {"on": [], "off": []}
    steps_on: list[int] = []
    for b in range(blocks):
        for arm in ("on", "off") if b % 2 == 0 else ("off", "on"):
            work = workdir / f"block{b}-{arm}"
            with VllmServer(exe, model, work, tp=tp, plugin=arm == "on") as server:
                server.wait_ready()
                before = _steps(server.ledgers)
                seconds, tokens = _block(server, prompts, output_len, concurrency)
                if arm == "on":
                    steps_on.append(_steps(server.ledgers) - before)
            tput[arm].append(tokens / seconds)
            secs[arm].append(seconds)
            say(f"block {b} {arm}: {tokens / seconds:.1f} output tokens/s ({seconds:.2f} s)")
    med = {arm: statistics.median(v) for arm, v in tput.items()}
    pair_ratios = [off / on for on, off in zip(tput["on"], tput["off"], strict=True)]
    steps = statistics.median(steps_on) if steps_on else 0
    delta_s = statistics.median(secs["on"]) - statistics.median(secs["off"])
    return {
        "vllm": str(exe),
        "tp": tp,
        "blocks_per_arm": blocks,
        "requests": requests,
        "concurrency": concurrency,
        "output_len": output_len,
        "tokens_per_s_on": [round(x, 2) for x in tput["on"]],
        "tokens_per_s_off": [round(x, 2) for x in tput["off"]],
        "median_on": round(med["on"], 2),
        "median_off": round(med["off"], 2),
        "ratio_off_on": round(med["off"] / med["on"], 4),
        "ratio_off_on_pairs": [round(r, 4) for r in pair_ratios],
        "steps_per_block": steps,
        "step_cost_us": round(delta_s / steps * 1e6, 1) if steps else None,
        "step_time_us_off": round(statistics.median(secs["off"]) / steps * 1e6, 1) if steps else None,
    }
