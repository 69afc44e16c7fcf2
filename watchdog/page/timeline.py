"""The incident picture's data: one lane per rank (and the engine), the last N steps as bars. Pure.

Times are wall-clock nanoseconds: each ledger's monotonic stamps are moved onto the wall clock
with its own header (start_wall_ns - start_mono_ns), so lanes written on different nodes (other
monotonic clocks) line up as well as their wall clocks do. The axis is in ms relative to the
stall: 0 is where the stuck (or first divergent) step began on the first rank that began it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from collectors.format import Collective, EngineResult, EngineStep, GraphKey, Launch, Role
from collectors.reader import Ledger
from watchdog.analyzer.facts import StepTrace, traces
from watchdog.types import Diagnosis, Snapshot

DEFAULT_STEPS = 8


@dataclass(frozen=True)
class Bar:
    step: int
    begin_ns: int
    end_ns: int | None  # None: the step never ended (drawn to "now")
    key: GraphKey | None
    drafter_key: GraphKey | None = None
    drafter_ns: int | None = None  # when the drafter launched
    padded_reqs: int = 0
    ticks: tuple[tuple[int, str], ...] = ()  # eager collectives: (time, "all_reduce float32 x1280 #7")
    detail: str = ""  # the engine's batch (engine lane only)
    dispatched: bool = True  # False: the engine never sent this step (drawn from its last record to now)


@dataclass(frozen=True)
class Lane:
    name: str  # "rank 3" or "engine"
    rank: int | None  # None: the engine
    bars: tuple[Bar, ...]
    culprit: bool = False
    missing: str = ""  # why this lane has no data (no ledger); empty when it has some
    state: str = ""  # the diagnosis' rank state


@dataclass(frozen=True)
class Timeline:
    lanes: tuple[Lane, ...]
    steps: tuple[int, ...]  # the window of steps drawn
    zero_ns: int  # the axis' 0 (the stall)
    now_ns: int  # what "now" means: when the evidence was taken, or the ledgers' last record
    now_label: str
    focus_step: int | None  # the stuck / first divergent step
    keys: tuple[GraphKey, ...] = field(default=())  # every key drawn, in a stable order (the legend)
    zero_label: str = ""  # what 0 on the axis is

    @property
    def first_ns(self) -> int:
        times = [b.begin_ns for lane in self.lanes for b in lane.bars]
        return min(times) if times else self.zero_ns

    @property
    def last_event_ns(self) -> int:
        """The latest time anything in the window happened (an open bar's end is not an event)."""
        times: list[int] = []
        for lane in self.lanes:
            for b in lane.bars:
                times.append(b.begin_ns if b.end_ns is None else b.end_ns)
                times.extend(t for t, _ in b.ticks)
                if b.drafter_ns is not None:
                    times.append(b.drafter_ns)
        return max(times) if times else self.zero_ns


def _clock(ledger: Ledger) -> int:
    """What to add to this ledger's monotonic stamps to get wall-clock ns."""
    return ledger.header.start_wall_ns - ledger.header.start_mono_ns


def _rank_bars(trace: dict[int, StepTrace], steps: range, off: int) -> list[Bar]:
    bars: list[Bar] = []
    for s in steps:
        t = trace.get(s)
        if t is None or t.begin is None:
            continue
        drafter = next((la for la in t.launches if isinstance(la, Launch) and la.role is Role.DRAFTER), None)
        ticks = tuple(
            (c.mono_ns + off, f"{c.op} {c.dtype} x{c.numel} ({c.group} #{c.group_seq})")
            for c in t.collectives
            if isinstance(c, Collective)
        )
        bars.append(
            Bar(
                step=s,
                begin_ns=t.begin.mono_ns + off,
                end_ns=None if t.end is None else t.end.mono_ns + off,
                key=t.begin.key,
                drafter_key=None if drafter is None else drafter.key,
                drafter_ns=None if drafter is None else drafter.mono_ns + off,
                padded_reqs=t.begin.padded_reqs,
                ticks=ticks,
            )
        )
    return bars


def _engine_bars(ledger: Ledger, steps: range, focus: int | None) -> list[Bar]:
    off = _clock(ledger)
    sent: dict[int, EngineStep] = {}
    done: dict[int, EngineResult] = {}
    for rec in ledger.records:
        if isinstance(rec, EngineStep):
            sent[rec.step] = rec
        elif isinstance(rec, EngineResult):
            done[rec.step] = rec
    bars = []
    for s in steps:
        e = sent.get(s)
        if e is None:
            continue
        r = done.get(s)
        batch = (
            f"{e.num_reqs} reqs ({e.num_decode_reqs} decode), {e.total_tokens} tokens; "
            f"running {e.running}, waiting {e.waiting}"
        )
        bars.append(Bar(s, e.mono_ns + off, None if r is None else r.mono_ns + off, None, detail=batch))
    if focus is not None and focus in steps and focus not in sent and (last := _last_record_ns(ledger)) is not None:
        # the stuck step is one the engine never dispatched: that wait is the engine's open "step"
        bars.append(Bar(focus, last, None, None, dispatched=False))
    return bars


def _last_record_ns(ledger: Ledger) -> int | None:
    stamps = [getattr(r, "mono_ns", 0) for r in ledger.records]
    return max(stamps) + _clock(ledger) if stamps else None


def build(snapshot: Snapshot, diagnosis: Diagnosis, n_steps: int = DEFAULT_STEPS) -> Timeline:
    rank_traces = {r: traces(ev.ledger.records if ev.ledger is not None else ()) for r, ev in snapshot.ranks.items()}
    offs = {r: _clock(ev.ledger) for r, ev in snapshot.ranks.items() if ev.ledger is not None}
    begun = sorted({s for tr in rank_traces.values() for s, t in tr.items() if t.begin is not None})
    engine = snapshot.engine.ledger if snapshot.engine is not None else None
    if engine is not None and not begun:
        begun = sorted({r.step for r in engine.records if isinstance(r, EngineStep)})
    div = diagnosis.first_divergence
    focus = div.step if div is not None else diagnosis.step
    if focus is None and begun:
        focus = begun[-1]
    hi = max([*begun, focus]) if begun and focus is not None else (focus or 0)
    lo = (focus if focus is not None else hi) - n_steps + 1
    lo = max(lo, hi - n_steps - 3)  # ranks that ran ahead of the focus step stay visible, within reason
    window = range(lo, hi + 1)

    world = max([ev.ledger.header.world_size for ev in snapshot.ranks.values() if ev.ledger is not None] or [0])
    ranks = sorted({*snapshot.ranks, *diagnosis.ranks, *range(world)})
    lanes: list[Lane] = []
    for r in ranks:
        ev = snapshot.ranks.get(r)
        rep = diagnosis.ranks.get(r)
        state = "" if rep is None else rep.state.value
        culprit = r in diagnosis.culprit_ranks
        if ev is None or ev.ledger is None:
            lanes.append(Lane(f"rank {r}", r, (), culprit, "no ledger: this rank's evidence is missing", state))
            continue
        lanes.append(Lane(f"rank {r}", r, tuple(_rank_bars(rank_traces[r], window, offs[r])), culprit, "", state))
    if engine is not None:
        lanes.append(Lane("engine", None, tuple(_engine_bars(engine, window, focus))))
    elif snapshot.ranks:
        lanes.append(Lane("engine", None, (), missing="no engine ledger"))

    focus_begins = [b.begin_ns for lane in lanes if lane.rank is not None for b in lane.bars if b.step == focus] or [
        b.begin_ns for lane in lanes for b in lane.bars if b.step == focus and b.dispatched
    ]
    ends = [t for t in (_last_record_ns(ev.ledger) for ev in snapshot.ranks.values() if ev.ledger) if t is not None]
    if engine is not None and (t := _last_record_ns(engine)) is not None:
        ends.append(t)
    last = max(ends) if ends else 0
    if snapshot.live and snapshot.taken_wall_ns > 0:
        now, now_label = max(snapshot.taken_wall_ns, last), "evidence taken"
    else:
        now, now_label = last, "last record"
    zero = min(focus_begins) if focus_begins else last
    if focus_begins:
        zero_label = f"step {focus} began"
    elif focus is not None:
        zero_label = f"the last record; step {focus} never began"
    else:
        zero_label = "the last record"
    seen: dict[GraphKey, None] = {}
    for lane in lanes:
        for b in lane.bars:
            for k in (b.key, b.drafter_key):
                if k is not None:
                    seen.setdefault(k, None)
    keys = tuple(sorted(seen, key=lambda k: (k.mode.value, k.num_tokens, k.num_reqs or 0, k.uniform)))
    return Timeline(tuple(lanes), tuple(window), zero, now, now_label, focus, keys, zero_label)
