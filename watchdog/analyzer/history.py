"""What the ranks did before a divergence, as the referee of a count mismatch. Pure.

With two ranks (or an even split) a divergent step has no majority, and where the engine's batch
calls for the key both ranks launched, no referee singles anyone out. But a model issues the same
collectives for the same graph key every step: the steps before the divergence, which every rank
completed with identical sequences, say what the divergent step should have held. A rank whose
sequence departs from that (a completed one that differs, an open one that is no longer a prefix of
it) is the one that changed; a rank that matches it is not. Without such earlier steps, or when
every rank departs from them, history decides nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

from collectors.format import CollectiveOp, GraphKey, Role
from watchdog.analyzer.facts import RankFacts

LOOKBACK = 64  # earlier steps examined, newest first
Full = tuple[CollectiveOp, ...]
Shape = tuple[tuple[str, str, str], ...]  # op, group, dtype: what is left of a sequence across batch sizes


def _shape(ops: Full) -> Shape:
    return tuple((o.op, o.group, o.dtype) for o in ops)


def _seq(f: RankFacts, step: int) -> tuple[Full, bool] | None:
    q = f.sequence(step)
    if q is None or q.unknown_manifest:
        return None
    return tuple(i.op for i in q.items), q.complete


def _key(f: RankFacts, step: int) -> GraphKey | None:
    t = f.steps.get(step)
    return None if t is None else t.key(Role.MODEL)


def departed(facts: Mapping[int, RankFacts], ranks: list[int], step: int) -> tuple[int, ...]:
    """The ranks whose collectives at ``step`` depart from what every rank issued in earlier steps
    with the same graph key (or, with no such step, from the one op sequence every earlier step had
    whatever its batch size); () when history cannot tell."""
    by_key: dict[GraphKey | None, Full] = {}
    shapes: set[Shape] = set()
    earlier = sorted({s for r in ranks for s in facts[r].steps if s < step}, reverse=True)[:LOOKBACK]
    for s in earlier:
        seqs = [_seq(facts[r], s) for r in ranks]
        keys = {_key(facts[r], s) for r in ranks}
        if any(q is None or not q[1] for q in seqs) or len({q[0] for q in seqs if q}) != 1 or len(keys) != 1:
            continue
        full = seqs[0][0] if seqs[0] else ()
        by_key.setdefault(keys.pop(), full)
        shapes.add(_shape(full))
    if not by_key:
        return ()
    shape = next(iter(shapes)) if len(shapes) == 1 else None
    wrong: list[int] = []
    for r in ranks:
        now = _seq(facts[r], step)
        if now is None:
            return ()
        ops, complete = now
        want_full = by_key.get(_key(facts[r], step))
        if want_full is not None:
            have, want = ops, want_full
        elif shape is not None:
            have, want = _shape(ops), shape  # type: ignore[assignment]
        else:
            return ()
        if (complete and have != want) or (not complete and have != want[: len(have)]):
            wrong.append(r)
    return tuple(wrong) if 0 < len(wrong) < len(ranks) else ()
