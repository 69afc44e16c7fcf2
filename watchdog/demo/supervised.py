"""A server command under ``watchdog run``'s supervisor with the resuming proxy in front: how both
demos serve (the embedded engine's HTTP server with ``--fallback``, and a real ``vllm serve``).

The supervisor runs in a thread; clients talk to ``proxy_url``; ``stop`` ends it all, in the order
that loses nothing: the supervisor (and its server tree) first, then the proxy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from watchdog.detector import DetectorConfig
from watchdog.metrics import AgentMetrics
from watchdog.snapshot import Sources
from watchdog.supervisor import ladder
from watchdog.supervisor.proxy import ResumingProxy, UpstreamGate
from watchdog.supervisor.run import Supervisor, SupervisorConfig
from watchdog.watcher import Watcher


class ServeOptions(Protocol):
    """What both demos' options say about serving (``DemoOptions``, ``VllmDemoOptions``)."""

    @property
    def timeout_s(self) -> float: ...
    @property
    def max_restarts(self) -> int: ...
    @property
    def stall_floor_s(self) -> float: ...
    @property
    def native_stacks(self) -> bool: ...


@dataclass
class Supervised:
    sup: Supervisor
    cfg: SupervisorConfig
    proxy: ResumingProxy
    upstream: str  # the server itself (the proxy's upstream)
    runner: threading.Thread
    started_mono_ns: int
    outcome: list[int] = field(default_factory=list)  # the supervisor's exit code, once it ended

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    def stop(self, join_s: float = 60.0) -> None:
        self.sup.stop()
        self.runner.join(timeout=join_s)
        self.proxy.stop()


def start_supervised(
    argv: list[str],
    port: int,
    workdir: Path,
    opts: ServeOptions,
    say: Callable[[str], None],
    *,
    env: Mapping[str, str] | None = None,
    output: Path | None = None,
    unexplained_stall_s: float | None = None,
) -> Supervised:
    """Start the proxy and the supervisor (which starts ``argv``, listening on ``port``); ledgers,
    incidents and the ladder's state go under ``workdir``, and every demo starts at the bottom rung."""
    ledger_dir, incidents_dir, state_file = workdir / "ledgers", workdir / "incidents", workdir / "ladder.json"
    state_file.unlink(missing_ok=True)
    upstream = f"http://127.0.0.1:{port}"
    gate = UpstreamGate(upstream)
    proxy = ResumingProxy(gate, resume_timeout_s=opts.timeout_s)
    cfg = SupervisorConfig(
        argv=argv,
        ledger_dir=ledger_dir,
        incidents_dir=incidents_dir,
        state_file=state_file,
        policy=ladder.Policy(max_restarts=opts.max_restarts),
        grace_s=5.0,
        poll_s=0.05,
        upstream=upstream,
        env=env,
        output=output,
    )
    if unexplained_stall_s is not None:  # else the supervisor's default
        cfg.unexplained_stall_s = unexplained_stall_s
    sources = Sources(native=opts.native_stacks)
    detector = DetectorConfig(floor_s=opts.stall_floor_s)
    sup = Supervisor(
        cfg, AgentMetrics("demo"), lambda: Watcher(ledger_dir, incidents_dir, sources, detector), say=say, gate=gate
    )
    proxy.start()
    outcome: list[int] = []
    runner = threading.Thread(target=lambda: outcome.append(sup.run()), name="supervisor", daemon=True)
    run = Supervised(sup, cfg, proxy, upstream, runner, time.monotonic_ns(), outcome)
    runner.start()
    return run
