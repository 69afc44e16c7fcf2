"""``watchdog run -- <server command>``: run the server, watch it, fall back to a safer mode on a deadlock.

One generation = one server process tree at one rung of the ladder. The embedded agent (same
HTTP API and metrics as ``watchdog agent``) watches the generation's ledgers; a diagnosed deadlock
is decided on by the ladder (climb, restart at the same rung, or give up), the decision is saved,
the whole tree is stopped (SIGTERM, grace, SIGKILL), its shm rings unlinked and its ledgers
cleared (the incident bundle keeps a copy), and the next generation starts with the new mode
merged into its command line. ``observe`` diagnoses and reports but never restarts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client import Counter, Gauge

from collectors.jsonrecords import JsonRecord, json_as
from watchdog.agent import Agent
from watchdog.bundle import record_supervisor
from watchdog.errors import WatchdogError
from watchdog.incident import Incident
from watchdog.logs import event as log_event
from watchdog.metrics import AgentMetrics
from watchdog.supervisor import ladder
from watchdog.supervisor.cmdline import CmdlineError, with_cudagraph_mode
from watchdog.supervisor.proxy import UpstreamGate
from watchdog.supervisor.tree import Tree, start_tree, stop_tree, unlink_rings
from watchdog.types import StallInfo, Verdict
from watchdog.watcher import Watcher

EXIT_GAVE_UP = 5


def _ms(seconds: float) -> float:
    return round(seconds, 3)


@dataclass
class Restart(JsonRecord):
    from_mode: str = field(metadata=json_as(key="from"))
    to_mode: str = field(metadata=json_as(key="to"))
    after_incident: str
    verdict: str
    # stop began -> the new server answers /health (no proxy: its first record)
    downtime_s: float | None = field(default=None, metadata=json_as(encode=_ms))


@dataclass
class SupervisorConfig:
    argv: Sequence[str]
    ledger_dir: Path
    incidents_dir: Path
    state_file: Path
    policy: ladder.Policy = field(default_factory=ladder.Policy)
    observe: bool = False
    keep_up_on_give_up: bool = False
    grace_s: float = 30.0
    unexplained_stall_s: float = 30.0  # an inconclusive stall that lasts this long is restarted anyway
    poll_s: float = 0.1
    upstream: str = ""  # the server's base URL: its /health opens the proxy's gate
    env: Mapping[str, str] | None = None  # the server's environment (default: this process's)
    output: Path | None = None  # the server's stdout and stderr go to this file (default: ours)


class Supervisor:
    def __init__(
        self,
        cfg: SupervisorConfig,
        metrics: AgentMetrics,
        make_watcher: Callable[[], Watcher],
        say: Callable[[str], None] = lambda _m: None,
        token: str = "",
        gate: UpstreamGate | None = None,
    ) -> None:
        self.cfg = cfg
        self.gate = gate
        self.proxy_stats: Callable[[], dict[str, int]] | None = None  # the resuming proxy's counters, if any
        self.incidents: list[Incident] = []
        self._ready = False
        self._next_health = 0.0
        self.say = say
        self.make_watcher = make_watcher
        self.state = ladder.load(cfg.state_file, cfg.policy)
        self.restarts: list[Restart] = []
        self.generation = 0
        self._downtime_from: float | None = None
        self._why = ""  # why _watch handed back an incident with no deadlock verdict
        self._stop = threading.Event()
        self.tree: Tree | None = None  # the running generation's process tree
        self._next_track = 0.0
        g, r = metrics.tp_group, metrics.registry
        self.m_restarts = Counter(
            "watchdog_supervisor_restarts_total",
            "Server restarts by the supervisor, by the mode restarted into.",
            ["tp_group", "mode"],
            registry=r,
        )
        self.m_gave_up = Gauge(
            "watchdog_supervisor_gave_up",
            "1 once the restart bound was hit: the ladder stopped restarting.",
            ["tp_group"],
            registry=r,
        )
        self.m_mode = Gauge(
            "watchdog_supervisor_cudagraph_mode",
            "1 for the cudagraph mode the server runs at now.",
            ["tp_group", "mode"],
            registry=r,
        )
        self.m_gave_up.labels(g).set(1 if self.state.gave_up else 0)
        self.agent = Agent(make_watcher(), metrics, role="agent", token=token, poll_s=cfg.poll_s, extra=self.status)
        self.agent.on_declared = self._declared
        self._held = False  # the gate was closed at a divergence, before its diagnosis

    # ---- state for /v1/status ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "supervisor": {
                "observe": self.cfg.observe,
                "generation": self.generation,
                "ladder": self.state.to_json(self.cfg.policy),
                "restarts": [r.to_json() for r in self.restarts],
                "proxy": None if self.proxy_stats is None else self.proxy_stats(),
            }
        }

    def stop(self) -> None:
        self._stop.set()

    def _note(self, name: str, message: str, level: int = logging.INFO, **fields: Any) -> None:
        """A state change: one log line (JSON fields, Kubernetes Event where on) and the caller's ``say``."""
        log_event(name, message, level, **fields)
        self.say(message)

    # ---- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        if self.state.gave_up and not self.cfg.observe:
            self._note(
                "give_up",
                f"watchdog run: the ladder gave up earlier (see {self.cfg.state_file}); no more restarts",
                logging.WARNING,
            )
        while True:
            argv = self._argv()
            self._clear_ledgers()
            self.generation += 1
            mode = self.state.mode(self.cfg.policy)
            self._set_mode(mode)
            self._note(
                "generation",
                f"watchdog run: generation {self.generation} at {mode}: {' '.join(argv)}",
                generation=self.generation,
                mode=mode,
            )
            env = {
                **(os.environ if self.cfg.env is None else self.cfg.env),
                "WATCHDOG_LEDGER_DIR": str(self.cfg.ledger_dir),
            }
            if self.gate is not None:
                self.gate.going_down()  # requests wait (in the proxy) until the new server answers /health
            self._held = False
            self._ready = False
            try:
                proc = start_tree(argv, env, self.cfg.output)
            except OSError as exc:
                self._close_gate()
                raise WatchdogError(f"server command {argv[0]!r}: {exc.strerror or exc}") from None
            self.tree = Tree(proc)
            self.agent.loop.close()
            self.agent.loop = self.make_watcher()
            try:
                outcome = self._watch(proc)
            except BaseException:
                self._close_gate()
                stop_tree(proc, self.cfg.grace_s, self.tree)
                unlink_rings(self.cfg.ledger_dir)
                raise
            if isinstance(outcome, int):
                self._note("exited", f"watchdog run: the server exited with {outcome}", exit_code=outcome)
                self._close_gate()
                stop_tree(proc, self.cfg.grace_s, self.tree)  # what it left running (orphaned workers)
                unlink_rings(self.cfg.ledger_dir)
                return EXIT_GAVE_UP if self.state.gave_up else outcome
            if outcome is None:  # asked to stop
                self._close_gate()
                stop_tree(proc, self.cfg.grace_s, self.tree)
                unlink_rings(self.cfg.ledger_dir)
                return 0
            self.incidents.append(outcome)
            event = self._decide(outcome, self._why)
            if event.action == "observe" or (event.action == "give_up" and self.cfg.keep_up_on_give_up):
                rc = self._wait_exit(proc)
                self._close_gate()
                return EXIT_GAVE_UP if event.action == "give_up" else rc
            stopped = time.monotonic()
            if self.gate is not None:
                self.gate.going_down()  # before the stop: what the stop breaks is the restart's doing
            stop_tree(proc, self.cfg.grace_s, self.tree)
            unlink_rings(self.cfg.ledger_dir)
            if event.action == "give_up":
                self._close_gate()
                self._note("give_up", f"watchdog run: gave up ({event.reason}); the server stays down", logging.WARNING)
                return EXIT_GAVE_UP
            self.restarts.append(Restart(event.from_mode, event.to_mode, event.incident, event.verdict))
            self.m_restarts.labels(self.agent.metrics.tp_group, event.to_mode).inc()
            self._downtime_from = stopped

    def _argv(self) -> list[str]:
        if self.cfg.observe:
            return list(self.cfg.argv)
        try:
            return with_cudagraph_mode(self.cfg.argv, self.state.mode(self.cfg.policy))
        except CmdlineError as exc:
            raise WatchdogError(f"server command: {exc}") from None

    def _track(self) -> None:
        """Remember the server tree's processes (about once a second: a /proc walk)."""
        now = time.monotonic()
        if self.tree is not None and now >= self._next_track:
            self._next_track = now + 1.0
            self.tree.track()

    def _watch(self, proc: Any) -> Incident | int | None:
        """Until the generation needs acting on: a deadlock diagnosed (the incident); a stall no rule
        explained that outlasts ``unexplained_stall_s``, or the server dying after any incident
        (that incident, ``_why`` saying which); the server ending by itself (its exit status); or
        ``stop()`` (None). vLLM's own reactions must not decide for us: it answers /health while
        deadlocked, and exits with status 0 after declaring its engine dead."""
        self._why = ""
        seen: Incident | None = None  # this generation's last incident (no deadlock verdict)
        unexplained: Incident | None = None  # an inconclusive incident whose stall is still open
        since = 0.0
        while not self._stop.is_set():
            self._track()
            rc = proc.poll()
            if rc is not None:
                if seen is not None:
                    self._why = f"the server exited ({rc}) after incident {seen.bundle.name}"
                    return seen
                return int(rc)
            self._open_gate_when_ready()
            incident = self.agent.step()
            if self.gate is None and self.agent.loop.progressed:
                self._end_downtime()  # no health check to go by: the first ledger record
            if self.agent.loop.progressed:
                unexplained = None
            if incident is not None:
                if incident.diagnosis.verdict.is_deadlock:
                    return incident
                if self._held and self.gate is not None:  # not acted on after all: serve again
                    self._held = False
                    self.gate.up()
                # (no_deadlock: a stall that was over by the time the evidence was read)
                if incident.diagnosis.verdict is Verdict.INCONCLUSIVE:
                    seen = incident
                    if incident.stall is not None and unexplained is None:
                        unexplained, since = incident, time.monotonic()
            if unexplained is not None and time.monotonic() - since >= self.cfg.unexplained_stall_s:
                self._why = f"a stall no rule explained lasted {self.cfg.unexplained_stall_s:g} s with no progress"
                return unexplained
            self._stop.wait(self.cfg.poll_s)
        return None

    def _declared(self, stall: StallInfo) -> None:
        """Ranks out of step keep serving, and every token they compute now is wrong: stop relaying
        them at once (the proxy holds new requests and cuts the streams in flight, to continue them
        after the restart) instead of after the seconds the evidence takes. Only for steps whose
        contents differ: a rank merely left inside a step its peers finished (``stall.ranks``) is how a
        hang begins, or a slow rank on a saturated host, and a hang produces nothing and needs no such
        hurry. Never in observe mode."""
        if stall.kind == "divergence" and not stall.ranks and self.gate is not None and not self.cfg.observe:
            self._held = True
            self.gate.going_down()
            self._note("held", "watchdog run: ranks out of step: requests held until the server is restarted")

    def _wait_exit(self, proc: Any) -> int:
        """Observe mode after a deadlock: keep serving the API until the server ends (or we are stopped)."""
        while not self._stop.is_set():
            self._track()
            rc = proc.poll()
            if rc is not None:
                stop_tree(proc, self.cfg.grace_s, self.tree)  # what it left running
                return int(rc)
            self._open_gate_when_ready()
            self.agent.step()
            self._stop.wait(self.cfg.poll_s)
        stop_tree(proc, self.cfg.grace_s, self.tree)
        return 0

    def _open_gate_when_ready(self) -> None:
        """Once the new server answers /health, let the proxy's waiting requests through."""
        if self.gate is None or self._ready or time.monotonic() < self._next_health:
            return
        self._next_health = time.monotonic() + 0.25
        if healthy(self.cfg.upstream):
            self._ready = True
            self._end_downtime()
            self.gate.up()
            self._note("serving", f"watchdog run: generation {self.generation} is serving", generation=self.generation)

    def _end_downtime(self) -> None:
        if self._downtime_from is not None and self.restarts:
            self.restarts[-1].downtime_s = time.monotonic() - self._downtime_from
            self._downtime_from = None

    def _close_gate(self) -> None:
        if self.gate is not None:
            self.gate.gave_up()

    def _decide(self, incident: Incident, why: str = "") -> ladder.Event:
        d = incident.diagnosis
        if self.cfg.observe:
            mode = self.state.mode(self.cfg.policy)
            event = ladder.Event(
                time.time(), incident.bundle.name, d.verdict.value, "observe", mode, mode, "observe only"
            )
        else:
            event = ladder.decide(
                self.state,
                self.cfg.policy,
                incident=incident.bundle.name,
                verdict=d.verdict.value,
                action=d.recommendation.action,
                now=time.time(),
            )
        if why and event.action == "restart":
            event = dataclasses.replace(event, reason=why)
        ladder.apply(self.state, self.cfg.policy, event)
        ladder.save(self.cfg.state_file, self.state, self.cfg.policy)
        self._record(incident, event)
        if event.action == "give_up":
            self.m_gave_up.labels(self.agent.metrics.tp_group).set(1)
        self._note(
            "restart" if event.action in ("climb", "restart") else "decision",
            f"watchdog run: {d.verdict.value} ({incident.bundle}) -> {event.action} {event.from_mode} -> "
            f"{event.to_mode}: {event.reason}",
            logging.WARNING,
            action=event.action,
            from_mode=event.from_mode,
            to_mode=event.to_mode,
            incident=incident.bundle.name,
        )
        return event

    def _record(self, incident: Incident, event: ladder.Event) -> None:
        """Keep the decision with the incident (its page shows it); a failure here must not stop the restart."""
        info = {
            "event": dataclasses.asdict(event),
            "ladder": self.state.to_json(self.cfg.policy),
            "observe": self.cfg.observe,
        }
        try:
            record_supervisor(incident, info)
        except (OSError, WatchdogError) as exc:
            self.say(f"watchdog run: could not record the decision in {incident.bundle}: {exc}")

    def _set_mode(self, mode: str) -> None:
        g = self.agent.metrics.tp_group
        for m in self.cfg.policy.ladder:
            self.m_mode.labels(g, m).set(1 if m == mode else 0)

    def _clear_ledgers(self) -> None:
        """The last generation's ledgers are in its incident bundle; the next one starts clean."""
        self.cfg.ledger_dir.mkdir(parents=True, exist_ok=True)
        for old in self.cfg.ledger_dir.glob("*.ledger"):
            old.unlink(missing_ok=True)


def healthy(base_url: str, timeout_s: float = 1.0, *, transport: httpx.BaseTransport | None = None) -> bool:
    """Whether ``GET base_url/health`` answers 200 (vLLM's and the demo server's readiness)."""
    parts = urlsplit(base_url)
    scheme = parts.scheme or "http"
    try:
        # verify only for https: an http poll every 0.25 s need not load the CA bundle each time
        with httpx.Client(transport=transport, timeout=timeout_s, verify=scheme == "https", trust_env=False) as c:
            return c.get(f"{scheme}://{parts.netloc or '127.0.0.1'}/health").status_code == 200
    except (httpx.HTTPError, httpx.InvalidURL):
        return False


def handle_signals(sup: Supervisor) -> None:
    def on_signal(signum: int, _frame: object) -> None:
        sup._note("signal", f"watchdog run: {signal.Signals(signum).name}: stopping the server")
        sup.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
