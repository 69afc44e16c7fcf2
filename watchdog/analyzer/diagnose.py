"""``diagnose(snapshot, config) -> Diagnosis``: run the rules, pick the verdict. Pure."""

from __future__ import annotations

from collectors.format import CUDAGraphMode, Role
from watchdog.analyzer.completeness import completeness
from watchdog.analyzer.config import AnalyzerConfig
from watchdog.analyzer.context import Context, key_modes
from watchdog.analyzer.facts import RankFacts, engine_facts, facts_of
from watchdog.analyzer.rings import ring_verdict
from watchdog.analyzer.rules import PRIORITY, RULES
from watchdog.analyzer.stacks import where
from watchdog.keys import next_rung
from watchdog.types import (
    Diagnosis,
    Divergence,
    Finding,
    RankReport,
    RankState,
    Recommendation,
    Snapshot,
    ThreadActivity,
    Verdict,
)


def _available(ctx: Context) -> dict[str, bool]:
    return {
        "ledgers": any(f.ledger is not None for f in ctx.facts.values()),
        "stacks": ctx.has_stacks,
        "procs": ctx.has_procs,
        "engine": ctx.engine is not None,
        "all_ranks": ctx.complete.complete,
    }


def _state(f: RankFacts, div: Divergence | None) -> tuple[RankState, str]:
    if f.alive is False:
        return RankState.DEAD, "process is gone"
    t = f.open_step
    activity = f.describe_activity()
    if t is None:
        if f.host in (ThreadActivity.RING_WAIT, ThreadActivity.UNKNOWN):
            return RankState.IDLE, activity or "no open step (ledger)"
        return RankState.HOST_BUSY, activity
    if f.host is ThreadActivity.HOST_CODE:
        return RankState.HOST_BUSY, activity
    if f.host is ThreadActivity.COLLECTIVE or f.device is ThreadActivity.COLLECTIVE:
        return RankState.WAITING_COLLECTIVE, activity
    if f.device in (ThreadActivity.KERNEL, ThreadActivity.QUEUE_WAIT):
        return RankState.WAITING_DEVICE, activity
    if f.host is ThreadActivity.DEVICE_SYNC or (f.host is ThreadActivity.UNKNOWN and t.launches):
        if div is not None and div.step == t.step and div.per_rank.get(f.rank) is not None:
            return RankState.WAITING_COLLECTIVE, activity or f"step {t.step} open at collective #{div.index} (ledger)"
        return RankState.WAITING_DEVICE, activity or f"step {t.step} launched, not finished (ledger)"
    if f.host is ThreadActivity.UNKNOWN:
        return RankState.HOST_BUSY, f"step {t.step} begun, nothing launched (ledger)"
    if f.host is ThreadActivity.RING_WAIT:  # its part of the step done, waiting for the engine's next call
        return RankState.IDLE, f"inside step {t.step}, waiting on the ring: {activity}"
    return RankState.UNKNOWN, activity


def _report(f: RankFacts, div: Divergence | None) -> RankReport:
    state, detail = _state(f, div)
    t = f.open_step
    if t is None and f.last_begun is not None:
        t = f.steps[f.last_begun]
    begin = t.begin if t is not None else None
    return RankReport(
        rank=f.rank,
        state=state,
        step=None if t is None else t.step,
        graph_key=None if begin is None else begin.key,
        drafter_key=None if t is None else t.key(Role.DRAFTER),
        padded_reqs=0 if begin is None else begin.padded_reqs,
        detail=detail,
    )


def _recommend(ctx: Context, top: Finding | None, cfg: AnalyzerConfig) -> Recommendation:
    if top is None:
        return Recommendation("none")
    mode = ctx.dispatch.cudagraph_mode if ctx.dispatch else None
    graphs = key_modes(ctx, top.step) - {CUDAGraphMode.NONE}
    if top.verdict in (Verdict.COLLECTIVE_MISMATCH, Verdict.DEVICE_HANG) and graphs and mode is not None:
        safer = next_rung(mode, cfg.ladder)
        if safer is not None:
            return Recommendation(
                "restart_safer_mode", safer, f"the stuck step replayed {', '.join(sorted(graphs))} CUDA graphs"
            )
    reasons = {
        Verdict.COLLECTIVE_MISMATCH: "the divergence is in eager code: a safer graph mode would not remove it",
        Verdict.DEVICE_HANG: "the hang is not inside a CUDA graph",
        Verdict.WORKER_DEAD: "a dead worker is not a graph problem: restart at the same mode",
        Verdict.HOST_HANG: "a host-side hang: restart, and read the culprit's stack in the bundle",
        Verdict.ENGINE_STALL: "the engine stopped scheduling: restart, and read its stack in the bundle",
    }
    return Recommendation("restart", mode, reasons.get(top.verdict, ""))


def diagnose(snapshot: Snapshot, cfg: AnalyzerConfig | None = None) -> Diagnosis:
    cfg = cfg or AnalyzerConfig()
    facts = facts_of(snapshot, cfg)
    engine = engine_facts(snapshot.engine, cfg)
    missing = list(snapshot.missing)
    if engine is not None and engine.damaged:
        missing.append(f"engine: {engine.damaged}")
        engine = None
    complete = completeness(snapshot, {r: f.damaged for r, f in facts.items()})
    # The snapshot may already say a rank has no ledger: say it once.
    missing.extend(m for m in complete.missing if f"{m.split(':')[0]}: no ledger" not in missing)
    ctx = Context.build(snapshot, facts, engine, complete)
    have = _available(ctx)
    findings: list[Finding] = []
    for rule in RULES:
        lacking = [r for r in rule.requires if not have[r]]
        if lacking:
            what = ", ".join("readable evidence from every rank" if r == "all_ranks" else r for r in lacking)
            missing.append(f"rule {rule.name} skipped: no {what}")
            continue
        findings.extend(rule.fn(ctx, cfg))
    findings.sort(key=lambda f: PRIORITY.index(f.verdict))
    top = findings[0] if findings else None
    rings = ring_verdict(snapshot.rings)
    div = next((f.divergence for f in findings if f.divergence is not None), None)
    reports = {r: _report(f, div) for r, f in facts.items()}

    hang_without_stall = (
        top is not None
        and snapshot.stall is not None
        and snapshot.stall.kind == "divergence"
        and top.verdict in (Verdict.DEVICE_HANG, Verdict.HOST_HANG, Verdict.ENGINE_STALL)
    )
    if top is not None and hang_without_stall:
        # The monitor saw the ranks out of step, but the ledgers read now show no divergence, and a
        # hang verdict needs a stall there is not (yet): ranks waiting mid-step look the same on a
        # healthy server that is merely slow. Never a guess at a culprit.
        verdict, step = Verdict.INCONCLUSIVE, top.step
        culprits: tuple[int, ...] = ()
        summary = (
            f"the ranks were seen out of step, but the ledgers show no divergence and nothing has stalled "
            f"(the rules alone would say: {top.summary})"
        )
    elif top is not None:
        verdict, step, culprits, summary = top.verdict, top.step, top.culprit_ranks, top.summary
    else:
        stuck = _stuck(ctx)
        passed = _stall_passed(ctx) if complete.complete and have["ledgers"] else None
        # Missing evidence never reads as healthy: an incomplete set is inconclusive even when the
        # ranks that could be read look idle.
        unsure = stuck or snapshot.stall is not None or not have["ledgers"] or not complete.complete
        verdict = Verdict.NO_DEADLOCK if passed or not unsure else Verdict.INCONCLUSIVE
        step, culprits = None, ()
        if passed:
            summary = passed
        elif verdict is Verdict.NO_DEADLOCK:
            summary = "no rank is inside an unfinished step and the engine has nothing pending"
        else:
            summary = "a stall, but no rule could explain it"
            if snapshot.stall is not None and snapshot.stall.kind == "divergence":
                summary = "the ranks' steps disagree, but no rule could say how"
            if not complete.complete:
                summary = "evidence incomplete, so no rule may blame a rank"
            summary += f": {stuck}" if stuck else ""
            if rings is not None and rings.kind not in ("idle", "no_broadcast"):
                summary += f"; rings: {rings.summary}"
            if missing:
                summary += f" (missing: {'; '.join(missing)})"
    no_stall = snapshot.stall is not None and snapshot.stall.kind == "divergence" and verdict is not Verdict.NO_DEADLOCK
    if no_stall:
        summary += "; no stall yet: caught as the ranks completed steps out of step, before any hang"
    # A healthy server mid-step also has a request taken and no reply yet: the rings are evidence
    # only about a stall.
    ring_line = (f"rings: {rings.summary}",) if rings is not None and verdict is not Verdict.NO_DEADLOCK else ()
    return Diagnosis(
        verdict=verdict,
        step=step,
        culprit_ranks=tuple(culprits),
        ranks=reports,
        summary=summary,
        recommendation=_recommend(ctx, top, cfg) if top and not hang_without_stall else _recommend(ctx, None, cfg),
        first_divergence=div,
        novelty=top.novelty if top is not None else (),
        missing=tuple(missing),
        evidence=(top.evidence if top is not None else ()) + ring_line,
        findings=tuple(findings),
        rings=rings,
        no_stall_yet=no_stall,
    )


def _stall_passed(ctx: Context) -> str:
    """A step stall that was over by the time the evidence was read: every rank finished the stalled
    step (its end record, or a later step begun). A slow step (a loaded host, a long prefill), not a
    hang; "" when that is not what every rank's ledger shows."""
    stall = ctx.snapshot.stall
    if stall is not None and stall.kind == "no_dispatch" and ctx.facts and ctx.engine is not None and not _stuck(ctx):
        # The engine held requests and dispatched nothing past the deadline; now it holds none and no
        # rank is inside a step: it went on (a slow schedule on a loaded host), not a stall.
        return (
            f"the dispatch stall (open {stall.age_s:.2f} s, deadline {stall.deadline_s:.2f} s) was over by the time "
            "the evidence was read: the engine holds no request and no rank is inside a step"
        )
    # A rank seen lagging (the divergence monitor's grace passed with it still inside a step its peers
    # finished) is the same case when it finished too: no rule found the steps' contents to differ.
    lagged = stall is not None and stall.kind == "divergence" and bool(stall.ranks)
    if stall is None or not (stall.kind == "open_step" or lagged) or stall.step is None or not ctx.facts:
        return ""
    for f in ctx.facts.values():
        t = f.steps.get(stall.step)
        if t is not None and t.end is not None and not t.end.ok:
            return ""  # the step failed (an exception in it): not a slow step
        ended = t is not None and t.end is not None
        if not ended and not (f.last_begun is not None and f.last_begun > stall.step):
            return ""
    if lagged:
        names = ", ".join(map(str, stall.ranks))
        return (
            f"rank {names}, seen inside step {stall.step} {stall.age_s:.2f} s after its peers finished it, finished "
            "it by the time the evidence was read, with the same keys and collectives (a slow rank, not a divergence)"
        )
    return (
        f"the stall at step {stall.step} (open {stall.age_s:.2f} s, deadline {stall.deadline_s:.2f} s) was over "
        "by the time the evidence was read: every rank finished that step (a slow step, not a hang)"
    )


def _stuck(ctx: Context) -> str:
    opened = sorted(f.rank for f in ctx.facts.values() if f.open_step is not None)
    if opened:
        return f"ranks {', '.join(map(str, opened))} are inside unfinished steps"
    eng = ctx.engine
    if eng is not None and eng.open_step is not None:
        return f"the engine dispatched step {eng.open_step.step} and no reply came"
    if eng is not None and eng.pending:
        frame = f"; engine in {where(eng.host_frame)}" if eng.host_frame else ""
        return f"the engine holds {eng.pending} requests and dispatches nothing{frame}"
    return ""
