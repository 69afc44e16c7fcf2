"""``watchdog demo``: start a demo TP deployment, drive it with the bench client, watch it.

The orchestrator is three things in one process: the bench client, the watcher (the agent's
core loop) and the demo's own bookkeeping (when a fault bit, to time detection). Only the
watcher's evidence reaches the analyzer; the fault plan and bite times never do.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from watchdog.demo.client import Workload, start_client
from watchdog.demo.engine import EngineArgs
from watchdog.demo.faults import FaultPlan
from watchdog.demo.proc import spawn_args, spawn_entry
from watchdog.detector import DetectorConfig
from watchdog.errors import DemoError, UsageError
from watchdog.evidence.gpus import Nvml
from watchdog.keys import DispatchConfig, default_capture_sizes
from watchdog.snapshot import Sources
from watchdog.supervisor.tree import unlink_rings
from watchdog.watcher import Incident, Watcher

DEMO_SCHEMA = "watchdog.demo/v1"


@dataclass(frozen=True)
class DemoOptions:
    tp: int = 2
    requests: int = 128
    concurrency: int = 32
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.0
    cudagraph_mode: str = "FULL_AND_PIECEWISE"
    num_speculative_tokens: int = 1
    max_num_seqs: int = 128
    fault: str = "none"
    fault_rank: int = 1
    fault_step: int | None = None
    seed: int = 0
    bursts: int = 1  # the requests go out in this many bursts ...
    idle_gap_s: float = 0.0  # ... separated by this much idle time (the server sits idle, not hung)
    workdir: str | None = None
    timeout_s: float = 300.0
    native_stacks: bool = True
    stall_floor_s: float = 1.0
    watch: bool = True  # False: run the deployment only, for an external `watchdog agent`
    fallback: bool = False  # True: the server under `watchdog run`'s supervisor + proxy, over HTTP
    max_restarts: int = 3  # the fallback's restart bound (per hour)
    device: str = "cpu"  # "cuda": real GPUs (one per rank), NCCL, CUDA graphs, NVML evidence

    def workload(self) -> Workload:
        return Workload(
            self.requests,
            self.concurrency,
            self.input_len,
            self.output_len,
            self.range_ratio,
            self.seed,
            bursts=self.bursts,
            idle_gap_s=self.idle_gap_s,
        )

    def validate(self) -> None:
        """Wrong arguments raise UsageError (exit 2); a machine that cannot run them, DemoError."""
        if self.cudagraph_mode not in ("FULL_AND_PIECEWISE", "FULL_DECODE_ONLY", "NONE"):
            raise UsageError(
                f"--cudagraph-mode {self.cudagraph_mode!r}: choose FULL_AND_PIECEWISE, FULL_DECODE_ONLY or NONE"
            )
        from watchdog.demo.faults import FAULTS

        if self.fault not in FAULTS:
            raise UsageError(f"--fault {self.fault!r}: unknown; choose one of {', '.join(FAULTS)}")
        if not 1 <= self.tp <= 16:
            raise UsageError(f"--tp must be between 1 and 16, got {self.tp}")
        if self.fault != "none" and not 0 <= self.fault_rank < self.tp:
            raise UsageError(f"--fault-rank {self.fault_rank} is not a rank of a TP={self.tp} deployment")
        if self.requests < 1 or self.concurrency < 1 or self.output_len < 1 or self.input_len < 1:
            raise UsageError("--requests, --concurrency, --input-len and --output-len must be at least 1")
        if not 0.0 <= self.range_ratio <= 1.0:
            raise UsageError(f"--range-ratio must be within [0, 1], got {self.range_ratio}")
        if self.bursts < 1:
            raise UsageError(f"--bursts must be at least 1, got {self.bursts}")
        if not 0.0 <= self.idle_gap_s < float("inf"):
            raise UsageError(f"--idle-gap must be a finite number of seconds >= 0, got {self.idle_gap_s}")
        if not 0.0 < self.stall_floor_s < float("inf"):
            raise UsageError(f"--stall-floor-s must be a positive number of seconds, got {self.stall_floor_s}")
        if self.max_restarts < 0:
            raise UsageError(f"--max-restarts must be at least 0, got {self.max_restarts}")
        if self.device not in ("cpu", "cuda"):
            raise UsageError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda":
            if self.fallback and self.watch:
                raise DemoError("--device cuda runs the core loop only: add --no-fallback")
            from watchdog.demo.cuda import cuda_problem

            problem = cuda_problem(self.tp)
            if problem is not None:
                raise DemoError(f"--device cuda: {problem}")


def kill_tree(proc: mp.process.BaseProcess) -> None:
    if proc.pid is None:
        return
    try:
        root = psutil.Process(proc.pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(family, timeout=10)
    proc.join(timeout=5)


def run_demo(
    opts: DemoOptions,
    say: Callable[[str], None] = lambda _m: None,
    probe: Callable[[Incident], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``probe`` runs once per incident while the deployment is still hung (the GPU checks use it
    to ask NCCL RAS and PyTorch's flight recorder about the same hang); its result is returned
    under "probes"."""
    opts.validate()
    cuda = opts.device == "cuda"
    if cuda:
        from watchdog.demo.cuda import apply_safe_env

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
    return {
        "schema": DEMO_SCHEMA,
        "tp": opts.tp,
        "cudagraph_mode": opts.cudagraph_mode,
        "fault": opts.fault,
        "requests": {
            "total": opts.requests,
            "succeeded": client_result.succeeded if client_result else 0,
            "failed": opts.requests - (client_result.succeeded if client_result else 0),
        },
        "incidents": [incident_json(i, bite_ns) for i in incidents],
        "fault_bites": bites_json(bites, started_ns),
        "watched": opts.watch,
        "restarts": [],
        "workdir": str(workdir),
        "elapsed_s": round(time.monotonic() - started, 3),
        **({"device": "cuda"} if cuda else {}),
        **({"probes": probes} if probe is not None else {}),
    }


def _fallback_demo(opts: DemoOptions, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    from watchdog.demo.fallback import run_fallback

    say(f"starting the TP={opts.tp} demo server under the supervisor ({opts.cudagraph_mode}) in {workdir}")
    started = time.monotonic()
    part = run_fallback(opts, workdir, say)
    return {
        "schema": DEMO_SCHEMA,
        "tp": opts.tp,
        "cudagraph_mode": opts.cudagraph_mode,
        "fault": opts.fault,
        **part,
        "workdir": str(workdir),
        "elapsed_s": round(time.monotonic() - started, 3),
    }


class Progress:
    """One line every ``every_s`` while nothing else is said (a silent demo looks hung)."""

    def __init__(self, say: Callable[[str], None], started: float, every_s: float = 10.0) -> None:
        self.say, self.started, self.every_s = say, started, every_s
        self.next = started + every_s

    def tick(self, what: str) -> None:
        now = time.monotonic()
        if now >= self.next:
            self.next = now + self.every_s
            self.say(f"{what} ({now - self.started:.0f} s)")


def _bites(bites: mp.Queue[Any]) -> list[tuple[int, int]]:
    """(rank, monotonic ns) of each process's first bite (-1: the engine)."""
    out: list[tuple[int, int]] = []
    while True:
        try:
            rank, ns = bites.get(timeout=0.2)
        except queue.Empty:
            return sorted(out, key=lambda b: b[1])
        out.append((-1 if rank is None else int(rank), int(ns)))


def bites_json(bites: list[tuple[int, int]], started_ns: int) -> list[dict[str, Any]]:
    """When the injected defect bit, per process: the demo's own knowledge, never the analyzer's."""
    return [{"rank": None if r < 0 else r, "after_s": round((ns - started_ns) / 1e9, 3)} for r, ns in bites]


def missed(result: dict[str, Any]) -> str | None:
    """A fault that bit with no incident after it is a failure of the demo: say so in one line."""
    bites = result.get("fault_bites") or []
    if not bites or result.get("incidents") or not result.get("watched", True):
        return None  # (--no-watch: an external agent watches, and its incidents are not ours to see)
    ranks = sorted({"engine" if b["rank"] is None else f"rank {b['rank']}" for b in bites})
    return (
        f"the {result['fault']} fault bit ({', '.join(ranks)}, first {bites[0]['after_s']:.2f} s in) "
        "and no incident followed: the watchdog missed it"
    )


def incident_json(i: Incident, bite_ns: int | None) -> dict[str, Any]:
    # Detection is timed from when the fault bit; with no bite on record (a stall nobody
    # injected), from when the stuck step began.
    age_s = i.stall.age_s if i.stall is not None else 0.0
    origin = bite_ns if bite_ns is not None else i.detected_mono_ns - int(age_s * 1e9)
    return {
        "diagnosis": i.diagnosis.to_json(),
        "detected_after_s": round((i.detected_mono_ns - origin) / 1e9, 3),
        "diagnosed_after_s": round((i.diagnosed_mono_ns - origin) / 1e9, 3),
        "bundle": str(i.bundle),
        "report": i.report,
    }
