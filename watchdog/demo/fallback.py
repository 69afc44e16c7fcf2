"""``watchdog demo`` with the fallback on: the real path a user runs, end to end.

The demo server (``python -m watchdog.demo.server``, the engine behind an OpenAI-compatible front)
runs under the supervisor of ``watchdog run``; the resuming proxy fronts it; the bench client sends
its streamed requests over HTTP to the proxy. On a diagnosed deadlock the supervisor stops the
server's whole tree and starts it again on the ladder's next rung, the proxy carries the requests
across, and the client checks every completion's text.

The fault reaches each server generation over a Unix socket this process serves (never argv, env or
files): the defect is in the "code" every generation runs, and whether it bites is up to the
mechanism under the mode that generation runs at. The sockets also carry back when it bit, for the
detection timings; the watcher never sees any of it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.demo.faults import FaultPlan
from watchdog.demo.httpclient import start_http_client
from watchdog.demo.options import DemoOptions
from watchdog.demo.progress import Progress
from watchdog.demo.result import DemoIncident, FallbackOutcome, FaultBite, Requests, demo_incident, fault_bites
from watchdog.demo.supervised import start_supervised


class FaultBroker:
    """Serves the fault plan on a Unix socket to every server generation; collects bite times."""

    def __init__(self, path: Path, plan: FaultPlan) -> None:
        self.path = path
        self.plan = plan
        self.bites: list[int] = []
        self.ranks: list[int | None] = []  # whose bite each was (None: the engine)
        self._lock = threading.Lock()
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(8)
        threading.Thread(target=self._accept, name="fault-broker", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        plan = {"name": self.plan.name, "rank": self.plan.rank, "step": self.plan.step}
        with contextlib.suppress(OSError, ValueError), conn, conn.makefile("rb") as lines:
            conn.sendall(json.dumps(plan).encode() + b"\n")
            for line in lines:
                bite = json.loads(line)
                with self._lock:
                    self.bites.append(int(bite["bite_ns"]))
                    self.ranks.append(None if bite.get("rank") is None else int(bite["rank"]))

    def all_bites(self) -> list[tuple[int, int]]:
        """(rank, ns) of every bite so far, oldest first (rank -1: the engine)."""
        with self._lock:
            pairs = [(-1 if r is None else r, ns) for r, ns in zip(self.ranks, self.bites, strict=True)]
        return sorted(pairs, key=lambda b: b[1])

    def first_bite_between(self, lo_ns: int, hi_ns: int) -> int | None:
        with self._lock:
            return min((b for b in self.bites if lo_ns <= b <= hi_ns), default=None)

    def close(self) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_argv(opts: DemoOptions, port: int, workdir: Path, fault_socket: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "watchdog.demo.server",
        "--tp",
        str(opts.tp),
        "--port",
        str(port),
        "--workdir",
        str(workdir),
        "--cudagraph-mode",
        opts.cudagraph_mode,
        "--num-speculative-tokens",
        str(opts.num_speculative_tokens),
        "--max-num-seqs",
        str(opts.max_num_seqs),
        "--seed",
        str(opts.seed),
        "--fault-from",
        str(fault_socket),
    ]


@dataclass(frozen=True)
class FallbackRun:
    """The parts of the demo's result a fallback run owns."""

    requests: Requests
    incidents: tuple[DemoIncident, ...]
    fault_bites: tuple[FaultBite, ...]
    restarts: tuple[dict[str, Any], ...]
    outcome: FallbackOutcome


def run_fallback(opts: DemoOptions, workdir: Path, say: Callable[[str], None]) -> FallbackRun:
    """Run the demo under the supervisor and proxy."""
    broker = FaultBroker(workdir / "fault.sock", FaultPlan(opts.fault, opts.fault_rank, opts.fault_step))
    port = free_port()
    run = start_supervised(
        server_argv(opts, port, workdir, broker.path),
        port,
        workdir,
        opts,
        say,
    )
    sup, started = run.sup, run.started_mono_ns
    stop = threading.Event()
    client = start_http_client(opts.workload(), run.proxy_url, stop, opts.timeout_s)
    say(f"bench client: {opts.requests} streamed requests over HTTP through the proxy, fault {opts.fault}")
    deadline = time.monotonic() + opts.timeout_s
    progress = Progress(say, time.monotonic())
    try:
        while not client.done.wait(0.1):
            progress.tick(f"serving: {client.succeeded}/{opts.requests} requests done")
            if not run.runner.is_alive():
                say("the supervisor ended: no server to send requests to")
                break
            if time.monotonic() > deadline:
                say(f"demo timed out after {opts.timeout_s:.0f} s")
                break
    finally:
        stop.set()
        run.stop()
        broker.close()
    incidents, lo = [], started
    for inc in sup.incidents:
        incidents.append(demo_incident(inc, broker.first_bite_between(lo, inc.detected_mono_ns)))
        lo = inc.detected_mono_ns
    return FallbackRun(
        requests=Requests(
            opts.requests, client.succeeded, client.failed, wrong_text=client.wrong_text, errors=dict(client.errors)
        ),
        incidents=tuple(incidents),
        fault_bites=fault_bites(broker.all_bites(), started),
        restarts=tuple(r.to_json() for r in sup.restarts),
        outcome=FallbackOutcome(
            ladder=sup.state.to_json(run.cfg.policy),
            gave_up=sup.state.gave_up,
            proxy=run.proxy.stats,
            supervisor_exit=run.outcome[0] if run.outcome else None,
        ),
    )
