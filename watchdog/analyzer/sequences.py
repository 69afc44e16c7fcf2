"""The first collective at which the ranks' sequences for one step cannot all match. Pure.

Compared step by step over the steps every rank still holds: first the collectives each rank
issued (eager, and those of the graphs it replayed, from their capture manifests), then the graph
keys it launched. A step with unreadable records and a replay whose manifest the ledger lacks are
not compared; a failed step is compared as far as it went (``RankFacts.sequence``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from collectors.format import VARIABLE_SIZE_OPS, Collective, CollectiveOp, CUDAGraphMode
from watchdog.analyzer.facts import RankFacts, Sequence
from watchdog.types import Divergence


def find_divergence(facts: Mapping[int, RankFacts]) -> Divergence | None:
    """The first step and index at which ranks' collective sequences cannot all match."""
    ranks = [f for f in facts.values() if f.ledger is not None and f.first_complete is not None]
    if len(ranks) < 2:
        return None
    start = max(f.first_complete for f in ranks if f.first_complete is not None)
    end = max(f.last_begun for f in ranks if f.last_begun is not None)
    for step in range(start, end + 1):
        seqs = {f.rank: f.sequence(step) for f in ranks}
        present = {r: s for r, s in seqs.items() if s is not None and not s.unknown_manifest}
        if len(present) < 2:
            continue
        longest = max(len(s.items) for s in present.values())
        for i in range(longest):
            ops: dict[int, CollectiveOp | None] = {}
            sources: dict[int, str] = {}
            for r, s in present.items():
                if i < len(s.items):
                    ops[r] = s.items[i].op
                    sources[r] = s.items[i].source
                elif s.complete:
                    ops[r] = None  # finished the step: it will never issue this one
                    sources[r] = "nothing: the step ended"
            if len({_comparable(op) for op in ops.values()}) > 1:
                return Divergence(step, i, ops, sources)
        launched = _launch_divergence(facts, step, present)
        if launched is not None:
            return launched
    return None


def _comparable(op: CollectiveOp | None) -> CollectiveOp | None:
    """``op`` as ranks must agree on it: a variable-size gather's size differs by design."""
    if op is not None and op.op in VARIABLE_SIZE_OPS:
        return dataclasses.replace(op, numel=-1)
    return op


def _launch_divergence(facts: Mapping[int, RankFacts], step: int, present: Mapping[int, Sequence]) -> Divergence | None:
    """Ranks whose collectives matched but whose graph keys differ (the same step must launch the same
    graphs everywhere: a key can differ where the collectives happen to have the same shape). The
    divergence is placed at the first collective the differing launch issued."""
    launches = {r: facts[r].steps[step].launches for r in present}
    longest = max(len(x) for x in launches.values())
    for j in range(longest):
        keys = {
            r: (x[j].role, x[j].key) if j < len(x) else None
            for r, x in launches.items()
            if j < len(x) or present[r].complete
        }
        if len(set(keys.values())) < 2:
            continue
        index = min(_items_before(facts[r], step, j) for r in keys)
        ops: dict[int, CollectiveOp | None] = {}
        sources: dict[int, str] = {}
        for r, k in keys.items():
            items = present[r].items
            ops[r] = items[index].op if index < len(items) else None
            sources[r] = "no launch" if k is None else f"{k[0].name.lower()} launch {k[1].label()}"
        return Divergence(step, index, ops, sources)
    return None


def _items_before(f: RankFacts, step: int, launch: int) -> int:
    """How many sequence items rank ``f`` issued in ``step`` before its ``launch``-th launch."""
    trace = f.steps[step]
    manifests = f.manifests()
    n = seen = 0
    for ev in trace.events:
        if isinstance(ev, Collective):
            n += 1
            continue
        if seen == launch:
            return n
        seen += 1
        m = manifests.get(ev.manifest_hash)
        n += len(m.collectives) if m is not None and ev.key.mode is not CUDAGraphMode.NONE else 0
    return n
