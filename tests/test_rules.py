"""Each analyzer rule on ledgers written by the real Recorder (tests/factory.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from collectors.format import CUDAGraphMode, GraphKey
from watchdog.analyzer import diagnose
from watchdog.types import RankState, RingChunk, RingState, StallInfo, Verdict

from .factory import Deployment


def warm(dep: Deployment, steps: int = 5, reqs: int = 16) -> None:
    for s in range(steps):
        dep.decode_step(s, reqs)


def test_device_hang_every_rank_in_one_kernel_names_the_padded_slot(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    dep.decode_step(5, 15, open_on=[0, 1])
    d = diagnose(dep.snapshot(host={0: "sync", 1: "sync"}, device={0: "kernel", 1: "kernel"}))
    assert d.verdict is Verdict.DEVICE_HANG
    assert d.step == 5
    assert d.culprit_ranks == (0, 1)
    assert all(r.state is RankState.WAITING_DEVICE for r in d.ranks.values())
    assert d.ranks[0].graph_key is not None and d.ranks[0].graph_key.num_tokens == 32
    assert d.ranks[0].padded_reqs == 1
    assert any("padded request slots" in n for n in d.novelty), d.novelty
    assert "sparse_indexer_topk" in d.summary
    assert d.recommendation.action == "restart_safer_mode"
    assert d.recommendation.cudagraph_mode == "FULL_DECODE_ONLY"


def test_graph_key_divergence_referee_names_the_rank_with_the_wrong_drafter_key(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    dep.decode_step(5, 15, open_on=[0], drafter_override={1: 15}, result=False)
    d = diagnose(dep.snapshot(host={0: "sync", 1: "ring"}, device={0: "collective", 1: "idle"}))
    assert d.verdict is Verdict.COLLECTIVE_MISMATCH
    assert d.culprit_ranks == (1,)
    div = d.first_divergence
    assert div is not None and div.step == 5
    assert div.index == 8  # 8 model all-reduces match; the drafter's first one differs
    assert div.per_rank[0] is not None and div.per_rank[0].numel == 32 * 32
    assert div.per_rank[1] is not None and div.per_rank[1].numel == 16 * 32
    assert "engine's batch" in d.summary
    assert d.ranks[0].state is RankState.WAITING_COLLECTIVE
    assert d.ranks[1].state is RankState.IDLE
    assert d.ranks[1].drafter_key is not None and d.ranks[1].drafter_key.num_tokens == 16
    assert d.recommendation.cudagraph_mode == "FULL_DECODE_ONLY"


def test_divergence_without_engine_referee_uses_the_majority(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=3)
    warm(dep)
    dep.decode_step(5, 15, open_on=[0, 2], drafter_override={1: 15}, result=False)
    snap = dep.snapshot(
        host={0: "sync", 1: "ring", 2: "sync"},
        device={0: "collective", 1: "idle", 2: "collective"},
        engine_ledger=False,  # no referee
    )
    d = diagnose(snap)
    assert d.verdict is Verdict.COLLECTIVE_MISMATCH
    assert d.culprit_ranks == (1,)
    assert "minority" in d.summary


def test_rank_skips_eager_collective_at_tp2_progress_names_the_rank_that_left(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=2)
    dep.eager_step(0, 300, 10, 0)
    dep.eager_step(1, 300, 12, 4, skip_last_on=[1], open_on=[0])
    d = diagnose(dep.snapshot(host={0: "sync", 1: "ring"}, device={0: "collective", 1: "idle"}))
    assert d.verdict is Verdict.COLLECTIVE_MISMATCH
    assert d.culprit_ranks == (1,)
    # Same-sized all-reduces: the sequences first cannot match where rank 1 has run out.
    assert d.first_divergence is not None and d.first_divergence.index == 9
    assert d.first_divergence.per_rank[1] is None
    assert "rank 0: 10 so far, rank 1: 9" in " ".join(d.evidence)
    assert d.recommendation.action == "restart"  # eager code: a safer graph mode would not help


def test_host_hang_one_rank_in_host_code_peers_waiting(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    dep.decode_step(5, 16, open_on=[0], not_launched=[1])
    d = diagnose(dep.snapshot(host={0: "sync", 1: "host"}, device={0: "collective", 1: "idle"}))
    assert d.verdict is Verdict.HOST_HANG
    assert d.culprit_ranks == (1,)
    assert d.ranks[1].state is RankState.HOST_BUSY
    assert "_update_step_stats" in " ".join(d.evidence)


def test_host_hang_from_ledgers_alone(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    dep.decode_step(5, 16, open_on=[0], not_launched=[1])
    d = diagnose(dep.snapshot(procs=False))
    assert d.verdict is Verdict.HOST_HANG
    assert d.culprit_ranks == (1,)
    assert any("worker_dead skipped" in m for m in d.missing)


def test_worker_dead(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    dep.decode_step(5, 16, open_on=[0, 1])
    d = diagnose(dep.snapshot(host={0: "sync"}, device={0: "collective"}, dead=[1]))
    assert d.verdict is Verdict.WORKER_DEAD
    assert d.culprit_ranks == (1,)
    assert d.ranks[1].state is RankState.DEAD
    assert d.recommendation.action == "restart"
    assert d.recommendation.cudagraph_mode == "FULL_AND_PIECEWISE"


def test_engine_stall(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    dep.engine_result(4, running=16, waiting=3)
    d = diagnose(
        dep.snapshot(host={0: "ring", 1: "ring"}, engine_host="sched", stall=StallInfo("no_dispatch", None, 5.0, 1.0))
    )
    assert d.verdict is Verdict.ENGINE_STALL
    assert d.culprit_ranks == ()
    assert all(r.state is RankState.IDLE for r in d.ranks.values())
    assert "_rebalance" in " ".join(d.evidence)


def test_finished_run_is_no_deadlock(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    dep.engine_result(4, running=0)
    d = diagnose(dep.snapshot(procs=False))
    assert d.verdict is Verdict.NO_DEADLOCK


@pytest.mark.parametrize(("op", "verdict"), [("all_gather", "collective_mismatch"), ("all_gatherv", "no_deadlock")])
def test_gathers_of_different_sizes_are_a_divergence_unless_variable_by_design(
    tmp_path: Path, op: str, verdict: str
) -> None:
    """An all_gather whose shard differs by a column between ranks diverged; vLLM's all_gatherv takes
    a size per rank, so its sizes differ on a healthy server."""
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    dep.engine_step(5, 16, 16, 16, running=16)
    for r, rec in enumerate(dep.ranks):
        rec.step_begin(5, GraphKey(CUDAGraphMode.NONE, 16), unpadded_tokens=16, unpadded_reqs=16)
        rec.collective(5, "tp", op, "float32", 16 * (4096 - r))
        rec.step_end(5)
    dep.engine_result(5, running=0)
    d = diagnose(dep.snapshot(procs=False))
    assert d.verdict.value == verdict, d.summary
    if op == "all_gather":
        assert d.first_divergence is not None and d.first_divergence.step == 5


def test_pending_requests_post_mortem_is_inconclusive_not_healthy(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    snap = dep.snapshot(procs=False)
    d = diagnose(snap)
    assert d.verdict is Verdict.INCONCLUSIVE
    assert "16 requests" in d.summary


def test_no_ledgers_is_inconclusive(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=2)
    snap = dep.snapshot()
    empty = type(snap)(snap.taken_mono_ns, snap.taken_wall_ns, "", {}, None, missing=("rank 0: no ledger",))
    d = diagnose(empty)
    assert d.verdict is Verdict.INCONCLUSIVE
    assert "rank 0: no ledger" in d.missing


def _ring(name: str, role: str, readers: int, flags: list[tuple[bool, ...]]) -> RingState:
    """A ring's flags as the agent reads them: per chunk (written, read by reader 0, 1, ...)."""
    return RingState(name, role, readers, tuple(RingChunk(f[0], tuple(f[1:])) for f in flags))


def test_the_diagnosis_carries_what_the_rings_say_about_a_stall(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    dep.decode_step(5, 15, open_on=[0], not_launched=[1], result=False)
    snap = dep.snapshot(host={0: "sync", 1: "ring"}, device={0: "collective", 1: "idle"})
    # rank 1 never took step 5's request off the broadcast ring; rank 0 did
    bcast = _ring("psm_b", "broadcast", 2, [(True, True, True), (True, True, False), (False, False, False)])
    replies = [_ring(f"psm_r{r}", "response", 1, [(False, False)]) for r in range(2)]
    d = diagnose(dataclasses.replace(snap, rings=(bcast, *replies)))
    assert d.rings is not None and (d.rings.kind, d.rings.readers) == ("reader_behind", (1,))
    assert f"rings: {d.rings.summary}" in d.evidence
    assert d.to_json()["rings"] == {"kind": "reader_behind", "readers": [1], "ranks": [], "summary": d.rings.summary}
    # no ring read (post-mortem): no ring verdict, and nothing claimed about rings
    d = diagnose(dataclasses.replace(snap, rings=()))
    assert d.rings is None and not any(e.startswith("rings:") for e in d.evidence)
    assert d.to_json()["rings"] is None


def test_a_healthy_server_is_not_reported_from_its_rings(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    dep.engine_result(4, running=0)  # every request finished: nothing pending
    snap = dep.snapshot(host={0: "ring", 1: "ring"}, device={0: "idle", 1: "idle"})
    # every broadcast taken, no reply waiting: also what a healthy step in flight looks like
    bcast = _ring("psm_b", "broadcast", 2, [(True, True, True)])
    d = diagnose(dataclasses.replace(snap, rings=(bcast,)))
    assert d.verdict is Verdict.NO_DEADLOCK
    assert d.rings is not None and d.rings.kind == "awaiting_reply"
    assert not any(e.startswith("rings:") for e in d.evidence)


def _vllm_like_step(dep: Deployment, step: int, skip_on: int | None = None) -> None:
    """An eager step as vLLM's CPU runner issues it: the model's all-reduces (recorded from compiled
    code), then the logits all-gather; ``skip_on``'s model skips its last all-reduce."""
    from collectors.format import CUDAGraphMode, GraphKey, Role

    dep.engine_step(step, 300, 10, 0, running=10)
    key = GraphKey(CUDAGraphMode.NONE, 300)
    for r, rec in enumerate(dep.ranks):
        rec.step_begin(step, key, unpadded_tokens=300, unpadded_reqs=10)
        dep.launch(r, step, Role.MODEL, key, skip_last=r == skip_on)
        rec.collective(step, "tp", "all_gather", "float32", 10 * 512)
        rec.step_end(step)
    dep.engine_result(step, running=10)


def test_a_count_mismatch_with_no_majority_is_decided_by_the_steps_before(tmp_path: Path) -> None:
    """TP=2, both ranks finished the step, one issued an all-reduce fewer: where the sequences part,
    one rank has an all-reduce and the other the all-gather (no rank "finished without" anything), no
    majority, no engine key to referee; every earlier step had the full sequence on both ranks, so the
    rank that departed from it is named (a real vLLM model skipping one all-reduce on one rank)."""
    for culprit in (0, 1):
        dep = Deployment(tmp_path / str(culprit), tp=2, num_spec=0)
        for s in range(4):
            _vllm_like_step(dep, s)
        _vllm_like_step(dep, 4, skip_on=culprit)
        d = diagnose(dep.snapshot(host={0: "ring", 1: "ring"}, device={0: "idle", 1: "idle"}))
        assert d.verdict is Verdict.COLLECTIVE_MISMATCH, d.summary
        assert d.culprit_ranks == (culprit,), d.summary
        assert "steps before it" in d.summary
        div = d.first_divergence
        assert div is not None and {op.op for op in div.per_rank.values() if op} == {"all_reduce", "all_gather"}


def test_history_decides_nothing_without_earlier_steps(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=2, num_spec=0)
    _vllm_like_step(dep, 0, skip_on=0)
    d = diagnose(dep.snapshot(host={0: "ring", 1: "ring"}, device={0: "idle", 1: "idle"}))
    assert d.verdict is Verdict.COLLECTIVE_MISMATCH
    assert "steps before it" not in d.summary and d.culprit_ranks == (0, 1), d.summary


def test_a_device_hang_names_no_single_rank_when_a_peer_device_is_unknown(tmp_path: Path) -> None:
    """Rank 1's device thread could not be read: it may be in the same kernel as rank 0, so the hang
    is everyone's (a culprit is never a guess from partial evidence)."""
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    dep.decode_step(5, 15, open_on=[0, 1])
    d = diagnose(dep.snapshot(host={0: "sync", 1: "sync"}, device={0: "kernel"}))
    assert d.verdict is Verdict.DEVICE_HANG
    assert d.culprit_ranks == (0, 1)


def test_ranks_seen_out_of_step_with_no_divergence_in_the_ledgers_are_not_a_hang(tmp_path: Path) -> None:
    """The monitor declared ranks out of step (no stall); the ledgers read now show every rank inside
    the same step with the same key, waiting in a collective: what a slow, healthy step looks like.
    No hang verdict without a stall: inconclusive, no culprit."""
    dep = Deployment(tmp_path, tp=3)
    warm(dep)
    dep.decode_step(5, 16, open_on=[0, 1, 2])
    stall = StallInfo("divergence", 5, 2.4, 2.0)
    d = diagnose(
        dep.snapshot(host={r: "sync" for r in range(3)}, device={r: "collective" for r in range(3)}, stall=stall)
    )
    assert d.verdict is Verdict.INCONCLUSIVE, d.summary
    assert d.culprit_ranks == () and "no divergence and nothing has stalled" in d.summary
    assert d.recommendation.action != "restart_safer_mode"


def test_a_dispatch_stall_over_before_the_evidence_is_no_deadlock(tmp_path: Path) -> None:
    """The engine held requests and dispatched nothing past the deadline, then went on: when the
    evidence is read it holds none and no rank is inside a step (a slow schedule, not a stall)."""
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    dep.engine_result(4, running=0)
    stall = StallInfo("no_dispatch", None, 1.53, 1.0)
    d = diagnose(dep.snapshot(host={0: "ring", 1: "ring"}, device={0: "idle", 1: "idle"}, stall=stall))
    assert d.verdict is Verdict.NO_DEADLOCK, d.summary
    assert "dispatch stall" in d.summary and d.culprit_ranks == ()


def test_a_lagging_rank_that_finished_the_step_is_a_slow_rank_not_a_divergence(tmp_path: Path) -> None:
    """The monitor saw rank 2 still inside step 5 past its grace after its peers finished it (a rank
    descheduled on a saturated host); by the time the evidence is read it finished step 5 with the same
    keys and collectives: no_deadlock (the agent records it as a recovered stall, not an incident)."""
    dep = Deployment(tmp_path, tp=3)
    warm(dep)
    dep.decode_step(5, 16)
    dep.engine_result(5, running=0)
    stall = StallInfo("divergence", 5, 2.4, 2.0, (2,))
    d = diagnose(dep.snapshot(host={r: "ring" for r in range(3)}, device={r: "idle" for r in range(3)}, stall=stall))
    assert d.verdict is Verdict.NO_DEADLOCK, d.summary
    assert "rank 2" in d.summary and "a slow rank, not a divergence" in d.summary and not d.no_stall_yet


def test_a_lagging_rank_still_inside_the_step_is_never_no_deadlock(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=3)
    warm(dep)
    dep.decode_step(5, 16, open_on=[2])
    stall = StallInfo("divergence", 5, 2.4, 2.0, (2,))
    d = diagnose(
        dep.snapshot(
            host={0: "ring", 1: "ring", 2: "sync"}, device={0: "idle", 1: "idle", 2: "collective"}, stall=stall
        )
    )
    assert d.verdict is not Verdict.NO_DEADLOCK, d.summary
