"""Facts derived from a Snapshot: per-rank step traces, collective sequences, states. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from collectors.format import (
    Collective,
    CollectiveOp,
    CUDAGraphMode,
    EngineResult,
    EngineStep,
    GraphKey,
    Launch,
    Ledger,
    Manifest,
    Record,
    Role,
    StepBegin,
    StepEnd,
)
from watchdog.analyzer.completeness import damage, implausible
from watchdog.analyzer.config import AnalyzerConfig
from watchdog.analyzer.stacks import device_activity, host_activity, where
from watchdog.keys import DispatchConfig
from watchdog.types import Frame, ProcessEvidence, Snapshot, ThreadActivity


@dataclass
class StepTrace:
    step: int
    begin: StepBegin | None = None
    end: StepEnd | None = None
    launches: list[Launch] = field(default_factory=list)
    collectives: list[Collective] = field(default_factory=list)
    # Launch and Collective records in the order the host issued them.
    events: list[Launch | Collective] = field(default_factory=list)
    gap: bool = False  # a slot of this step could not be read: its sequence is not known whole

    @property
    def open(self) -> bool:
        return self.begin is not None and self.end is None

    def key(self, role: Role) -> GraphKey | None:
        if role is Role.MODEL and self.begin is not None:
            return self.begin.key
        for launch in self.launches:
            if launch.role is role:
                return launch.key
        return None


@dataclass(frozen=True)
class SeqItem:
    op: CollectiveOp
    source: str  # e.g. "model FULL(tokens=32, reqs=16 uniform) #3" or "eager #7"


@dataclass(frozen=True)
class Sequence:
    items: tuple[SeqItem, ...]
    complete: bool  # the step ended: nothing more will be issued
    unknown_manifest: bool = False  # a replay whose manifest the ledger lacks


@dataclass
class RankFacts:
    rank: int
    evidence: ProcessEvidence
    steps: dict[int, StepTrace]
    alive: bool | None  # None: process state unknown
    host: ThreadActivity
    host_frame: Frame | None
    device: ThreadActivity
    device_frame: Frame | None
    damaged: str | None = None  # why the ledger is not trusted as a whole

    @property
    def ledger(self) -> Ledger | None:
        return self.evidence.ledger

    @property
    def open_step(self) -> StepTrace | None:
        opened = [t for t in self.steps.values() if t.open]
        return max(opened, key=lambda t: t.step) if opened else None

    @property
    def last_begun(self) -> int | None:
        begun = [s for s, t in self.steps.items() if t.begin is not None]
        return max(begun) if begun else None

    @property
    def first_complete(self) -> int | None:
        """The earliest step whose begin record is still in the ring."""
        begun = [s for s, t in self.steps.items() if t.begin is not None]
        return min(begun) if begun else None

    def manifests(self) -> Mapping[int, Manifest]:
        return self.ledger.manifests if self.ledger is not None else {}

    def sequence(self, step: int) -> Sequence | None:
        trace = self.steps.get(step)
        if trace is None or trace.begin is None or trace.gap:
            return None
        # A failed step may stop anywhere: what it issued is evidence, what it did not is not (it is
        # compared like a step still open: a shorter failed sequence is never a divergence).
        failed = trace.end is not None and not trace.end.ok
        items: list[SeqItem] = []
        unknown = False
        manifests = self.manifests()
        for ev in trace.events:
            if isinstance(ev, Collective):
                items.append(SeqItem(CollectiveOp(ev.op, ev.group, ev.dtype, ev.numel), f"eager #{ev.group_seq}"))
            elif ev.key.mode is not CUDAGraphMode.NONE:
                m = manifests.get(ev.manifest_hash)
                if m is None:
                    unknown = True
                    continue
                role = ev.role.name.lower()
                items.extend(SeqItem(op, f"{role} graph {ev.key.label()} #{i}") for i, op in enumerate(m.collectives))
        return Sequence(tuple(items), complete=trace.end is not None and not failed, unknown_manifest=unknown)

    def describe_activity(self) -> str:
        parts = []
        if self.host is not ThreadActivity.UNKNOWN:
            parts.append(f"host {self.host.value} in {where(self.host_frame)}")
        if self.device is not ThreadActivity.UNKNOWN:
            parts.append(f"device {self.device.value} in {where(self.device_frame)}")
        return "; ".join(parts)


def plausible(ledger: Ledger | None) -> tuple[list[Record], str | None]:
    """The ledger's records without those whose step number is impossible, and why the ledger is
    damaged (None: it looks sound)."""
    if ledger is None:
        return [], None
    bad = set(implausible(ledger.records))
    return [r for i, r in enumerate(ledger.records) if i not in bad], damage(ledger, len(bad))


def traces(records: Iterable[Record]) -> dict[int, StepTrace]:
    out: dict[int, StepTrace] = {}
    last: tuple[int, int] | None = None  # (highest seq so far, its step)
    for rec in records:
        if isinstance(rec, StepBegin | StepEnd | Launch | Collective):
            trace = out.setdefault(rec.step, StepTrace(rec.step))
            # Every record takes one slot: a seq that jumps means slots in between were torn or
            # damaged, and the steps they belonged to are missing records. Those steps' collective
            # sequences are unknown, not shorter.
            if last is not None and rec.seq > last[0] + 1:
                for s in range(last[1], rec.step + 1):
                    out.setdefault(s, StepTrace(s)).gap = True
            if last is None or rec.seq > last[0]:
                last = (rec.seq, rec.step)
            if isinstance(rec, StepBegin):
                trace.begin = rec
                if rec.launch is not None:  # the model launch folded into the begin record
                    trace.launches.append(rec.launch)
                    trace.events.append(rec.launch)
            elif isinstance(rec, StepEnd):
                trace.end = rec
            elif isinstance(rec, Launch):
                trace.launches.append(rec)
                trace.events.append(rec)
            else:
                trace.collectives.append(rec)
                trace.events.append(rec)
    return out


def rank_facts(ev: ProcessEvidence, cfg: AnalyzerConfig) -> RankFacts:
    host, host_frame = host_activity(ev.stack, cfg, ev.native_stack)
    device, device_frame = device_activity(ev.stack, cfg)
    alive = None if ev.proc is None else ev.proc.alive
    records, damaged = plausible(ev.ledger)
    return RankFacts(
        rank=ev.rank if ev.rank is not None else -1,
        evidence=ev,
        steps=traces(records),
        alive=alive,
        host=host,
        host_frame=host_frame,
        device=device,
        device_frame=device_frame,
        damaged=damaged,
    )


@dataclass(frozen=True)
class EngineFacts:
    dispatched: Mapping[int, EngineStep]
    results: Mapping[int, EngineResult]
    last_result: EngineResult | None
    open_step: EngineStep | None  # dispatched, no result yet
    host: ThreadActivity
    host_frame: Frame | None
    alive: bool | None
    damaged: str | None = None

    @property
    def pending(self) -> int:
        """Requests the engine held after its last completed step (running + waiting)."""
        if self.last_result is None:
            return 0
        return self.last_result.running + self.last_result.waiting


def engine_facts(ev: ProcessEvidence | None, cfg: AnalyzerConfig) -> EngineFacts | None:
    if ev is None or ev.ledger is None:
        return None
    dispatched: dict[int, EngineStep] = {}
    results: dict[int, EngineResult] = {}
    records, damaged = plausible(ev.ledger)
    for rec in records:
        if isinstance(rec, EngineStep):
            dispatched[rec.step] = rec
        elif isinstance(rec, EngineResult):
            results[rec.step] = rec
    last_result = results[max(results)] if results else None
    open_steps = [s for s in dispatched if s not in results]
    host, frame = host_activity(ev.stack, cfg, ev.native_stack)
    return EngineFacts(
        dispatched=dispatched,
        results=results,
        last_result=last_result,
        open_step=dispatched[max(open_steps)] if open_steps else None,
        host=host,
        host_frame=frame,
        alive=None if ev.proc is None else ev.proc.alive,
        damaged=damaged,
    )


def dispatch_config(facts: Mapping[int, RankFacts]) -> tuple[DispatchConfig | None, int]:
    """The dispatcher settings the ranks recorded at start-up, and num_speculative_tokens."""
    for f in facts.values():
        if f.ledger is None:
            continue
        conf = f.ledger.config
        try:
            return DispatchConfig.from_json(conf), int(conf.get("num_speculative_tokens", 0))
        except (KeyError, TypeError, ValueError):
            continue
    return None, 0


def facts_of(snapshot: Snapshot, cfg: AnalyzerConfig) -> dict[int, RankFacts]:
    return {rank: rank_facts(ev, cfg) for rank, ev in sorted(snapshot.ranks.items())}
