"""The vLLM plugin's own logic, without vLLM: state machine, translations, never-raise contract.

The hooks against real vLLM classes are proven in test_vllm_contract.py / test_vllm_dispatch.py /
test_vllm_rings.py (they need the vLLM environments that tests/vllm_envs.py builds).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from collectors.format import Collective as CollectiveRec
from collectors.format import CollectiveOp, CUDAGraphMode, GraphKey, Launch, Role, StepBegin, StepEnd
from collectors.reader import read_ledger
from collectors.vllm import register
from collectors.vllm import state as st
from collectors.vllm.hooks import COLLECTIVE_OPS, TARGETS, Hook, Target, _wrap


def _worker(tmp_path: Path) -> st.WorkerState:
    p = st.ProcessState()
    os.environ[st.ENV_LEDGER_DIR] = str(tmp_path)
    try:
        ws = p.worker(lambda: (1, 2, st.dispatch_config("FULL_AND_PIECEWISE", [8, 2, 4], 2, 1)))
    finally:
        del os.environ[st.ENV_LEDGER_DIR]
    assert ws is not None
    return ws


def test_descriptor_translation() -> None:
    mode = SimpleNamespace(name="FULL")
    desc = SimpleNamespace(num_tokens=32, num_reqs=16, uniform=True, has_lora=False, num_active_loras=0)
    key = st.key_from_descriptor(mode, desc)
    assert key == GraphKey(CUDAGraphMode.FULL, 32, 16, uniform=True)
    assert st.padded_slots(key, 15) == 1
    assert st.padded_slots(GraphKey(CUDAGraphMode.PIECEWISE, 32), 15) == 0
    v2 = SimpleNamespace(cg_mode=SimpleNamespace(name="PIECEWISE"), num_tokens=48, num_reqs=None, num_active_loras=2)
    assert st.key_from_execution_descriptor(v2) == GraphKey(
        CUDAGraphMode.PIECEWISE, 48, None, uniform=False, has_lora=True, num_active_loras=2
    )
    with pytest.raises(KeyError):
        st.mode_of(SimpleNamespace(name="FULL_AND_PIECEWISE"))  # not a runtime mode


def test_engine_batch_counts_shapes_only() -> None:
    out = SimpleNamespace(
        num_scheduled_tokens={"a": 2, "b": 2, "c": 30},
        scheduled_spec_decode_tokens={"a": [-1], "b": [-1]},
        total_num_scheduled_tokens=34,
    )
    b = st.engine_batch(out)
    assert (b.total_tokens, b.num_reqs, b.num_decode_reqs, b.placeholders) == (34, 3, 2, 2)
    assert (b.max_query_len, b.min_query_len) == (30, 2)


def test_steps_capture_and_collectives_reach_the_ledger(tmp_path: Path) -> None:
    ws = _worker(tmp_path)
    full = GraphKey(CUDAGraphMode.FULL, 32, 16, uniform=True)
    pw = GraphKey(CUDAGraphMode.PIECEWISE, 32)
    ar = CollectiveOp("all_reduce", "tp", "bfloat16", 4096)
    # capture: warm-up collectives (not capturing) are dropped, captured ones go to the current key
    ws.begin_capture()
    ws.dispatched(Role.MODEL, full, 0, 0, 0)
    ws.collective(ar, lambda: False)
    ws.collective(ar, lambda: True)
    ws.collective(ar, lambda: True)
    ws.dispatched(Role.DRAFTER, pw, 0, 0, 0)
    ws.collective(ar, lambda: True)
    ws.end_capture()
    # a dummy run outside a step records nothing
    ws.dispatched(Role.MODEL, full, 30, 15, 15)
    # step 0: FULL replay with a padded slot, drafter PIECEWISE; step 1: eager with two collectives
    ws.next_step()
    ws.placeholders = 15
    ws.dispatched(Role.MODEL, full, 30, 15, ws.placeholders)
    ws.dispatched(Role.DRAFTER, pw, 30, 0, 0)
    ws.end_step(True)
    ws.end_step(True)  # execute_model returned output and sample_tokens ran: one end
    ws.next_step()
    eager = GraphKey(CUDAGraphMode.NONE, 300)
    ws.dispatched(Role.MODEL, eager, 300, 3, 0)
    ws.collective(ar, lambda: False)
    ws.collective(ar, lambda: False)
    ws.end_step(False)
    ws.rec.close()

    ledger = read_ledger(tmp_path / "rank001.ledger")
    assert ledger.header.world_size == 2
    assert ledger.config["cudagraph_mode"] == "FULL_AND_PIECEWISE"
    assert ledger.config["capture_sizes"] == [2, 4, 8]
    manifests = {(m.role, m.key): m.collectives for m in ledger.manifests.values()}
    assert manifests == {(Role.MODEL, full): (ar, ar), (Role.DRAFTER, pw): (ar,)}
    recs = ledger.records
    begins = [r for r in recs if isinstance(r, StepBegin)]
    assert [(b.step, b.key, b.unpadded_reqs, b.padded_reqs, b.placeholders) for b in begins] == [
        (0, full, 15, 1, 15),
        (1, eager, 3, 0, 0),
    ]
    launches = [(r.step, r.role, r.key, r.manifest_hash) for r in recs if isinstance(r, Launch)]
    by_key = {m.key: m.hash for m in ledger.manifests.values()}
    assert launches == [
        (0, Role.MODEL, full, by_key[full]),
        (0, Role.DRAFTER, pw, by_key[pw]),
        (1, Role.MODEL, eager, 0),
    ]
    assert [(c.step, c.group_seq) for c in recs if isinstance(c, CollectiveRec)] == [(1, 0), (1, 1)]
    assert [(e.step, e.ok) for e in recs if isinstance(e, StepEnd)] == [(0, True), (1, False)]


def test_no_ledger_dir_means_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(st.ENV_LEDGER_DIR, raising=False)
    p = st.ProcessState()
    called: list[int] = []
    assert p.worker(lambda: (called.append(1), (0, 1, {}))[1]) is None  # type: ignore[func-returns-value]
    assert called == []
    register()  # no directory: installs nothing, raises nothing
    assert p.engine(lambda: 2) is None


def test_forked_child_gets_its_own_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(st.ENV_LEDGER_DIR, str(tmp_path))
    p = st.ProcessState()
    ws = p.worker(lambda: (0, 2, {}))
    assert ws is not None and p.current_worker() is ws
    monkeypatch.setattr(os, "getpid", lambda: 999_999_999)  # as seen from a forked child
    assert p.current_worker() is None
    child = p.worker(lambda: (1, 2, {}))
    assert child is not None and child is not ws and child.rec.path.name == "rank001.ledger"


def test_failing_describe_disables_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    monkeypatch.setenv(st.ENV_LEDGER_DIR, str(tmp_path))
    p = st.ProcessState()
    calls: list[int] = []

    def describe() -> tuple[int, int, dict[str, Any]]:
        calls.append(1)
        raise RuntimeError("TP group is not initialized")

    with caplog.at_level(logging.WARNING, logger="watchdog.vllm"):
        assert p.worker(describe) is None
        assert p.worker(describe) is None
    assert calls == [1]
    assert len(caplog.records) == 1 and "TP rank" in caplog.records[0].getMessage()


class _Victim:
    def method(self, x: int) -> int:
        if x < 0:
            raise ValueError("from vLLM itself")
        return x * 2


def test_wrapper_failure_disables_hook_with_one_warning(caplog: Any) -> None:
    target = Target(__name__, "_Victim.method", ("x",), "test")
    seen: list[Hook] = []

    def make(hook: Hook, orig: Any) -> Any:
        seen.append(hook)

        def wrapper(self: Any, x: int) -> Any:
            if hook.on:
                try:
                    raise OSError("disk full")
                except Exception as exc:
                    hook.fail(exc)
            return orig(self, x)

        return wrapper

    original = _Victim.method
    try:
        _wrap(target, make)
        _wrap(target, make)  # plugins load more than once: wrapped once
        assert len(seen) == 1
        with caplog.at_level(logging.WARNING, logger="watchdog.vllm"):
            assert _Victim().method(3) == 6
            assert _Victim().method(4) == 8
        assert not seen[0].on
        assert [r.getMessage().count("disabled") for r in caplog.records] == [1]
        with pytest.raises(ValueError, match="from vLLM itself"):
            _Victim().method(-1)  # vLLM's own exceptions pass through untouched
    finally:
        _Victim.method = original  # type: ignore[method-assign]


def test_every_collective_method_is_a_target() -> None:
    names = {t.qualname for t in TARGETS}
    assert {f"GroupCoordinator.{m}" for m in COLLECTIVE_OPS} <= names
    assert len(names) == len(TARGETS)
