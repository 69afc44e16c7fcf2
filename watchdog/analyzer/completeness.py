"""Is the evidence complete and plausible enough to blame anyone? Pure.

A verdict that names a culprit compares ranks; with one rank's evidence missing or damaged the
comparison is between the ranks that happen to be left, and "all 1 ranks agree" is not a fact
about a TP=2 deployment. So the analyzer first works out how many ranks there are, from every
source that states it, and which of them it can actually read. Ring slots carry no checksum
(format.py explains why), so a flipped bit in a record's body passes the reader; the
plausibility check here catches the damage that shows (a step number that does not fit between
its neighbours'), and a ledger with any such damage is distrusted as a whole, since the same
flips may have hit fields that cannot be checked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from collectors.format import EngineQueue, Ledger, Record
from watchdog.types import Snapshot

# More ranks than any TP group has: a larger world size in a header is damage or a crafted file.
MAX_WORLD = 4096
# How far a step number may run ahead of the ring position: each step writes at least one record
# (its begin), so steps advance no faster than slots; the slack covers records a tail left out.
STEP_SLACK = 64
# A later record may name a slightly earlier step (an in-place part placed by its time).
STEP_BACK = 2
NEIGHBOURS = 3
# Slots a sound ledger may still fail to read: the one the writer is overwriting at the ring's
# wrap point, one torn by a kill, one per writer thread caught mid-write by a live read.
TORN_TOLERANCE = 4
# What the reader says about a meta area whose checksums failed (its manifests are then partial).
META_DAMAGE = ("meta area damaged", "not a JSON object", "unreadable capture manifest")


def _fits(a: Record, b: Record) -> bool:
    """``b`` comes after ``a`` in ring order: can both step numbers be true?"""
    assert not isinstance(a, EngineQueue) and not isinstance(b, EngineQueue)
    d = b.step - a.step
    return -STEP_BACK <= d <= abs(b.seq - a.seq) + STEP_SLACK


def implausible(records: Sequence[Record]) -> list[int]:
    """Indexes of records whose step number contradicts most of their neighbours' (damage)."""
    stepped = [i for i, r in enumerate(records) if not isinstance(r, EngineQueue)]
    bad: list[int] = []
    for pos, i in enumerate(stepped):
        rec = records[i]
        if not 0 <= rec.step < 1 << 53:  # type: ignore[union-attr]
            bad.append(i)
            continue
        before = stepped[max(0, pos - NEIGHBOURS) : pos]
        after = stepped[pos + 1 : pos + 1 + NEIGHBOURS]
        votes = sum(_fits(records[j], rec) for j in before) + sum(_fits(rec, records[j]) for j in after)
        if 2 * votes < len(before) + len(after):
            bad.append(i)
    return bad


def damage(ledger: Ledger, implausible_records: int) -> str | None:
    """Why this ledger cannot be trusted as a whole, or None."""
    why = []
    if implausible_records:
        why.append(f"{implausible_records} records with impossible step numbers")
    if ledger.skipped > TORN_TOLERANCE:
        why.append(f"{ledger.skipped} unreadable slots")
    if any(m in p for p in ledger.problems for m in META_DAMAGE):
        why.append("meta area (capture manifests) damaged")
    return "ledger damaged (" + ", ".join(why) + "), not trusted" if why else None


_DIM = re.compile(r"_(DP|PP|PCP|TP|DCP|EP)(\d+)")


def tp_shown(workers: Mapping[int, str]) -> tuple[int, int, str] | None:
    """The TP size vLLM's worker titles show at least (``watchdog.evidence.titles``): the highest TP
    index + 1 (no ``_TP`` part: TP=1), with the pid and title that show it; None without titles.
    A lower bound only: a rank whose process is gone has no title."""
    best: tuple[int, int, str] | None = None
    for pid, name in sorted(workers.items()):
        tp = next((int(n) for dim, n in _DIM.findall(name) if dim == "TP"), 0)
        if tp < MAX_WORLD and (best is None or tp + 1 > best[0]):
            best = (tp + 1, pid, name)
    return best


@dataclass(frozen=True)
class Completeness:
    world: int | None  # None: no source states it (or the sources disagree)
    readable: frozenset[int]  # ranks whose ledger was read and looks intact
    missing: tuple[str, ...]  # one line per rank (or source) that keeps the set incomplete

    @property
    def complete(self) -> bool:
        return not self.missing


def completeness(snapshot: Snapshot, damaged: dict[int, str | None]) -> Completeness:
    """``damaged``: per rank, why its ledger is not trusted (``damage``), or None."""
    stated: dict[str, int] = {}
    if snapshot.engine is not None and snapshot.engine.ledger is not None:
        stated["engine ledger"] = snapshot.engine.ledger.header.world_size
    for rank, ev in sorted(snapshot.ranks.items()):
        if ev.ledger is not None:
            stated[f"rank {rank}'s ledger"] = ev.ledger.header.world_size
    missing: list[str] = []
    sizes = set(stated.values())
    world: int | None = None
    if not sizes:
        missing.append("world size: no ledger states it")
    elif len(sizes) > 1:
        missing.append("world size: the ledgers disagree (" + ", ".join(f"{k} {v}" for k, v in stated.items()) + ")")
    else:
        world = sizes.pop()
        if not 1 <= world <= MAX_WORLD:
            missing.append(f"world size {world}: not a plausible TP size")
            world = None
    readable = frozenset(
        r for r, ev in snapshot.ranks.items() if ev.ledger is not None and not damaged.get(r) and r >= 0
    )
    missing.extend(f"rank {rank}: {why}" for rank, why in sorted(damaged.items()) if why)
    shown = tp_shown(snapshot.workers)
    if shown is not None:
        size, pid, name = shown
        if world is not None and size > world:
            missing.append(
                f"world size: the ledgers state {world}, but the deployment's processes include {name} "
                f"(pid {pid}): at least {size} ranks"
            )
            world = size
        elif world is None:  # missing[0] says why no size was taken from the ledgers
            missing[0] += f"; the deployment's processes show at least {size} ranks"
    if world is not None:
        absent = [r for r in range(world) if r not in snapshot.ranks]
        missing.extend(f"rank {r}: no readable ledger" for r in absent[:8])
        if len(absent) > 8:
            missing.append(f"... and {len(absent) - 8} more ranks without a readable ledger")
        missing.extend(f"rank {r}: outside world size {world}" for r in sorted(snapshot.ranks) if not 0 <= r < world)
    return Completeness(world, readable, tuple(missing))
