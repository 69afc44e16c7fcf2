"""``watchdog demo --engine vllm``: the demo on a real ``vllm serve``.

The same path a user runs (``watchdog run -- vllm serve ...``): the supervisor starts vLLM with the
watchdog's plugin loaded by vLLM itself, the resuming proxy fronts vLLM's own OpenAI server, and a
client shaped like SGLang's bench_serving (random output lengths, a range ratio) streams requests
through the proxy. The fault is a real defect inside real vLLM code (``faults.py``), switched on in
the server's environment only (``VLLM_TEST_FAULT``, a variable the watchdog never reads) and only
until it first bites (``VLLM_TEST_FAULT_ONCE``: the restarted server runs clean). When it bit is
the demo's own knowledge (the file the plugin creates then), never the analyzer's.

At the end the same requests are sent again, directly to the server that is up then: every
completion the client got through the proxy (greedy, ``ignore_eos``) must equal that uninterrupted
run's text, resumed streams included.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from watchdog.demo.httpclient import complete
from watchdog.demo.progress import Progress
from watchdog.demo.result import DemoResult, FallbackOutcome, Requests, demo_incident, fault_bites
from watchdog.demo.supervised import start_supervised
from watchdog.demo.vllm.faults import CORRUPTS_OUTPUT, KINDS
from watchdog.demo.vllm.serve import (
    MODEL_NAME,
    compile_cache,
    find_vllm,
    remove_leftovers,
    serve_cmd,
    server_env,
    shm_entries,
    tiny_model,
    vllm_python,
)
from watchdog.errors import UsageError
from watchdog.supervisor.run import Supervisor, healthy

FAULTS = ("none", *KINDS)
WORDS = "the quick brown fox jumps over a lazy dog while tensor parallel ranks step through graph keys"


@dataclass(frozen=True)
class VllmDemoOptions:
    workdir: Path
    vllm: str | None = None  # the `vllm` executable (default: on PATH)
    model: str | None = None  # a model directory (default: the tiny Llama, built offline once)
    tp: int = 2
    fault: str = "none"
    fault_rank: int = 1
    fault_step: int = 30
    requests: int = 64
    concurrency: int = 16
    output_len: int = 32
    range_ratio: float = 0.5
    seed: int = 0
    timeout_s: float = 600.0
    max_restarts: int = 3
    stall_floor_s: float = 1.0
    native_stacks: bool = True

    def validate(self) -> None:
        if self.fault not in FAULTS:
            raise UsageError(f"--fault {self.fault}: on --engine vllm one of {', '.join(FAULTS)}")
        if self.tp < 1 or not 0 <= self.fault_rank < self.tp:
            raise UsageError(f"--fault-rank {self.fault_rank}: must be a rank of --tp {self.tp}")
        if self.requests < 1 or self.concurrency < 1 or self.output_len < 1 or self.fault_step < 1:
            raise UsageError("--requests, --concurrency, --output-len and --fault-step must be positive")
        if not 0.0 <= self.range_ratio <= 1.0:
            raise UsageError("--range-ratio must be within [0, 1]")

    def fault_spec(self) -> str:
        return "" if self.fault == "none" else f"{self.fault}:{self.fault_rank}:{self.fault_step}"


def workload(n: int, output_len: int, range_ratio: float, seed: int = 0) -> list[tuple[str, int]]:
    """SGLang bench_serving's random dataset, in words: output lengths drawn from
    ``[range_ratio * len, len]``, prompts of 4-24 words."""
    rng = random.Random(seed)
    words = WORDS.split(" ")
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(4, 24)))
        out.append((prompt, rng.randint(max(1, int(output_len * range_ratio)), output_len)))
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_vllm_demo(opts: VllmDemoOptions, say: Callable[[str], None]) -> DemoResult:
    """Serve, inject, watch, restart, check every text."""
    opts.validate()
    exe = find_vllm(opts.vllm)
    python = vllm_python(exe)
    say(f"vLLM: {exe} (python {python}); its output goes to {opts.workdir / 'vllm.log'}")
    model = Path(opts.model).resolve() if opts.model else tiny_model(python)
    work = opts.workdir.resolve()
    bit = work / "fault-bit"
    bit.unlink(missing_ok=True)
    env = server_env(work / "server", None, fault=opts.fault_spec(), tp=opts.tp, cache=compile_cache(opts.fault))
    env["VLLM_TEST_FAULT_ONCE"] = str(bit)
    port = _free_port()
    before = shm_entries()
    requests = workload(opts.requests, opts.output_len, opts.range_ratio, opts.seed)
    got: list[tuple[str, str]] = []
    want: list[tuple[str, str]] | None = None
    run = start_supervised(
        serve_cmd(exe, model, port, tp=opts.tp),
        port,
        work,
        opts,
        say,
        env=env,
        output=work / "vllm.log",
        unexplained_stall_s=20.0,
    )
    sup, upstream, runner, started = run.sup, run.upstream, run.runner, run.started_mono_ns
    try:
        if _wait_serving(upstream, runner, opts.timeout_s, say):
            say(f"client: {opts.requests} streamed requests through the proxy, {opts.concurrency} at a time")
            got = _send(requests, run.proxy_url, opts, say)
            if _settled(sup, upstream, runner, say):
                say("reference: the same requests again, directly to the server that is up now")
                want = _send(requests, upstream, opts, lambda _m: None)
        else:
            say(f"vLLM did not come up: {_tail(work / 'vllm.log')}")
    finally:
        run.stop(join_s=90)
        remove_leftovers(before)
    bite_ns = _bite_mono_ns(bit)
    bites = [] if bite_ns is None else [(-1 if opts.fault == "engine-stall" else opts.fault_rank, bite_ns)]
    incidents, lo = [], started
    for inc in sup.incidents:
        first = bite_ns if bite_ns is not None and lo <= bite_ns <= inc.detected_mono_ns else None
        incidents.append(demo_incident(inc, first))
        lo = inc.detected_mono_ns
    got = got or [("", "not sent: vLLM did not serve")] * opts.requests
    pairs = list(zip(got, want or got, strict=True))
    differ = [i for i, (a, b) in enumerate(pairs) if not a[1] and not b[1] and a[0] != b[0]]
    unchecked = len(got) if want is None else sum(1 for a, b in pairs if not a[1] and b[1])
    texts = {"requests": requests, "got": got, "reference": want, "differ": differ}
    (work / "texts.json").write_text(json.dumps(texts, indent=1))
    errors: dict[str, int] = {}
    for _, why in got:
        if why:
            errors[why] = errors.get(why, 0) + 1
    served = sum(1 for _, why in got if not why)
    return DemoResult(
        tp=opts.tp,
        cudagraph_mode="vLLM's own",
        fault=opts.fault,
        requests=Requests(
            opts.requests, served - len(differ), opts.requests - served + len(differ), len(differ), errors
        ),
        incidents=tuple(incidents),
        fault_bites=fault_bites(bites, started),
        workdir=str(work),
        elapsed_s=round((time.monotonic_ns() - started) / 1e9, 1),
        restarts=tuple(r.to_json() for r in sup.restarts),
        fallback=FallbackOutcome(
            sup.state.to_json(run.cfg.policy),
            sup.state.gave_up,
            run.proxy.stats,
            run.outcome[0] if run.outcome else None,
        ),
        vllm={
            "exe": str(exe),
            "model": str(model),
            "unchecked": unchecked,  # served, but the reference run could not give its text
            "output_corrupting_fault": opts.fault in CORRUPTS_OUTPUT,
        },
    )


def _wait_serving(base_url: str, runner: threading.Thread, timeout_s: float, say: Callable[[str], None]) -> bool:
    """Until vLLM answers /health (start-up: tens of seconds on a CPU; the first compile a minute)."""
    progress = Progress(say, time.monotonic())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and runner.is_alive():
        if healthy(base_url):
            return True
        progress.tick("waiting for vLLM to serve")
        time.sleep(0.5)
    return False


def _settled(sup: Supervisor, upstream: str, runner: threading.Thread, say: Callable[[str], None]) -> bool:
    """Until the server is up and stays the same generation for a few seconds with no new incident:
    a restart the last answers caused (a divergence is caught as its step ends) must be over before
    the reference run, or the reference would come from the server that diverged."""
    deadline = time.monotonic() + 600
    seen = (-1, -1)
    stable_since = time.monotonic()
    while time.monotonic() < deadline and runner.is_alive():
        now = (sup.generation, len(sup.incidents))
        if now != seen:
            seen, stable_since = now, time.monotonic()
        elif (
            time.monotonic() - stable_since >= 5.0
            and _wait_serving(upstream, runner, 300, say)
            and (sup.generation, len(sup.incidents)) == seen
        ):
            return True
        time.sleep(0.5)
    return False


def _send(
    requests: list[tuple[str, int]], base: str, opts: VllmDemoOptions, say: Callable[[str], None]
) -> list[tuple[str, str]]:
    done = [0]
    lock = threading.Lock()

    def one(req: tuple[str, int]) -> tuple[str, str]:
        out = complete(base, req[0], req[1], opts.timeout_s, model=MODEL_NAME)
        with lock:
            done[0] += 1
        return out

    progress = Progress(say, time.monotonic())
    with ThreadPoolExecutor(opts.concurrency) as pool:
        futures = [pool.submit(one, r) for r in requests]
        while not all(f.done() for f in futures):
            progress.tick(f"serving: {done[0]}/{len(requests)} requests done")
            time.sleep(0.1)
        return [f.result() for f in futures]


def _bite_mono_ns(bit: Path) -> int | None:
    """When the fault bit (the file the fault plugin created then), on this process's monotonic clock."""
    try:
        wall_ns = bit.stat().st_mtime_ns
    except OSError:
        return None
    return time.monotonic_ns() - (time.time_ns() - wall_ns)


def _tail(log: Path, lines: int = 8) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"
