"""Ranks out of step without a stall: compare the ranks' steps as they complete.

When ranks issue different *counts* of identical-size transfers (a graph with fewer collectives, a
skipped all-reduce), the rank with fewer does not block: its next step's transfers pair with the
other rank's leftovers and the group keeps running, reductions mixing different steps, until traffic
stops. A stall detector alone waits for a hang that may never come. So every rank's step is reduced
to a small digest (the graph keys it launched, with their capture-manifest hashes, and its eager
collectives per group: how many, and a running CRC of their op, dtype and size) and compared with
its peers' as soon as a step completes:

* two ranks that completed the same step must have launched the same keys and manifests, and issued
  the same eager collectives per group, in the same order and of the same sizes (TP ranks issue
  identical shapes; the variable-size gathers, whose sizes differ by design, are compared by op and
  dtype only);
* a rank still inside a step must not already have launched something a peer that completed it did
  not, nor issued more eager collectives in a group than that peer did in the whole step;
* no rank may stay inside a step for longer than ``grace_s`` after every peer finished it.

Tolerated, because they happen on healthy servers: a rank that has not reached the step yet (it is
only compared once it has), records lost to the ring wrapping or slots that could not be read (that
step is not compared), steps that ended with ok=False (a failed step may stop early), and a manifest
hash a reader could not know (0). The first disagreement in content is reported once;
``forget_rank`` (a restarted rank) re-arms the monitor. A rank reported lagging that then finishes
the step was slow, not out of step: the monitor re-arms by itself and widens the grace to 1.5 times
the lag it saw (at most ``max_grace_s``), so one slow rank on a loaded host neither silences the
monitor for good nor is reported at every step.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

from collectors.format import VARIABLE_SIZE_OPS, Collective, GraphKey, Launch, Record, Role, StepBegin, StepEnd
from collectors.jsonrecords import JsonRecord

KEEP_STEPS = 512  # digests kept per rank: far more than ranks ever drift apart on a healthy server

LaunchId = tuple[str, str, int]  # role, key label, manifest hash (0: unknown)


@dataclass
class StepDigest(JsonRecord):
    JSON_NAME: ClassVar[str] = "step digest"

    step: int
    begun_ns: int
    launches: list[LaunchId] = field(default_factory=list)
    eager: Counter[str] = field(default_factory=Counter)  # per group
    ended_ns: int | None = None
    ok: bool = True
    gap: bool = False  # a record of this step may be missing: not compared
    shapes: dict[str, int] = field(default_factory=dict)  # per group: CRC-32 chain of (op, dtype, numel)


@dataclass(frozen=True)
class Disagreement:
    step: int
    ranks: tuple[int, ...]
    reason: str
    lag_s: float = 0.0  # for a rank left inside a finished step: how long after its peers


def _launch(role: Role, key: GraphKey, manifest: int) -> LaunchId:
    return (role.name.lower(), key.label(), manifest)


def _same_launch(a: LaunchId, b: LaunchId) -> bool:
    return a[:2] == b[:2] and (a[2] == b[2] or 0 in (a[2], b[2]))


def _shape_crc(rec: Collective, prev: int) -> int:
    numel = -1 if rec.op in VARIABLE_SIZE_OPS else rec.numel
    return zlib.crc32(f"{rec.op}/{rec.dtype}/{numel};".encode(), prev)


def _what(launch: LaunchId | None) -> str:
    return "nothing" if launch is None else f"{launch[0]} {launch[1]}"


@dataclass
class _RankState:
    steps: dict[int, StepDigest] = field(default_factory=dict)
    last_seq: int | None = None
    last_step: int | None = None


@dataclass
class DivergenceMonitor:
    grace_s: float = 2.0
    max_grace_s: float = 10.0
    _ranks: dict[int, _RankState] = field(default_factory=dict)
    _fired: bool = False
    _lagging: Disagreement | None = None  # the lag reported last: re-armed once those ranks finish
    _checked: dict[int, int] = field(default_factory=dict)  # step -> what was compared (to skip repeats)
    _settled: int = -1  # every rank finished this step and it matched: earlier ones need no look

    def forget_rank(self, rank: int) -> None:
        """A restarted rank counts its steps from the start again: drop its history, re-arm."""
        self._ranks.pop(rank, None)
        self._checked.clear()
        self._settled = -1
        self._fired = False
        self._lagging = None

    def observe(self, rank: int | None, records: list[Record]) -> None:
        if rank is None:
            return
        st = self._ranks.setdefault(rank, _RankState())
        for rec in records:
            if not isinstance(rec, StepBegin | StepEnd | Launch | Collective):
                continue
            # Each record takes one slot: a seq that jumps means records of the steps in between
            # were not read (torn, or the ring wrapped past the reader).
            if st.last_seq is not None and rec.seq > st.last_seq + 1 and st.last_step is not None:
                for s in range(st.last_step, rec.step + 1):
                    if s in st.steps:
                        st.steps[s].gap = True
            if st.last_seq is None or rec.seq > st.last_seq:
                st.last_seq, st.last_step = rec.seq, rec.step
            if isinstance(rec, StepBegin):
                d = st.steps[rec.step] = StepDigest(rec.step, rec.mono_ns)
                if rec.launch is not None:
                    d.launches.append(_launch(rec.launch.role, rec.launch.key, rec.launch.manifest_hash))
                continue
            d_ = st.steps.get(rec.step)
            if d_ is None:
                continue  # its begin was not read (before the reader started, or lost): not compared
            if isinstance(rec, StepEnd):
                d_.ended_ns, d_.ok = rec.mono_ns, rec.ok
            elif isinstance(rec, Launch):
                d_.launches.append(_launch(rec.role, rec.key, rec.manifest_hash))
            else:
                d_.eager[rec.group] += 1
                d_.shapes[rec.group] = _shape_crc(rec, d_.shapes.get(rec.group, 0))
        if len(st.steps) > KEEP_STEPS:
            for s in sorted(st.steps)[: len(st.steps) - KEEP_STEPS]:
                del st.steps[s]

    def digests(self, since: int = 0) -> dict[int, list[dict[str, Any]]]:
        """Each rank's step digests from step ``since`` on (for a coordinator comparing the ranks of
        several nodes)."""
        return {r: [d.to_json() for s, d in sorted(st.steps.items()) if s >= since] for r, st in self._ranks.items()}

    def merge(self, rank: int, digests: list[dict[str, Any]]) -> None:
        """Digests of a rank another agent read (replacing what this monitor held for those steps)."""
        st = self._ranks.setdefault(rank, _RankState())
        for raw in digests:
            d = StepDigest.from_json(raw)
            st.steps[d.step] = d
        if len(st.steps) > KEEP_STEPS:
            for s in sorted(st.steps)[: len(st.steps) - KEEP_STEPS]:
                del st.steps[s]

    @property
    def reported(self) -> bool:
        return self._fired

    def mark_reported(self) -> None:
        """Someone else (a member agent) already reported these ranks out of step."""
        self._fired = True

    def check(self, now_ns: int) -> Disagreement | None:
        """The first disagreement, once; None while the ranks agree (or after it was reported)."""
        if self._fired and self._lagging is not None:
            self._caught_up(self._lagging)
        if self._fired or len(self._ranks) < 2:
            return None
        found = self._first(now_ns)
        if found is not None:
            self._fired = True
            self._lagging = found if found.lag_s else None
        return found

    def _caught_up(self, lag: Disagreement) -> None:
        """Re-arm once every rank reported lagging has ended ``lag.step`` (or begun a later one), with
        the grace widened to the lag it took them."""
        ends: list[int] = []
        for r in lag.ranks:
            st = self._ranks.get(r)
            d = None if st is None else st.steps.get(lag.step)
            if d is not None and d.ended_ns is not None:
                ends.append(d.ended_ns)
            elif st is None or st.last_step is None or st.last_step <= lag.step:
                return
        peers = [
            st.steps[lag.step].ended_ns
            for r, st in self._ranks.items()
            if r not in lag.ranks and lag.step in st.steps and st.steps[lag.step].ended_ns is not None
        ]
        took = max(lag.lag_s, (max(ends) - max(p for p in peers if p is not None)) / 1e9 if ends and peers else 0.0)
        self.grace_s = min(self.max_grace_s, max(self.grace_s, 1.5 * took))
        self._fired, self._lagging = False, None

    def _first(self, now_ns: int) -> Disagreement | None:
        steps = sorted({s for st in self._ranks.values() for s in st.steps if s > self._settled - 8})
        for step in steps:
            have = {r: st.steps[step] for r, st in self._ranks.items() if step in st.steps}
            if len(have) < 2 or any(d.gap or (d.ended_ns is not None and not d.ok) for d in have.values()):
                continue
            done = {r: d for r, d in have.items() if d.ended_ns is not None}
            if not done:
                continue
            state = (len(have), len(done), sum(len(d.launches) + sum(d.eager.values()) for d in have.values()))
            if self._checked.get(step) == hash(state) and len(done) == len(have):
                continue
            self._checked[step] = hash(state)
            found = self._compare(step, have, done, now_ns)
            if found is not None:
                return found
            if len(done) == len(have) == len(self._ranks):
                self._settled = max(self._settled, step)
        if len(self._checked) > 4 * KEEP_STEPS:
            for s in sorted(self._checked)[: 2 * KEEP_STEPS]:
                del self._checked[s]
        return None

    def _compare(
        self, step: int, have: dict[int, StepDigest], done: dict[int, StepDigest], now_ns: int
    ) -> Disagreement | None:
        ref_rank = min(done)
        ref = done[ref_rank]
        for r, d in sorted(have.items()):
            if r == ref_rank:
                continue
            finished = d.ended_ns is not None
            n = len(d.launches) if not finished else max(len(d.launches), len(ref.launches))
            for i in range(n):
                a = ref.launches[i] if i < len(ref.launches) else None
                b = d.launches[i] if i < len(d.launches) else None
                if a is None or b is None or not _same_launch(a, b):
                    return Disagreement(
                        step, (ref_rank, r), f"launch #{i}: rank {ref_rank} {_what(a)}, rank {r} {_what(b)}"
                    )
            for group in sorted(set(ref.eager) | set(d.eager)):
                mine, theirs = ref.eager[group], d.eager[group]
                if (finished and mine != theirs) or (not finished and theirs > mine):
                    return Disagreement(
                        step,
                        (ref_rank, r),
                        f"eager collectives in group {group}: rank {ref_rank} {mine}, "
                        f"rank {r} {theirs}{'' if finished else ' so far'}",
                    )
                # A digest merged from an agent of an older version has no shapes: counts only.
                crc_a, crc_b = ref.shapes.get(group), d.shapes.get(group)
                if finished and crc_a is not None and crc_b is not None and crc_a != crc_b:
                    return Disagreement(
                        step,
                        (ref_rank, r),
                        f"eager collectives in group {group}: rank {ref_rank} and rank {r} issued {mine} each, "
                        "with different ops or sizes",
                    )
        left = tuple(r for r in sorted(have) if r not in done)
        if left and 2 * len(left) < len(have):
            last_end = max(d.ended_ns for d in done.values() if d.ended_ns is not None)
            lag = (now_ns - last_end) / 1e9
            if lag > self.grace_s:
                names = ", ".join(map(str, left))
                return Disagreement(
                    step, left, f"rank {names} still inside step {step} {lag:.1f} s after its peers finished it", lag
                )
        return None
