"""What every rule reads (``Context``: the snapshot, the facts derived from it, the referee's
expected keys, what evidence is complete) and what a rule is (``Rule``: a pure function and the
evidence it requires). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from collectors.format import CUDAGraphMode, GraphKey
from watchdog.analyzer.completeness import Completeness
from watchdog.analyzer.config import AnalyzerConfig
from watchdog.analyzer.facts import EngineFacts, RankFacts, dispatch_config
from watchdog.keys import DispatchConfig, dispatch, drafter_dispatch
from watchdog.types import Finding, Snapshot


@dataclass(frozen=True)
class Context:
    snapshot: Snapshot
    facts: dict[int, RankFacts]
    engine: EngineFacts | None
    dispatch: DispatchConfig | None
    num_spec: int
    complete: Completeness

    @classmethod
    def build(
        cls, snapshot: Snapshot, facts: dict[int, RankFacts], engine: EngineFacts | None, complete: Completeness
    ) -> Context:
        cfg, num_spec = dispatch_config(facts)
        return cls(snapshot, facts, engine, cfg, num_spec, complete)

    @property
    def has_stacks(self) -> bool:
        return any(f.evidence.stack is not None for f in self.facts.values())

    @property
    def has_procs(self) -> bool:
        return any(f.alive is not None for f in self.facts.values())

    def expected_keys(self, step: int) -> tuple[GraphKey, GraphKey | None] | None:
        """The referee: the keys every rank should have chosen for what the engine scheduled."""
        if self.engine is None or self.dispatch is None:
            return None
        sched = self.engine.dispatched.get(step)
        if sched is None:
            return None
        q = self.dispatch.uniform_decode_query_len
        uniform = (
            sched.num_reqs > 0
            and sched.num_decode_reqs == sched.num_reqs
            and sched.min_query_len == sched.max_query_len == q
        )
        model = dispatch(self.dispatch, sched.total_tokens, sched.num_reqs, uniform).key
        drafter = drafter_dispatch(self.dispatch, sched.total_tokens) if self.num_spec else None
        return model, drafter

    def describe_batch(self, step: int) -> str:
        sched = self.engine.dispatched.get(step) if self.engine else None
        if sched is None:
            return "unknown batch (no engine record)"
        kind = "all decode" if sched.num_decode_reqs == sched.num_reqs else f"{sched.num_decode_reqs} decode"
        return (
            f"{sched.total_tokens} tokens, {sched.num_reqs} requests ({kind}, {sched.placeholders} draft placeholders)"
        )


RuleFn = Callable[[Context, AnalyzerConfig], list[Finding]]


@dataclass(frozen=True)
class Rule:
    """A rule runs only when every evidence kind it ``requires`` is there:

    ``ledgers``    at least one rank's ledger was read;
    ``all_ranks``  every rank of the world size the ledgers state has a readable, plausible ledger
                   (a rule that compares ranks or blames one rank for another's wait needs them all:
                   from a partial set it would be confidently wrong);
    ``stacks``     py-spy dumps; ``procs``: process state; ``engine``: the engine's ledger (the referee).
    """

    name: str
    requires: tuple[str, ...]
    fn: RuleFn


def key_modes(ctx: Context, step: int | None) -> set[CUDAGraphMode]:
    if step is None:
        return set()
    return {lk.key.mode for f in ctx.facts.values() if (t := f.steps.get(step)) for lk in t.launches}
