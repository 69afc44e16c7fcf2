"""Facts derived from a Snapshot: per-rank step traces, collective sequences, states. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from collectors.format import (
    Collective,
    CollectiveOp,
    CUDAGraphMode,
    EngineResult,
    EngineStep,
    GraphKey,
    Launch,
    Manifest,
    Role,
    StepBegin,
    StepEnd,
)
from collectors.reader import Ledger
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
        if trace is None or trace.begin is None:
            return None
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
        return Sequence(tuple(items), complete=trace.end is not None, unknown_manifest=unknown)

    def describe_activity(self) -> str:
        parts = []
        if self.host is not ThreadActivity.UNKNOWN:
            parts.append(f"host {self.host.value} in {where(self.host_frame)}")
        if self.device is not ThreadActivity.UNKNOWN:
            parts.append(f"device {self.device.value} in {where(self.device_frame)}")
        return "; ".join(parts)


def traces(ledger: Ledger | None) -> dict[int, StepTrace]:
    out: dict[int, StepTrace] = {}
    if ledger is None:
        return out
    for rec in ledger.records:
        if isinstance(rec, StepBegin | StepEnd | Launch | Collective):
            trace = out.setdefault(rec.step, StepTrace(rec.step))
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
    return RankFacts(
        rank=ev.rank if ev.rank is not None else -1,
        evidence=ev,
        steps=traces(ev.ledger),
        alive=alive,
        host=host,
        host_frame=host_frame,
        device=device,
        device_frame=device_frame,
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
    for rec in ev.ledger.records:
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
