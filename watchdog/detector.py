"""The stall detector: adaptive deadlines per step kind, fed with ledger records.

A step is stalled when it has been open longer than max(floor, k x recent p99) of steps of its
kind (graph mode, uniform or not, token-count bucket). A kind with too few samples borrows the
p99 of steps at least as large as it (a step no larger than ones already seen should not take
longer than they did); a step larger than any seen gets a deadline scaled up from all steps,
so a first long prefill is not a stall; with no history at all (warm-up) the cold deadline
applies. Graph capture happens before the first
step, so it opens no step and cannot fire. The engine side adds "requests pending but nothing
dispatched". An idle server has nothing open and nothing pending, so it never fires.

The floor learns from the server's own hiccups: a step (or a wait for dispatch) that passed its
deadline and then completed was not a hang, so the floor rises to ``recovered_margin`` x the time
it took, never above ``max_floor_s`` (and the step does not join its kind's p99: one 30 s pause
would otherwise put that kind's deadline at 300 s). A CPU server sharing its cores, or a GPU host with a slow
page-in, then reports such a pause once instead of at every recurrence; a real hang is still
declared within ``max_floor_s``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from collectors.format import (
    EngineQueue,
    EngineResult,
    EngineStep,
    GraphKey,
    Record,
    StepBegin,
    StepEnd,
)
from watchdog.types import StallInfo

Kind = tuple[str, bool, int]


@dataclass(frozen=True)
class DetectorConfig:
    floor_s: float = 1.0
    multiplier: float = 10.0
    min_samples: int = 3
    unseen_kind_factor: float = 3.0
    cold_deadline_s: float = 60.0
    history: int = 256
    max_floor_s: float = 5.0  # the most recovered stalls may raise the floor to
    recovered_margin: float = 1.5


def kind_of(key: GraphKey) -> Kind:
    bucket = 1 << max(0, math.ceil(math.log2(max(1, key.num_tokens))))
    return (key.mode.value, key.uniform, bucket)


def p99(samples: deque[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass
class _Open:
    step: int
    kind: Kind
    tokens: int
    since_ns: int
    declared: bool = False  # reported as a stall: if it completes after all, the floor learns


@dataclass
class StallDetector:
    cfg: DetectorConfig = field(default_factory=DetectorConfig)
    _by_kind: dict[Kind, deque[float]] = field(default_factory=dict)
    _tokens_seen: int = 0
    _by_size: deque[tuple[int, float]] = field(default_factory=deque)  # (tokens, seconds)
    _open: dict[int, _Open] = field(default_factory=dict)
    _gaps: deque[float] = field(default_factory=deque)
    _pending: int = 0
    _idle_since_ns: int | None = None  # engine finished a step and has not dispatched since
    _engine_open: tuple[int, int] | None = None  # (step, dispatched at)
    _dispatch_declared: bool = False  # a no_dispatch stall (or a dispatch no rank began) was reported
    learned_floor_s: float = 0.0  # raised by stalls that were over after all; see the module's doc

    def floor_s(self) -> float:
        return max(self.cfg.floor_s, self.learned_floor_s)

    def _recovered(self, seconds: float) -> None:
        cap = max(self.cfg.floor_s, self.cfg.max_floor_s)
        self.learned_floor_s = max(self.learned_floor_s, min(cap, self.cfg.recovered_margin * seconds))

    def observe(self, rank: int | None, records: list[Record]) -> None:
        for rec in records:
            if isinstance(rec, StepBegin) and rank is not None:
                self._open[rank] = _Open(rec.step, kind_of(rec.key), rec.key.num_tokens, rec.mono_ns)
                if self._dispatch_declared and self._engine_open is not None:
                    self._recovered((rec.mono_ns - self._engine_open[1]) / 1e9)
                    self._dispatch_declared = False
            elif isinstance(rec, StepEnd) and rank is not None:
                o = self._open.pop(rank, None)
                if o is not None and o.step == rec.step:
                    seconds = (rec.mono_ns - o.since_ns) / 1e9
                    if o.declared:  # past its deadline: the floor learns it (capped), not the p99
                        self._recovered(seconds)
                    else:
                        self._add(o, seconds)
            elif isinstance(rec, EngineStep):
                if self._idle_since_ns is not None and self._pending:
                    gap = (rec.mono_ns - self._idle_since_ns) / 1e9
                    if self._dispatch_declared:
                        self._recovered(gap)
                    else:
                        self._push(self._gaps, gap)
                self._dispatch_declared = False
                self._engine_open = (rec.step, rec.mono_ns)
                self._idle_since_ns = None
            elif isinstance(rec, EngineResult):
                self._engine_open = None
                self._dispatch_declared = False
                self._pending = rec.running + rec.waiting
                self._idle_since_ns = rec.mono_ns
            elif isinstance(rec, EngineQueue):
                self._pending = rec.running + rec.waiting
                if self._engine_open is None:
                    self._idle_since_ns = rec.mono_ns

    def forget_rank(self, rank: int) -> None:
        self._open.pop(rank, None)

    def busy(self) -> bool:
        """Whether the deployment is working: a step open on some rank or the engine, or requests pending."""
        return bool(self._open) or self._engine_open is not None or self._pending > 0

    def open_step(self, ranks: list[int]) -> int | None:
        """The step open on any of ``ranks`` (else on the engine), for a process that died in it."""
        steps = [self._open[r].step for r in ranks if r in self._open]
        if steps:
            return min(steps)
        return self._engine_open[0] if self._engine_open is not None else None

    def forget_engine(self) -> None:
        """A restarted engine: what the old one had open or pending is gone with it."""
        self._engine_open, self._pending, self._idle_since_ns = None, 0, None
        self._dispatch_declared = False

    def _push(self, q: deque[float], value: float) -> None:
        q.append(value)
        while len(q) > self.cfg.history:
            q.popleft()

    def _add(self, o: _Open, seconds: float) -> None:
        self._push(self._by_kind.setdefault(o.kind, deque()), seconds)
        self._by_size.append((o.tokens, seconds))
        while len(self._by_size) > self.cfg.history:
            self._by_size.popleft()
        self._tokens_seen = max(self._tokens_seen, o.tokens)

    def _all(self) -> deque[float]:
        return deque(s for _, s in self._by_size)

    def deadline_s(self, kind: Kind, tokens: int) -> float:
        c, floor = self.cfg, self.floor_s()
        own = self._by_kind.get(kind)
        if own is not None and len(own) >= c.min_samples:
            return max(floor, c.multiplier * p99(own))
        larger = deque(s for n, s in self._by_size if n >= tokens)
        if larger:
            return max(floor, c.multiplier * p99(larger))
        if not self._by_size:
            return max(floor, c.cold_deadline_s)
        scale = max(1.0, tokens / max(1, self._tokens_seen))
        return max(floor, c.multiplier * c.unseen_kind_factor * p99(self._all()) * scale)

    def check(self, now_ns: int) -> StallInfo | None:
        """The oldest stall at ``now_ns``, if any."""
        floor = self.floor_s()
        worst: tuple[_Open, StallInfo] | None = None
        for o in self._open.values():
            age = (now_ns - o.since_ns) / 1e9
            if age <= floor:
                continue
            deadline = self.deadline_s(o.kind, o.tokens)
            if age > deadline and (worst is None or age > worst[1].age_s):
                worst = (o, StallInfo("open_step", o.step, age, deadline))
        if worst is not None:
            worst[0].declared = True
            return worst[1]
        if self._engine_open is not None:
            # Dispatched, but no rank has begun it (or none reports): workers never picked it up.
            step, since = self._engine_open
            age = (now_ns - since) / 1e9
            if age > floor and not self._open:
                c = self.cfg
                deadline = max(floor, c.multiplier * p99(self._all())) if self._by_size else c.cold_deadline_s
                if age > deadline:
                    self._dispatch_declared = True
                    return StallInfo("open_step", step, age, deadline)
        if self._pending and self._idle_since_ns is not None:
            age = (now_ns - self._idle_since_ns) / 1e9
            gaps = self._gaps
            deadline = (
                max(floor, self.cfg.multiplier * p99(gaps))
                if len(gaps) >= self.cfg.min_samples
                else max(floor, self.cfg.multiplier * 0.1)
            )
            if age > deadline:
                self._dispatch_declared = True
                return StallInfo("no_dispatch", None, age, deadline)
        return None
