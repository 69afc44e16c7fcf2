"""The analyzer's rules: each a pure function of the derived facts. No I/O anywhere here.

A rule returns findings; ``diagnose`` picks the verdict by priority. A rule whose evidence is
missing is skipped, and the diagnosis says what was missing: never a silent "healthy".
"""

from __future__ import annotations

from collections import Counter

from collectors.format import Role
from watchdog.analyzer.config import AnalyzerConfig
from watchdog.analyzer.context import Context, Rule
from watchdog.analyzer.facts import RankFacts
from watchdog.analyzer.history import departed
from watchdog.analyzer.sequences import find_divergence
from watchdog.analyzer.stacks import where
from watchdog.types import Divergence, Finding, ThreadActivity, Verdict

# ---- collective_mismatch ------------------------------------------------------------


def _culprits(ctx: Context, div: Divergence) -> tuple[tuple[int, ...], str]:
    ranks = sorted(div.per_rank)
    expected = ctx.expected_keys(div.step)
    if expected is not None:
        model, drafter = expected
        wrong = []
        for r in ranks:
            trace = ctx.facts[r].steps.get(div.step)
            if trace is None:
                continue
            if trace.key(Role.MODEL) not in (None, model) or (
                drafter is not None and trace.key(Role.DRAFTER) not in (None, drafter)
            ):
                wrong.append(r)
        if wrong and len(wrong) < len(ranks):
            return tuple(wrong), "its graph key differs from the one the engine's batch calls for"
    # Same collectives everywhere: the ranks differ only in the graph they launched (its label is the source).
    by: dict[int, object] = dict(div.per_rank) if len(set(div.per_rank.values())) > 1 else dict(div.sources)
    counts = Counter(by[r] for r in ranks)
    (top, n), *rest = counts.most_common()
    if rest and n > rest[0][1]:
        return tuple(r for r in ranks if by[r] != top), "it is in the minority"
    finished = [r for r in ranks if div.per_rank[r] is None]
    if finished and len(finished) < len(ranks):
        return tuple(finished), "it finished the step without the collective its peers wait in"
    changed = departed(ctx.facts, ranks, div.step)
    if changed:
        return changed, "its collectives in this step differ from what every rank issued in the steps before it"
    return tuple(ranks), "no rank could be singled out"


def rule_collective_mismatch(ctx: Context, cfg: AnalyzerConfig) -> list[Finding]:
    """Requires every rank's ledger: the ranks' collective sequences for one step differ. Culprit by the
    engine's referee (the keys its batch calls for) when it singles out some ranks, else the minority,
    else the rank that departed from what every rank issued in the steps before (history.py)."""
    div = find_divergence(ctx.facts)
    if div is None:
        return []
    culprits, why = _culprits(ctx, div)
    evidence = [f"engine batch at step {div.step}: {ctx.describe_batch(div.step)}"]
    expected = ctx.expected_keys(div.step)
    if expected is not None:
        model, drafter = expected
        evidence.append(f"expected keys: model {model.label()}" + (f", drafter {drafter.label()}" if drafter else ""))
    for r, f in sorted(ctx.facts.items()):
        trace = f.steps.get(div.step)
        if trace is None:
            continue
        keys = ", ".join(f"{lk.role.name.lower()} {lk.key.label()}" for lk in trace.launches) or "no launch"
        evidence.append(f"rank {r} step {div.step}: {keys}")
    counts = {r: f.sequence(div.step) for r, f in sorted(ctx.facts.items())}
    evidence.append(
        f"collectives issued in step {div.step}: "
        + ", ".join(f"rank {r}: {len(q.items)}" + ("" if q.complete else " so far") for r, q in counts.items() if q)
    )
    for r in culprits:
        if ctx.facts[r].alive is False:
            evidence.append(f"rank {r} is dead (its ledger still shows the divergence)")
    ops = "; ".join(
        f"rank {r}: " + ("none" if op is None else f"{op.op} {op.dtype} x{op.numel}")
        for r, op in sorted(div.per_rank.items())
    )
    names = ", ".join(str(r) for r in culprits)
    summary = f"ranks diverged at step {div.step}, collective #{div.index} ({ops}); culprit rank {names}: {why}"
    return [
        Finding(
            "collective_mismatch",
            Verdict.COLLECTIVE_MISMATCH,
            div.step,
            culprits,
            summary,
            tuple(evidence),
            divergence=div,
        )
    ]


def _eager_counts(f: RankFacts, step: int) -> Counter[str]:
    t = f.steps.get(step)
    return Counter(c.group for c in t.collectives) if t is not None else Counter()


def rule_out_of_step(ctx: Context, cfg: AnalyzerConfig) -> list[Finding]:
    """Requires every rank's ledger, stacks and process state. A rank waits in a collective that a peer
    already completed: their collective sequences
    disagreed earlier in the step, in code the ledger does not see (on vLLM's CPU platform the
    layers' all-reduces run inside a torch.compile'd graph that calls the communicator directly).

    Preconditions: a stall (a healthy step caught mid-collective has ranks a moment apart); every
    rank's process alive; the waiting ranks' stacks show a collective inside
    the open step; each peer that is not waiting issued at least as many eager collectives of every
    group in that step (by its ledger) and is idle on the ring or already in a later step. The peers
    that ran ahead are named, like a rank that finished a step without its peers' collective: with
    fewer collectives a rank does not block, it runs ahead (NCCL and gloo behave the same).
    """
    facts = list(ctx.facts.values())
    if ctx.snapshot.stall is None or len(facts) < 2 or any(f.alive is False for f in facts):
        return []
    waiting = [f for f in facts if f.host is ThreadActivity.COLLECTIVE and f.open_step is not None]
    if not waiting:
        return []
    step = min(f.open_step.step for f in waiting if f.open_step is not None)
    need = Counter[str]()
    for f in waiting:
        need |= _eager_counts(f, step)
    ahead = []
    for f in facts:
        if f in waiting:
            continue
        passed = all(_eager_counts(f, step)[g] >= n for g, n in need.items())
        later = f.last_begun is not None and f.last_begun > step
        idle_in_step = f.host is ThreadActivity.RING_WAIT and step in f.steps
        if not (passed and (later or idle_in_step)):
            return []  # a peer that is neither waiting nor clearly past the collective: not this rule
        ahead.append(f)
    if not ahead:
        return []
    names = ", ".join(str(f.rank) for f in ahead)
    stuck = ", ".join(str(f.rank) for f in waiting)
    evidence = [f"engine batch at step {step}: {ctx.describe_batch(step)}"]
    for f in waiting:
        n = sum(_eager_counts(f, step).values())
        evidence.append(
            f"rank {f.rank}: waits in {where(f.host_frame)}, eager collective #{n - 1} of step {step} (ledger)"
        )
    for f in ahead:
        n = sum(_eager_counts(f, step).values())
        doing = "already in a later step" if f.last_begun is not None and f.last_begun > step else "idle on the ring"
        evidence.append(f"rank {f.rank}: issued {n} eager collectives in step {step} and is {doing}")
    evidence.append(
        "the mismatch itself is in collectives the ledger does not record (a compiled graph calling the "
        "communicator directly); the ranks' stacks and eager counts place it in this step"
    )
    summary = (
        f"ranks out of step at step {step}: rank {stuck} waits in a collective that rank {names} already "
        f"completed, so their collective sequences disagreed earlier in the step; culprit rank {names}: it ran "
        "ahead (fewer collectives)"
    )
    culprits = tuple(f.rank for f in ahead)
    return [Finding("out_of_step", Verdict.COLLECTIVE_MISMATCH, step, culprits, summary, tuple(evidence))]


# ---- worker_dead --------------------------------------------------------------------


def rule_worker_dead(ctx: Context, cfg: AnalyzerConfig) -> list[Finding]:
    """Requires process state: a rank's process is gone. It blames only the dead ranks themselves, from
    their own evidence, so it holds even when another rank's ledger is missing. When the watcher saw some
    ranks go first (a ``process_exit`` stall) and more were gone by the time evidence was gathered (the
    server tearing itself down), the first ones are the culprits."""
    dead = [f for f in ctx.facts.values() if f.alive is False]
    if not dead:
        return []
    stall = ctx.snapshot.stall
    first = set(stall.ranks) if stall is not None and stall.kind == "process_exit" else set()
    evidence = []
    for f in dead:
        t = f.open_step
        last = f"open step {t.step}" if t else f"last step {f.last_begun}"
        evidence.append(f"rank {f.rank} (pid {f.evidence.pid}) is gone; its ledger ends in {last}")
    culprits = [f for f in dead if f.rank in first] or dead
    if len(culprits) < len(dead):
        later = ", ".join(str(f.rank) for f in dead if f not in culprits)
        evidence.append(
            f"rank {', '.join(str(f.rank) for f in culprits)} exited first (seen by the watcher); "
            f"rank {later} went after it, as the server tore itself down"
        )
    step = min((f.open_step.step for f in culprits if f.open_step), default=None)
    if step is None and stall is not None and stall.kind == "process_exit":
        step = stall.step
    ranks = tuple(f.rank for f in culprits)
    summary = f"worker rank {', '.join(map(str, ranks))} died" + (f" during step {step}" if step is not None else "")
    return [Finding("worker_dead", Verdict.WORKER_DEAD, step, ranks, summary, tuple(evidence))]


# ---- host_hang ----------------------------------------------------------------------


def _waiting(f: RankFacts) -> bool:
    if f.host in (ThreadActivity.DEVICE_SYNC, ThreadActivity.COLLECTIVE):
        return True
    t = f.open_step
    return f.host is ThreadActivity.UNKNOWN and t is not None and bool(t.launches)


def _host_stuck(f: RankFacts, step: int) -> bool:
    if f.alive is False:
        return False
    if f.host is ThreadActivity.HOST_CODE:
        return True
    t = f.steps.get(step)
    return f.host is ThreadActivity.UNKNOWN and t is not None and t.open and not t.launches


def _launched(f: RankFacts, step: int) -> bool:
    t = f.steps.get(step)
    return t is not None and t.open and bool(t.launches)


def rule_host_hang(ctx: Context, cfg: AnalyzerConfig) -> list[Finding]:
    """Requires every rank's ledger: one rank busy or blocked in host code while its peers wait for it.

    Peers wait in a collective or a device sync by their stacks; or, where every live rank's stack
    reads as host code (an opaque native call such as a compiled graph's ``OpOverload.__call__``
    with no native stack to see below it), the peers launched the open step by their ledgers while
    the culprit never launched it: a TP step cannot finish without every rank.
    """
    opened = [f.open_step.step for f in ctx.facts.values() if f.open_step is not None]
    if not opened:
        return []
    step = max(opened)
    stuck = [f for f in ctx.facts.values() if _host_stuck(f, step)]
    peers = [f for f in ctx.facts.values() if f not in stuck and f.alive is not False]
    by_ledger = False
    if stuck and not peers:
        behind = [f for f in stuck if not _launched(f, step)]
        if behind and len(behind) < len(stuck):
            by_ledger = True
            peers = [f for f in stuck if f not in behind]
            stuck = behind
    if not stuck or not peers or not (by_ledger or all(_waiting(p) for p in peers)):
        return []
    evidence = []
    for f in stuck:
        where_ = where(f.host_frame) if f.host_frame else "host code (ledger: step begun, nothing launched)"
        ahead = f"; it never launched step {step}" if by_ledger else ""
        evidence.append(f"rank {f.rank}: host thread in {where_}{ahead}")
    for p in peers:
        doing = p.describe_activity() or "launched step " + str(step) + ", not finished"
        if by_ledger:
            doing = f"launched step {step} (ledger) and is inside it: {doing}"
        evidence.append(f"rank {p.rank}: {doing}")
    ranks = tuple(f.rank for f in stuck)
    summary = (
        f"rank {', '.join(map(str, ranks))} is stuck in host code at step {step} "
        f"while its peers wait for it on the device"
    )
    return [Finding("host_hang", Verdict.HOST_HANG, step, ranks, summary, tuple(evidence))]


# ---- device_hang --------------------------------------------------------------------


def novelty(ctx: Context, step: int) -> tuple[str, ...]:
    """What is new about this step's keys compared with every earlier step in the ledgers."""
    notes: list[str] = []
    for f in ctx.facts.values():
        trace = f.steps.get(step)
        if trace is None or trace.begin is None:
            continue
        key, padded = trace.begin.key, trace.begin.padded_reqs
        earlier = [t.begin for s, t in f.steps.items() if s < step and t.begin is not None]
        same = [b for b in earlier if b.key == key]
        if not same:
            notes.append(f"first time key {key.label()} ran")
        elif padded and not any(b.padded_reqs for b in same):
            notes.append(
                f"first time key {key.label()} ran with padded request slots "
                f"({padded} of {key.num_reqs} slots padded; {len(same)} earlier runs had none)"
            )
        elif padded and not any(b.padded_reqs == padded for b in same):
            notes.append(f"first time key {key.label()} ran with {padded} padded slots")
        for launch in trace.launches:
            if launch.role is Role.DRAFTER:
                seen = any(
                    lk.role is Role.DRAFTER and lk.key == launch.key
                    for s, t in f.steps.items()
                    if s < step
                    for lk in t.launches
                )
                if not seen:
                    notes.append(f"first time drafter key {launch.key.label()} ran")
        break  # every rank agrees (checked by the rule); one rank's history speaks for all
    return tuple(notes)


def rule_device_hang(ctx: Context, cfg: AnalyzerConfig) -> list[Finding]:
    """Requires every rank's ledger: all ranks are alive, inside the same step with the same key, having
    launched it, and none is in host code."""
    facts = list(ctx.facts.values())
    if not facts or any(f.alive is False for f in facts):
        return []
    opens = [f.open_step for f in facts]
    if any(t is None or not t.launches for t in opens):
        return []
    steps = {t.step for t in opens if t is not None}
    keys = {t.key(Role.MODEL) for t in opens if t is not None}
    if len(steps) != 1 or len(keys) != 1:
        return []
    if any(f.host not in (ThreadActivity.DEVICE_SYNC, ThreadActivity.UNKNOWN) for f in facts):
        return []
    step = steps.pop()
    key = keys.pop()
    in_kernel = [f.rank for f in facts if f.device is ThreadActivity.KERNEL]
    evidence = [f"rank {f.rank}: {f.describe_activity() or 'launched, not finished (ledger only)'}" for f in facts]
    busy = [g for g in ctx.snapshot.gpus if g.utilization_pct >= cfg.busy_gpu_utilization_pct]
    if busy:
        evidence.append("GPU " + ", ".join(f"{g.index}: {g.utilization_pct:.0f}% busy" for g in busy))
    # Only ranks seen in the kernel are singled out, and only when every other rank's device is known
    # to be elsewhere: a rank whose stack could not be read may be in the same kernel.
    unknown = any(f.device is ThreadActivity.UNKNOWN for f in facts)
    culprits = tuple(in_kernel) if in_kernel and not unknown else tuple(f.rank for f in facts)
    label = key.label() if key else "?"
    kernel = where(ctx.facts[in_kernel[0]].device_frame) if in_kernel else "the graph"
    summary = (
        f"all {len(facts)} ranks agree on step {step} and key {label} and are stuck on the device "
        f"inside {kernel}: a device-side hang, not a collective mismatch"
    )
    return [
        Finding(
            "device_hang",
            Verdict.DEVICE_HANG,
            step,
            culprits,
            summary,
            tuple(evidence),
            novelty=novelty(ctx, step),
        )
    ]


# ---- engine_stall -------------------------------------------------------------------


def rule_engine_stall(ctx: Context, cfg: AnalyzerConfig) -> list[Finding]:
    """Requires every rank's ledger and the engine's: the engine holds requests and dispatches nothing
    while every rank is idle on the broadcast ring."""
    eng = ctx.engine
    if eng is None or eng.open_step is not None or eng.pending == 0:
        return []
    if any(f.open_step is not None for f in ctx.facts.values()):
        return []
    if any(f.host not in (ThreadActivity.RING_WAIT, ThreadActivity.UNKNOWN) for f in ctx.facts.values()):
        return []
    stalled = ctx.snapshot.stall is not None and ctx.snapshot.stall.kind == "no_dispatch"
    if not stalled and eng.host is not ThreadActivity.HOST_CODE:
        return []
    last = eng.last_result
    assert last is not None
    evidence = [
        f"engine's last step {last.step} finished with {last.running} running and {last.waiting} waiting requests",
        "every rank is idle, waiting on the broadcast ring",
    ]
    if eng.host is not ThreadActivity.UNKNOWN:
        evidence.append(f"engine main thread: {eng.host.value} in {where(eng.host_frame)}")
    summary = (
        f"the engine stopped dispatching after step {last.step} with {last.running + last.waiting} requests "
        "pending; workers are idle"
    )
    return [Finding("engine_stall", Verdict.ENGINE_STALL, last.step + 1, (), summary, tuple(evidence))]


RULES: tuple[Rule, ...] = (
    Rule("collective_mismatch", ("ledgers", "all_ranks"), rule_collective_mismatch),
    Rule("out_of_step", ("ledgers", "stacks", "procs", "all_ranks"), rule_out_of_step),
    Rule("worker_dead", ("procs",), rule_worker_dead),
    Rule("host_hang", ("ledgers", "all_ranks"), rule_host_hang),
    Rule("device_hang", ("ledgers", "all_ranks"), rule_device_hang),
    Rule("engine_stall", ("ledgers", "engine", "all_ranks"), rule_engine_stall),
)

PRIORITY = (
    Verdict.COLLECTIVE_MISMATCH,
    Verdict.WORKER_DEAD,
    Verdict.HOST_HANG,
    Verdict.DEVICE_HANG,
    Verdict.ENGINE_STALL,
)
