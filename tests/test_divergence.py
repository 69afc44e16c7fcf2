"""Ranks out of step, caught as their steps complete (watchdog.divergence through the real Watcher):
real ledger files written by the real Recorder, tailed by the real reader."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from collectors.format import CollectiveOp, CUDAGraphMode, GraphKey, ProcessKind, Role
from collectors.recorder import Recorder
from watchdog.divergence import DivergenceMonitor
from watchdog.snapshot import Sources
from watchdog.watcher import Watcher

FULL32 = GraphKey(CUDAGraphMode.FULL, 32, 16, uniform=True)
PW40 = GraphKey(CUDAGraphMode.PIECEWISE, 40)
PW24 = GraphKey(CUDAGraphMode.PIECEWISE, 24)
EAGER = GraphKey(CUDAGraphMode.NONE, 300)
OPS = [CollectiveOp("all_reduce", "tp", "float32", 4096)] * 3


class Ranks:
    """``world`` recorders writing one TP group's ledgers, and a Watcher over them."""

    def __init__(self, tmp: Path, world: int, slots: int = 4096) -> None:
        self.recs = [
            Recorder(tmp, kind=ProcessKind.WORKER, rank=r, world_size=world, n_slots=slots) for r in range(world)
        ]
        self.hashes = {}
        for rec in self.recs:
            for role, key in ((Role.MODEL, FULL32), (Role.DRAFTER, PW40), (Role.DRAFTER, PW24)):
                self.hashes[(role, key)] = rec.manifest(role, key, OPS)
        self.watcher = Watcher(tmp, tmp / "incidents", Sources(stacks=None, procs=None), divergence_grace_s=0.5)

    def step(
        self,
        rank: int,
        step: int,
        *,
        key: GraphKey = FULL32,
        drafter: GraphKey | None = PW40,
        eager: int = 0,
        end: bool = True,
        ok: bool = True,
    ) -> None:
        rec = self.recs[rank]
        graph = key.mode is not CUDAGraphMode.NONE
        manifest = self.hashes[(Role.MODEL, key)] if graph else 0
        rec.step_begin(
            step, key, unpadded_tokens=30, unpadded_reqs=15, padded_reqs=1, placeholders=15, launch_manifest=manifest
        )
        for _ in range(eager):
            rec.collective(step, "tp", "all_reduce", "float32", 4096)
        if drafter is not None:
            rec.launch(step, Role.DRAFTER, drafter, self.hashes[(Role.DRAFTER, drafter)])
        if end:
            rec.step_end(step, ok)

    def all(self, step: int, **kw: object) -> None:
        for r in range(len(self.recs)):
            self.step(r, step, **kw)  # type: ignore[arg-type]

    def poll(self) -> object:
        return self.watcher.poll()

    def close(self) -> None:
        self.watcher.close()
        for rec in self.recs:
            rec.close()


@pytest.fixture
def ranks(tmp_path: Path) -> Ranks:
    return Ranks(tmp_path, 3)


def test_healthy_steps_of_every_kind_raise_nothing(ranks: Ranks) -> None:
    for s in range(50):
        if s % 7 == 3:
            ranks.all(s, key=EAGER, drafter=None, eager=4)
        else:
            ranks.all(s, drafter=PW40 if s % 2 else PW24)
        assert ranks.poll() is None
    ranks.close()


@pytest.mark.parametrize("culprit", [0, 1, 2])
def test_a_rank_skipping_an_eager_collective_is_caught_at_that_step(ranks: Ranks, culprit: int) -> None:
    for s in range(5):
        ranks.all(s)
    assert ranks.poll() is None
    for r in range(3):
        ranks.step(r, 5, key=EAGER, drafter=None, eager=3 if r == culprit else 4)
    stall = ranks.poll()
    assert stall is not None and stall.kind == "divergence" and stall.step == 5
    assert ranks.poll() is None  # reported once
    ranks.close()


def test_a_peer_that_already_issued_more_than_a_finished_rank_is_caught_before_it_ends(ranks: Ranks) -> None:
    ranks.all(0)
    ranks.step(0, 1, key=EAGER, drafter=None, eager=3)
    ranks.step(1, 1, key=EAGER, drafter=None, eager=3)
    ranks.step(2, 1, key=EAGER, drafter=None, eager=4, end=False)  # waits in its 4th all-reduce forever
    stall = ranks.poll()
    assert stall is not None and stall.kind == "divergence" and stall.step == 1
    ranks.close()


@pytest.mark.parametrize("culprit", [0, 2])
def test_a_different_drafter_graph_is_caught(ranks: Ranks, culprit: int) -> None:
    ranks.all(0)
    for r in range(3):
        ranks.step(r, 1, drafter=PW24 if r == culprit else PW40)
    stall = ranks.poll()
    assert stall is not None and stall.kind == "divergence" and stall.step == 1
    ranks.close()


def test_a_rank_not_there_yet_and_a_failed_step_are_not_divergences(ranks: Ranks) -> None:
    ranks.all(0)
    ranks.step(0, 1, eager=0)
    ranks.step(1, 1, eager=0)  # rank 2 has not read step 1 yet
    assert ranks.poll() is None
    ranks.step(2, 1, eager=0)
    # A step that failed on one rank stopped early there: its counts prove nothing.
    ranks.step(0, 2, key=EAGER, drafter=None, eager=4)
    ranks.step(1, 2, key=EAGER, drafter=None, eager=1, ok=False)
    ranks.step(2, 2, key=EAGER, drafter=None, eager=4)
    assert ranks.poll() is None
    ranks.close()


def test_a_rank_left_inside_a_step_is_caught_after_the_grace(ranks: Ranks) -> None:
    ranks.all(0)
    ranks.step(0, 1)
    ranks.step(1, 1)
    ranks.step(2, 1, end=False)
    assert ranks.poll() is None  # within the grace
    time.sleep(0.7)
    stall = ranks.poll()
    assert stall is not None and stall.kind == "divergence" and stall.step == 1 and stall.age_s > 0.5
    ranks.close()


def test_ring_wrap_past_the_reader_loses_steps_without_a_false_alarm(tmp_path: Path) -> None:
    ranks = Ranks(tmp_path, 2, slots=64)
    ranks.all(0)
    assert ranks.poll() is None
    # Rank 1 writes far more than its ring holds before the next poll: its early steps are gone.
    for s in range(1, 200):
        ranks.step(1, s, key=EAGER, drafter=None, eager=2)
        ranks.step(0, s, key=EAGER, drafter=None, eager=2)
        if s % 100 == 0:
            assert ranks.poll() is None
    assert ranks.poll() is None
    ranks.close()


def test_a_restarted_rank_rearms_the_monitor() -> None:
    mon = DivergenceMonitor(grace_s=1.0)
    mon.forget_rank(3)  # unknown rank: nothing to forget, nothing raised
    assert mon.check(0) is None


class _Direct:
    """The HTTP edge replaced by a direct call of each member agent's status (the transport is not what
    is tested here: tests/test_multinode.py runs the real one)."""

    def __init__(self, agents: dict[str, object]) -> None:
        self.agents = agents

    def __call__(self, url: str, timeout_s: float) -> object:
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(url)
        agent = self.agents[f"{parts.scheme}://{parts.netloc}"]
        since = parse_qs(parts.query).get("digests_since", [None])[0]
        return agent.status(None if since is None else int(since))  # type: ignore[attr-defined]


@pytest.mark.parametrize("culprit", [0, 1])
def test_the_coordinator_compares_ranks_that_live_on_different_nodes(tmp_path: Path, culprit: int) -> None:
    from watchdog.agent import Agent
    from watchdog.coordinator import Coordinator
    from watchdog.metrics import AgentMetrics

    ranks = Ranks(tmp_path, 2)
    members = {
        f"http://node{r}": Agent(
            Watcher(tmp_path, tmp_path / f"inc{r}", Sources(stacks=None, procs=None), ranks=frozenset({r})),
            AgentMetrics("tp0"),
            role="member",
        )
        for r in (0, 1)
    }
    coord = Coordinator(list(members), tmp_path / "inc-c")
    coord._get = _Direct(members)  # type: ignore[method-assign]
    for s in range(30):
        ranks.all(s, key=EAGER, drafter=None, eager=2)
        for m in members.values():
            assert m.step() is None  # each member sees one rank: nothing to compare locally
        assert coord.poll() is None
    for r in (0, 1):
        ranks.step(r, 30, key=EAGER, drafter=None, eager=1 if r == culprit else 2)
    for m in members.values():
        m.step()
    stall = coord.poll()
    assert stall is not None and stall.kind == "divergence" and stall.step == 30
    ranks.close()
    for m in members.values():
        m.loop.close()


@pytest.mark.parametrize("culprit", [0, 1, 2])
def test_a_different_key_with_same_shaped_collectives_is_a_divergence_to_the_analyzer(
    tmp_path: Path, culprit: int
) -> None:
    """Both drafter graphs hold the same collectives here: only the keys tell the ranks apart."""
    from watchdog.analyzer import diagnose
    from watchdog.bundle import load_snapshot

    ranks = Ranks(tmp_path, 3)
    for s in range(5):
        ranks.all(s)
    for r in range(3):
        ranks.step(r, 5, drafter=PW24 if r == culprit else PW40)
    ranks.all(6)
    d = diagnose(load_snapshot(tmp_path))
    assert d.verdict.value == "collective_mismatch", d.summary
    assert d.step == 5 and d.culprit_ranks == (culprit,)
    assert d.first_divergence is not None and d.first_divergence.index == len(OPS)  # after the model graph's
    assert d.first_divergence.sources[culprit] == "drafter launch PIECEWISE(tokens=24)"
    ranks.close()


@pytest.mark.parametrize("culprit", [0, 1, 2])
def test_an_eager_collective_of_another_size_is_caught_when_the_step_completes(ranks: Ranks, culprit: int) -> None:
    """Same count, one rank's all-gather a shard short (a size mismatch that did not hang): caught as
    soon as every rank completed the step, whichever rank it is."""
    for s in range(5):
        ranks.all(s, key=EAGER, drafter=None, eager=2)
    assert ranks.poll() is None
    for r, rec in enumerate(ranks.recs):
        rec.step_begin(5, EAGER, unpadded_tokens=30, unpadded_reqs=15, padded_reqs=1, placeholders=15)
        rec.collective(5, "tp", "all_reduce", "float32", 4096)
        rec.collective(5, "tp", "all_gather", "float32", 4095 if r == culprit else 4096)
        rec.step_end(5, True)
    stall = ranks.poll()
    assert stall is not None and stall.kind == "divergence" and stall.step == 5
    ranks.close()


def test_variable_size_gathers_differ_by_design_and_raise_nothing(ranks: Ranks) -> None:
    for s in range(6):
        for r, rec in enumerate(ranks.recs):
            rec.step_begin(s, EAGER, unpadded_tokens=30, unpadded_reqs=15, padded_reqs=1, placeholders=15)
            rec.collective(s, "dp", "all_gatherv", "bfloat16", 1024 * (r + 1) + s)
            rec.collective(s, "dp", "reduce_scatterv", "bfloat16", 512 * (r + 2))
            rec.step_end(s, True)
        assert ranks.poll() is None
    ranks.close()


def test_the_reason_names_the_group_and_a_size_difference() -> None:
    from collectors.format import Collective, StepBegin, StepEnd

    mon = DivergenceMonitor()
    for rank, numel in ((0, 4096), (1, 4095)):
        mon.observe(rank, [
            StepBegin(1, 7, 10, EAGER, 30, 15, 1, 15, None),
            Collective(2, 7, 11, "tp", "all_gather", "float32", numel, 0),
            StepEnd(3, 7, 12, True),
        ])  # fmt: skip
    found = mon.check(13)
    assert found is not None and found.step == 7 and found.ranks == (0, 1)
    assert "group tp" in found.reason and "sizes" in found.reason


def _step(mon: DivergenceMonitor, rank: int, step: int, begin_ns: int, end_ns: int | None, eager: int = 1) -> None:
    from collectors.format import Collective, StepBegin, StepEnd

    # one slot per record, numbered without gaps as a writer does (a jump would mark the step unread)
    st = mon._ranks.get(rank)
    seq = 1 if st is None or st.last_seq is None else st.last_seq + 1
    recs: list[object] = []
    if st is None or step not in st.steps:
        recs.append(StepBegin(seq, step, begin_ns, EAGER, 30, 15, 1, 15, None))
        recs += [Collective(seq + 1 + i, step, begin_ns, "tp", "all_reduce", "float32", 4096, i) for i in range(eager)]
    if end_ns is not None:
        recs.append(StepEnd(seq + len(recs), step, end_ns, True))
    mon.observe(rank, recs)  # type: ignore[arg-type]


def test_a_slow_rank_that_catches_up_re_arms_the_monitor_with_a_wider_grace() -> None:
    """(Three ranks: with two, neither is a minority left behind.) A rank seen lagging, that then
    finishes the step with the same content, was slow: the monitor
    reports it once, re-arms, no longer calls a lag of that size out, and still catches a real
    divergence later."""
    s = 1_000_000_000
    mon = DivergenceMonitor(grace_s=2.0)
    for r in (0, 2):
        _step(mon, r, 1, 0, 1 * s)
    _step(mon, 1, 1, 0, None)
    assert mon.check(2 * s) is None  # within the grace
    lag = mon.check(int(3.5 * s))
    assert lag is not None and lag.ranks == (1,) and lag.lag_s == pytest.approx(2.5)
    _step(mon, 1, 1, 0, 5 * s)  # it finishes, 4 s after its peer
    assert mon.check(6 * s) is None and mon.grace_s == pytest.approx(6.0)
    for r in (0, 2):
        _step(mon, r, 2, 6 * s, 7 * s)
    _step(mon, 1, 2, 6 * s, None)
    assert mon.check(int(10 * s)) is None  # 3 s behind: inside the widened grace
    _step(mon, 1, 2, 6 * s, 10 * s)
    for r in (0, 2):
        _step(mon, r, 3, 11 * s, 12 * s, eager=2)
    _step(mon, 1, 3, 11 * s, 12 * s, eager=1)
    found = mon.check(13 * s)
    assert found is not None and found.step == 3 and found.lag_s == 0 and "eager collectives" in found.reason
    assert mon.check(14 * s) is None  # a divergence in content: once


def test_the_widened_grace_is_bounded() -> None:
    s = 1_000_000_000
    mon = DivergenceMonitor(grace_s=2.0, max_grace_s=5.0)
    for r in (0, 2):
        _step(mon, r, 1, 0, 1 * s)
    _step(mon, 1, 1, 0, None)
    assert mon.check(4 * s) is not None
    _step(mon, 1, 1, 0, 60 * s)
    assert mon.check(61 * s) is None and mon.grace_s == 5.0
