"""The coordinator: one TP group spread over several nodes, one agent per node.

Each member agent tails its own ranks' ledgers and runs the detector; the coordinator polls every
agent's ``/v1/status`` (cheap: a progress counter and the open stall, if any). When any agent
reports a stall, it pulls ``/v1/snapshot`` from all of them in parallel (each bounded in time),
merges ledgers and evidence, runs the same ``assemble`` + analyzer as a single agent, and writes
one incident bundle. An agent that does not answer becomes "missing: ..." lines (and its ranks
"rank N: no ledger"), never a crash, and the verdict says what it could not see.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from watchdog.analyzer import AnalyzerConfig
from watchdog.divergence import DivergenceMonitor
from watchdog.incident import Incident
from watchdog.logs import event
from watchdog.snapshot import assemble, payload_ledgers, read_ledger_files
from watchdog.types import EVIDENCE_SCHEMA, StallInfo

log = logging.getLogger("watchdog")

PER_PID = ("stacks", "native_stacks", "procs")


class AgentUnreachable(Exception):
    """One line: which agent, what went wrong."""


def fetch_json(url: str, token: str, timeout_s: float, transport: httpx.BaseTransport | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        # verify (and its CA bundle, tens of ms to load) only for https: status polls are frequent
        verify = url.startswith("https:")
        with httpx.Client(transport=transport, timeout=timeout_s, verify=verify, trust_env=False) as client:
            resp = client.get(url, headers=headers)
            if resp.status_code >= 400:
                raise AgentUnreachable(f"{url}: HTTP {resp.status_code} {resp.reason_phrase}")
            return json.loads(resp.content)
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        raise AgentUnreachable(f"{url}: {exc or type(exc).__name__}") from None


@dataclass
class Coordinator:
    agents: Sequence[str]
    incidents_dir: Path
    token: str = ""
    timeout_s: float = 10.0
    status_timeout_s: float = 2.0
    analyzer_cfg: AnalyzerConfig = field(default_factory=AnalyzerConfig)
    on_error: Callable[[str], None] | None = None
    transport: httpx.BaseTransport | None = None  # what the pulls go through (default HTTP); tests give a mock
    progressed: bool = False
    _progress: dict[str, int] = field(default_factory=dict)
    _fired: bool = False
    # The ranks' step digests from every member, compared across nodes. Only by content: the ranks'
    # monotonic clocks are per node, so the "left inside a finished step" check stays with each
    # member (and the stall detector).
    monitor: DivergenceMonitor = field(default_factory=lambda: DivergenceMonitor(grace_s=float("inf")))
    _since: dict[str, int] = field(default_factory=dict)  # per agent: the step to ask digests from
    _answered: dict[str, bool] = field(default_factory=dict)

    def poll(self) -> StallInfo | None:
        if not self._answered:
            event("watching", f"watching {len(self.agents)} agents: {', '.join(self.agents)}", agents=list(self.agents))
        statuses = self._fan_out_status()
        progressed = False
        stall: StallInfo | None = None
        for url, st in statuses.items():
            answered = not isinstance(st, AgentUnreachable)
            if self._answered.get(url) != answered:  # first answer, lost, back: state changes
                self._answered[url] = answered
                event(
                    "agent", f"agent {url} answers" if answered else f"agent unreachable: {st}", agent=url, up=answered
                )
            if isinstance(st, AgentUnreachable):
                log.debug("agent status: %s", st)
                continue
            count = int(st.get("progress", 0))
            progressed = progressed or count != self._progress.get(url, count)
            self._progress[url] = count
            self._merge_digests(url, st.get("digests"))
            raw = st.get("stall")
            if raw and raw.get("kind") == "divergence" and self.monitor.reported:
                continue  # the same ranks out of step, already an incident here
            if raw and (stall is None or raw["age_s"] > stall.age_s):
                stall = StallInfo(**raw)
        self.progressed = progressed
        odd = self.monitor.check(time.monotonic_ns())
        if odd is not None:
            log.info("ranks out of step at step %s: %s", odd.step, odd.reason)
            return StallInfo("divergence", odd.step, odd.lag_s, self.monitor.grace_s, odd.ranks if odd.lag_s else ())
        if progressed:
            self._fired = False
        if stall is None or self._fired:
            return None
        self._fired = True
        if stall.kind == "divergence" and not stall.ranks:
            # a member saw the steps' contents differ: what this monitor would report too. A member's
            # lagging rank is not (it may be slow, and this monitor compares contents only).
            self.monitor.mark_reported()
        return stall

    def _fan_out_status(self) -> dict[str, Any]:
        with ThreadPoolExecutor(max_workers=max(1, len(self.agents))) as pool:
            futs = {
                url: pool.submit(
                    self._get, f"{url}/v1/status?digests_since={self._since.get(url, 0)}", self.status_timeout_s
                )
                for url in self.agents
            }
            return {url: fut.result() for url, fut in futs.items()}

    def _merge_digests(self, url: str, raw: Any) -> None:
        if not isinstance(raw, dict):
            return
        try:
            lasts = []
            for rank, digests in raw.items():
                if digests:
                    self.monitor.merge(int(rank), digests)
                    lasts.append(int(digests[-1]["step"]))
            # Next time from a few steps before the slowest rank's last: a step still open now comes
            # again, finished, and a lagging rank's steps are not skipped.
            if lasts:
                self._since[url] = max(self._since.get(url, 0), min(lasts) - 8)
        except (KeyError, TypeError, ValueError) as exc:
            log.debug("agent %s: unreadable step digests: %s", url, exc)

    def handle(self, stall: StallInfo | None) -> Incident:
        from watchdog.watcher import conclude

        detected = time.monotonic_ns()
        pulled = self._fan_out("/v1/snapshot", self.timeout_s)
        files, evidence = merge(pulled, stall)
        ledgers = read_ledger_files(files)
        snapshot = assemble(ledgers, evidence)
        return conclude(self.incidents_dir, snapshot, ledgers, evidence, stall, detected, self.analyzer_cfg)

    def close(self) -> None:
        pass

    def _fan_out(self, path: str, timeout_s: float) -> dict[str, Any]:
        with ThreadPoolExecutor(max_workers=max(1, len(self.agents))) as pool:
            futs = {url: pool.submit(self._get, url + path, timeout_s) for url in self.agents}
            return {url: fut.result() for url, fut in futs.items()}

    def _get(self, url: str, timeout_s: float) -> Any:
        try:
            return fetch_json(url, self.token, timeout_s, self.transport)
        except AgentUnreachable as exc:
            if self.on_error is not None:
                self.on_error("agent")
            return exc


def merge(pulled: dict[str, Any], stall: StallInfo | None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Ledger files and one evidence object from every agent's snapshot payload (or its failure)."""
    files: dict[str, bytes] = {}
    evidence: dict[str, Any] = {"pids": {}, "gpus": [], "rings": [], **{k: {} for k in PER_PID}}
    missing: list[str] = []
    nodes: list[dict[str, Any]] = []
    for url, payload in pulled.items():
        if isinstance(payload, AgentUnreachable):
            missing.append(f"agent {payload}")
            continue
        try:
            theirs = payload_ledgers(payload)
            ev = payload["evidence"]
        except (ValueError, KeyError, TypeError) as exc:
            missing.append(f"agent {url}: {exc}")
            continue
        for name, data in theirs.items():
            if name in files:
                missing.append(f"agent {url}: ledger {name} also came from another agent; kept the first")
                continue
            files[name] = data
        nodes.append({"agent": url, "boot_id": ev.get("boot_id", ""), "pids": ev.get("pids", {})})
        evidence["pids"].update(ev.get("pids", {}))
        evidence["gpus"].extend({**g, "agent": url} for g in ev.get("gpus") or ())
        evidence["rings"].extend(ev.get("rings") or ())
        missing.extend(f"agent {url}: {m}" for m in ev.get("missing") or ())
        for key in PER_PID:
            if key not in ev:
                continue
            for pid, item in ev[key].items():
                if pid in evidence[key]:
                    # Two nodes, one pid number: which process a ledger's pid names is ambiguous.
                    missing.append(f"{key} of pid {pid}: reported by two agents, dropped")
                    evidence[key][pid] = None
                else:
                    evidence[key][pid] = item
    for key in PER_PID:
        evidence[key] = {p: v for p, v in evidence[key].items() if v is not None}
    evidence.update(
        schema=EVIDENCE_SCHEMA,
        taken_mono_ns=time.monotonic_ns(),
        taken_wall_ns=time.time_ns(),
        boot_id="",
        live=True,
        missing=missing,
        nodes=nodes,
        stall=None if stall is None else stall.__dict__.copy(),
    )
    return files, evidence
