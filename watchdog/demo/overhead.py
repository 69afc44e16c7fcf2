"""What the ledger costs: ns per record on the recorder's hot path, and demo decode steps/s with the
ledgers on vs off in ONE deployment (CPU or CUDA).

The on/off comparison switches the ledgers on and off in alternating blocks (on, off, on, off, ...)
under a steady decode load, so both sides see the same machine noise; the ratio of the medians is
reported. ``watchdog bench recorder`` and the GPU checks (``watchdog.demo.cuda.checks``) print these.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from collectors.format import CollectiveOp, CUDAGraphMode, GraphKey, ProcessKind, Role
from collectors.recorder import Recorder
from watchdog.demo.engine import EngineArgs
from watchdog.demo.faults import FaultPlan
from watchdog.keys import DispatchConfig, default_capture_sizes
from watchdog.supervisor.proc import spawn_args, spawn_entry
from watchdog.supervisor.tree import kill_tree, unlink_rings


def _time_ns_per_call(fn: Callable[[], None], n: int, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(runs)


def recorder_ns(records: int, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="watchdog-bench-") as d:
        rec = Recorder(d, kind=ProcessKind.WORKER, rank=0, world_size=1)
        key = GraphKey(CUDAGraphMode.FULL, 32, 16, uniform=True)
        dkey = GraphKey(CUDAGraphMode.PIECEWISE, 32)
        op = CollectiveOp("all_reduce", "tp", "bfloat16", 4096)
        h, hd = rec.manifest(Role.MODEL, key, [op]), rec.manifest(Role.DRAFTER, dkey, [op])

        def begin() -> None:
            rec.step_begin(7, key, unpadded_tokens=30, unpadded_reqs=15, padded_reqs=1, placeholders=15)

        def launch() -> None:
            rec.launch(7, Role.MODEL, key, h)

        def end() -> None:
            rec.step_end(7)

        def step() -> None:  # a decode step as the plugin and the demo workers write it: one STEP record
            rec.step_begin(
                8, key, unpadded_tokens=30, unpadded_reqs=15, padded_reqs=1, placeholders=15, launch_manifest=h
            )
            rec.launch(8, Role.DRAFTER, dkey, hd)  # stored into the STEP record
            rec.step_end(8)  # so is the end

        out = {
            "step_begin_ns_median": _time_ns_per_call(begin, records, repeats),
            "launch_ns_median": _time_ns_per_call(launch, records, repeats),
            "step_end_ns_median": _time_ns_per_call(end, records, repeats),
            "collective_ns_median": _time_ns_per_call(
                lambda: rec.collective(7, "tp", "all_reduce", "bfloat16", 4096), records, repeats
            ),
            "step_ns_median": _time_ns_per_call(step, records // 3, repeats),
        }
        rec.close()
        return {k: round(v, 1) for k, v in out.items()}


def demo_on_off(
    tp: int, blocks: int, block_s: float, say: Callable[[str], None], device: str = "cpu"
) -> dict[str, Any]:
    """Decode steps/s with the ledgers on vs off, alternating blocks in ONE deployment (CPU or CUDA)."""
    workdir = Path(tempfile.mkdtemp(prefix="watchdog-bench-"))
    ledger_dir = workdir / "ledgers"
    cfg = DispatchConfig("FULL_AND_PIECEWISE", default_capture_sizes(64, 2), 2)
    args = EngineArgs(
        tp=tp, workdir=str(workdir), ledger_dir=str(ledger_dir), dispatch=cfg, max_num_seqs=32, device=device
    )
    ctx = mp.get_context("spawn")
    requests: mp.Queue[Any] = ctx.Queue()
    results: mp.Queue[Any] = ctx.Queue()
    ready_rx, ready_tx = ctx.Pipe(duplex=False)
    engine = ctx.Process(
        target=spawn_entry,
        args=spawn_args("watchdog.demo.engine:engine_main", (args, FaultPlan()), (requests, results, None, ready_tx)),
    )
    engine.start()
    try:
        if not ready_rx.poll(240) or "error" in ready_rx.recv():
            raise RuntimeError("demo engine did not start")
        for rid in range(16):  # steady decode: 16 requests that never finish during the bench
            requests.put((rid, 16, 10**9))
        time.sleep(1.0 if device == "cpu" else 2.0)  # past the prefills

        def toggle(on: bool) -> tuple[int, int]:
            requests.put(("control", {"ledger": on}))
            while True:
                item = results.get(timeout=60)
                if item[0] == "control":
                    return int(item[1]), int(item[2])

        rates: dict[bool, list[float]] = {True: [], False: []}
        on = True
        prev = toggle(on)
        for _ in range(2 * blocks):
            time.sleep(block_s)
            on_now = not on
            cur = toggle(on_now)
            rates[on].append((cur[0] - prev[0]) / ((cur[1] - prev[1]) / 1e9))
            on, prev = on_now, cur
        say(f"steps/s ledger on {rates[True]} off {rates[False]}")
        on_m, off_m = statistics.median(rates[True]), statistics.median(rates[False])
        return {
            "demo_tp": tp,
            "demo_device": device,
            "demo_blocks_each": blocks,
            "demo_block_s": block_s,
            "demo_steps_per_s_on": [round(r, 1) for r in rates[True]],
            "demo_steps_per_s_off": [round(r, 1) for r in rates[False]],
            "demo_steps_per_s_ledger_on_median": round(on_m, 2),
            "demo_steps_per_s_ledger_off_median": round(off_m, 2),
            "demo_on_off_ratio": round(on_m / off_m, 4),
        }
    finally:
        kill_tree(engine)
        unlink_rings(ledger_dir)
        while True:
            try:
                results.get_nowait()
            except (queue.Empty, OSError):
                break
