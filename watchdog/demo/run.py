"""``watchdog demo``: start a demo TP deployment, drive it with the bench client, watch it.

The orchestrator is three things in one process: the bench client, the watcher (the agent's
core loop) and the demo's own bookkeeping (when a fault bit, to time detection). Only the
watcher's evidence reaches the analyzer; the fault plan and bite times never do.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.demo.client import start_client
from watchdog.demo.engine import EngineArgs
from watchdog.demo.fallback import run_fallback
from watchdog.demo.faults import FaultPlan
from watchdog.demo.options import DemoOptions
from watchdog.demo.progress import Progress
from watchdog.demo.result import DemoResult, Requests, demo_incident, fault_bites
from watchdog.detector import DetectorConfig
from watchdog.errors import DemoError
from watchdog.evidence.gpus import Nvml
from watchdog.incident import Incident
from watchdog.keys import DispatchConfig, default_capture_sizes
from watchdog.snapshot import Sources
from watchdog.supervisor.proc import spawn_args, spawn_entry
from watchdog.supervisor.tree import kill_tree, unlink_rings
from watchdog.watcher import Watcher


def run_demo(
    opts: DemoOptions,
    say: Callable[[str], None] = lambda _m: None,
    probe: Callable[[Incident], dict[str, Any]] | None = None,
) -> DemoResult:
    """``probe`` runs once per incident while the deployment is still hung (the GPU checks use it
    to ask NCCL RAS and PyTorch's flight recorder about the same hang); its result is returned
    under "probes"."""
    opts.validate()
    cuda = opts.device == "cuda"
    if cuda:
        from watchdog.demo.cuda import apply_safe_env  # imports torch: only for --device cuda

        apply_safe_env()
    workdir = Path(opts.workdir) if opts.workdir else Path(tempfile.mkdtemp(prefix="watchdog-demo-"))
    ledger_dir = workdir / "ledgers"
    incidents_dir = workdir / "incidents"
    ledger_dir.mkdir(parents=True, exist_ok=True)
    for old in ledger_dir.glob("*.ledger"):
        old.unlink()
    if opts.fallback and opts.watch:
        return _fallback_demo(opts, workdir, say)
    q = 1 + opts.num_speculative_tokens
    dispatch_cfg = DispatchConfig(opts.cudagraph_mode, default_capture_sizes(min(2 * opts.max_num_seqs, 512), q), q)
    eargs = EngineArgs(
        tp=opts.tp,
        workdir=str(workdir),
        ledger_dir=str(ledger_dir),
        dispatch=dispatch_cfg,
        num_spec=opts.num_speculative_tokens,
        seed=opts.seed,
        max_num_seqs=opts.max_num_seqs,
        device=opts.device,
    )
    plan = FaultPlan(opts.fault, opts.fault_rank, opts.fault_step)
    ctx = mp.get_context("spawn")
    requests_q: mp.Queue[Any] = ctx.Queue()
    results_q: mp.Queue[Any] = ctx.Queue()
    bites_q: mp.Queue[Any] = ctx.Queue()
    ready_rx, ready_tx = ctx.Pipe(duplex=False)
    engine = ctx.Process(  # spawn_entry: dies with us from its first instruction, before heavy imports
        target=spawn_entry,
        args=spawn_args("watchdog.demo.engine:engine_main", (eargs, plan), (requests_q, results_q, bites_q, ready_tx)),
        name="demo-engine",
    )
    say(
        f"starting TP={opts.tp} demo engine ({opts.cudagraph_mode}, MTP={opts.num_speculative_tokens}"
        f"{', CUDA + NCCL' if cuda else ''}) in {workdir}"
    )
    started, started_ns = time.monotonic(), time.monotonic_ns()
    engine.start()
    incidents: list[Incident] = []
    probes: list[dict[str, Any]] = []
    gpus = Nvml() if cuda else None  # real utilization / power / SM clock / XIDs for the analyzer
    stop = threading.Event()
    watcher = Watcher(
        ledger_dir,
        incidents_dir,
        Sources(native=opts.native_stacks, gpus=gpus),
        DetectorConfig(floor_s=opts.stall_floor_s),
    )
    healthy_exit = False
    client_result = None
    deadline = started + opts.timeout_s  # --timeout covers start-up too
    progress = Progress(say, started)
    try:
        while not ready_rx.poll(0.5):
            if time.monotonic() > deadline:
                raise DemoError(f"the demo engine did not become ready within --timeout {opts.timeout_s:g} s")
            if not engine.is_alive():
                raise DemoError(f"the demo engine exited while starting (exit code {engine.exitcode})")
            progress.tick("starting: engine and workers loading, capturing graphs")
        ready = ready_rx.recv()
        if "error" in ready:
            raise DemoError(f"the demo engine failed to start: {ready['error']}")
        say(f"engine and {opts.tp} workers ready after {time.monotonic() - started:.1f} s (graphs captured)")
        workload = opts.workload()
        client_result = start_client(workload, requests_q, results_q, stop)
        shape = ""
        if opts.bursts > 1:
            sizes = workload.burst_sizes()
            shape = f" in {len(sizes)} bursts of {min(sizes)}-{max(sizes)}, {opts.idle_gap_s:g} s idle between"
        say(f"bench client: {opts.requests} requests{shape}, max concurrency {opts.concurrency}, fault {opts.fault}")
        while not client_result.done.is_set():
            stall = watcher.poll() if opts.watch else None
            if stall is not None:
                if stall.kind == "divergence":
                    say(f"ranks out of step at step {stall.step} (no stall yet); gathering")
                else:
                    age_txt, limit = f"{stall.age_s:.2f}", f"{stall.deadline_s:.2f}"
                    say(f"stall: step {stall.step} open {age_txt} s > deadline {limit} s; gathering")
                incident = watcher.handle(stall)
                if incident.recovered:  # a slow step, over by the time the evidence was read
                    say(f"stall recovered (a slow step, not an incident): {incident.bundle}")
                    continue
                incidents.append(incident)
                say(f"diagnosed {incident.diagnosis.verdict.value}; bundle {incident.bundle}")
                if probe is not None:
                    probes.append(probe(incident))
                break
            if time.monotonic() > deadline:
                say(f"demo timed out after {opts.timeout_s:.0f} s without finishing or a diagnosis")
                break
            if not engine.is_alive():
                say("the demo engine exited unexpectedly")
                break
            progress.tick(f"serving: {client_result.succeeded}/{opts.requests} requests done")
            time.sleep(0.05)
        healthy_exit = client_result.done.is_set() and not incidents
    finally:
        stop.set()
        watcher.close()
        if gpus is not None:
            gpus.close()
        if healthy_exit:
            requests_q.put(None)
            engine.join(timeout=30)
        kill_tree(engine)
        unlink_rings(ledger_dir)
        for store in workdir.glob("pg-store-*"):
            store.unlink(missing_ok=True)
    bites = _bites(bites_q)
    bite_ns = min((ns for _r, ns in bites), default=None)
    succeeded = client_result.succeeded if client_result else 0
    return DemoResult(
        tp=opts.tp,
        cudagraph_mode=opts.cudagraph_mode,
        fault=opts.fault,
        requests=Requests(opts.requests, succeeded, opts.requests - succeeded),
        incidents=tuple(demo_incident(i, bite_ns) for i in incidents),
        fault_bites=fault_bites(bites, started_ns),
        workdir=str(workdir),
        elapsed_s=round(time.monotonic() - started, 3),
        watched=opts.watch,
        device=opts.device,
        probes=tuple(probes) if probe is not None else None,
    )


def _fallback_demo(opts: DemoOptions, workdir: Path, say: Callable[[str], None]) -> DemoResult:
    say(f"starting the TP={opts.tp} demo server under the supervisor ({opts.cudagraph_mode}) in {workdir}")
    started = time.monotonic()
    part = run_fallback(opts, workdir, say)
    return DemoResult(
        tp=opts.tp,
        cudagraph_mode=opts.cudagraph_mode,
        fault=opts.fault,
        requests=part.requests,
        incidents=part.incidents,
        fault_bites=part.fault_bites,
        restarts=part.restarts,
        fallback=part.outcome,
        workdir=str(workdir),
        elapsed_s=round(time.monotonic() - started, 3),
    )


def _bites(bites: mp.Queue[Any]) -> list[tuple[int, int]]:
    """(rank, monotonic ns) of each process's first bite (-1: the engine)."""
    out: list[tuple[int, int]] = []
    while True:
        try:
            rank, ns = bites.get(timeout=0.2)
        except queue.Empty:
            return sorted(out, key=lambda b: b[1])
        out.append((-1 if rank is None else int(rank), int(ns)))
