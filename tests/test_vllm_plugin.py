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
from hypothesis import given, settings
from hypothesis import strategies as st_h

from collectors.format import Collective as CollectiveRec
from collectors.format import CollectiveOp, CUDAGraphMode, GraphKey, Role, StepBegin, StepEnd
from collectors.format import launches as format_launches
from collectors.reader import read_ledger
from collectors.vllm import register
from collectors.vllm import state as st
from collectors.vllm import translate as tr
from collectors.vllm.hooks import COLLECTIVE_OPS, TARGETS, Hook, Target, wrap
from collectors.vllm.install import _wrap


def _worker(tmp_path: Path) -> st.WorkerState:
    p = st.ProcessState()
    os.environ[st.ENV_LEDGER_DIR] = str(tmp_path)
    try:
        ws = p.worker(lambda: (1, 2, tr.dispatch_config("FULL_AND_PIECEWISE", [8, 2, 4], 2, 1)))
    finally:
        del os.environ[st.ENV_LEDGER_DIR]
    assert ws is not None
    return ws


def test_descriptor_translation() -> None:
    mode = SimpleNamespace(name="FULL")
    desc = SimpleNamespace(num_tokens=32, num_reqs=16, uniform=True, has_lora=False, num_active_loras=0)
    key = tr.key_from_descriptor(mode, desc)
    assert key == GraphKey(CUDAGraphMode.FULL, 32, 16, uniform=True)
    assert tr.padded_slots(key, 15) == 1
    assert tr.padded_slots(GraphKey(CUDAGraphMode.PIECEWISE, 32), 15) == 0
    v2 = SimpleNamespace(cg_mode=SimpleNamespace(name="PIECEWISE"), num_tokens=48, num_reqs=None, num_active_loras=2)
    assert tr.key_from_execution_descriptor(v2) == GraphKey(
        CUDAGraphMode.PIECEWISE, 48, None, uniform=False, has_lora=True, num_active_loras=2
    )
    with pytest.raises(KeyError):
        tr.mode_of(SimpleNamespace(name="FULL_AND_PIECEWISE"))  # not a runtime mode


def test_engine_batch_counts_shapes_only() -> None:
    out = SimpleNamespace(
        num_scheduled_tokens={"a": 2, "b": 2, "c": 30},
        scheduled_spec_decode_tokens={"a": [-1], "b": [-1]},
        total_num_scheduled_tokens=34,
    )
    b = tr.engine_batch(out)
    assert (b.total_tokens, b.num_reqs, b.num_decode_reqs, b.placeholders) == (34, 3, 2, 2)
    assert (b.max_query_len, b.min_query_len) == (30, 2)


@settings(max_examples=400, deadline=None)
@given(
    per_req=st_h.dictionaries(st_h.sampled_from("abcdefgh"), st_h.integers(1, 40), max_size=8),
    spec=st_h.dictionaries(st_h.sampled_from("abcdefghij"), st_h.integers(0, 3), max_size=10),
)
def test_engine_batch_counts_what_the_definition_says(per_req: dict[str, int], spec: dict[str, int]) -> None:
    """The C-level counting equals the definition, request by request (drafts listed for requests
    that are not scheduled, or empty draft lists, included even though vLLM never sends them)."""
    drafts = {rid: [-1] * k for rid, k in spec.items()}
    out = SimpleNamespace(
        num_scheduled_tokens=per_req, scheduled_spec_decode_tokens=drafts, total_num_scheduled_tokens=0
    )
    b = tr.engine_batch(out)
    assert b.placeholders == sum(len(drafts.get(rid, ())) for rid in per_req)
    assert b.num_decode_reqs == sum(n == 1 + len(drafts.get(rid, ())) for rid, n in per_req.items())
    assert b.num_reqs == len(per_req)


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
    launches = [(r.step, r.role, r.key, r.manifest_hash) for r in format_launches(recs)]
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


@pytest.mark.timeout(60)
def test_forked_child_gets_its_own_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real fork (vLLM may fork workers after the plugin loaded): the child sees no ledger until
    its own first hook opens one; the parent's is untouched."""
    monkeypatch.setenv(st.ENV_LEDGER_DIR, str(tmp_path))
    p = st.ProcessState()
    ws = p.worker(lambda: (0, 2, {}))
    assert ws is not None and p.current_worker() is ws
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            inherited = p.current_worker()
            child = p.worker(lambda: (1, 2, {}))
            ok = inherited is None and child is not None and child is not ws and child.rec.path.name == "rank001.ledger"
            code = 0 if ok else 2
        finally:
            os.write(w, bytes([code]))
            os._exit(0)
    os.close(w)
    try:
        got = os.read(r, 1)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert got == b"\x00", f"child saw the parent's ledger or could not open its own (code {got!r})"
    assert p.current_worker() is ws  # the parent keeps its own
    assert sorted(f.name for f in tmp_path.iterdir()) == ["rank000.ledger", "rank001.ledger"]


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

        def before(self: Any, x: int) -> None:
            raise OSError("disk full")

        return wrap(hook, orig, ("x",), before=before)

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


def test_wrappers_forward_every_argument_and_give_the_bodies_the_named_ones() -> None:
    default = object()

    def orig(self: Any, a: Any, /, b: Any, c: Any = default, *args: Any, d: Any, e: Any = 5, **kw: Any) -> Any:
        return a, b, c, args, d, e, kw

    calls: list[tuple[Any, ...]] = []
    w = wrap(
        Hook(Target("t", "orig", (), "t")),
        orig,
        ("b", "d"),
        before=lambda self, b, d: calls.append(("before", self, b, d)),
        after=lambda self, b, d, out: calls.append(("after", b, d, out[0])),
    )
    assert w("S", 1, 2, d=4) == (1, 2, default, (), 4, 5, {})  # defaults are the original's objects
    assert w("S", 1, b=2, c=3, d=4, z=9) == (1, 2, 3, (), 4, 5, {"z": 9})
    assert w("S", 1, 2, 3, 7, 8, d=4, e=6) == (1, 2, 3, (7, 8), 4, 6, {})
    assert calls == [("before", "S", 2, 4), ("after", 2, 4, 1)] * 3  # by position or by name alike
    with pytest.raises(TypeError):
        w("S", 1, 2)  # a required argument missing: the original's own error, no body ran
    assert len(calls) == 6
    with pytest.raises(TypeError):
        w("S", a=1, b=2, d=4)  # positional-only stays positional-only, as vLLM would see it

    seen: list[Any] = []
    w1 = wrap(Hook(Target("t", "orig", (), "t")), orig, ("c",), after=lambda self, c, out: seen.append(c))
    assert w1("S", 1, 2, d=0)[2] is default and seen == [default]  # a default the caller left out
    w0 = wrap(Hook(Target("t", "orig", (), "t")), orig, before=lambda self: seen.append(self))
    assert w0("T", 1, 2, d=3) == (1, 2, default, (), 3, 5, {}) and seen[-1] == "T"
    with pytest.raises(ValueError, match="at most two"):
        wrap(Hook(Target("t", "orig", (), "t")), orig, ("b", "c", "d"))


def test_wrappers_pass_exceptions_through_and_switch_off_on_their_own_errors(caplog: Any) -> None:
    boom = RuntimeError("from vLLM")

    def raising(self: Any, x: int) -> Any:
        raise boom

    failed: list[int] = []
    hook = Hook(Target("t", "raising", (), "t"))
    w = wrap(hook, raising, ("x",), failed=lambda self, x: failed.append(x), after=lambda self, x, out: None)
    with pytest.raises(RuntimeError) as info:
        w(None, 7)
    assert info.value is boom and failed == [7] and hook.on

    def bad(self: Any, out: Any) -> None:
        raise ValueError("bug in a body")

    broken = Hook(Target("t", "answer", (), "t"))
    w2 = wrap(broken, lambda self: 42, after=bad)
    with caplog.at_level(logging.WARNING, logger="watchdog.vllm"):
        assert w2(None) == 42 and w2(None) == 42  # vLLM's result either way; the body ran once
    assert not broken.on and "bug in a body" in broken.error
    assert sum("disabled" in r.getMessage() for r in caplog.records) == 1

    with pytest.raises(ValueError, match="num_tokens"):  # a parameter the hook reads is gone: not installed
        wrap(Hook(Target("t", "moved", (), "t")), lambda self, n: n, ("num_tokens",))


def test_every_collective_method_is_a_target() -> None:
    names = {t.qualname for t in TARGETS}
    assert {f"GroupCoordinator.{m}" for m in COLLECTIVE_OPS} <= names
    assert len(names) == len(TARGETS)


# ---- the hook wrappers themselves (the code the plugin installs), around stand-in originals ----------


class _Mode:
    """Stands in for vLLM's CUDAGraphMode member: a singleton with a ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name


_FULL, _PIECEWISE, _NONE = _Mode("FULL"), _Mode("PIECEWISE"), _Mode("NONE")


class _Tensor:
    def __init__(self, numel: int, dtype: str = "torch.bfloat16") -> None:
        self._n, self.dtype = numel, dtype

    def numel(self) -> int:
        return self._n


class _Owner:
    unique_name = "tp:0"

    def __init__(self) -> None:
        self.vllm_config = SimpleNamespace(
            compilation_config=SimpleNamespace(
                cudagraph_mode=SimpleNamespace(name="FULL_AND_PIECEWISE"), cudagraph_capture_sizes=[2, 4, 8, 16, 32]
            ),
            speculative_config=SimpleNamespace(num_speculative_tokens=1),
        )


def test_hook_wrappers_cache_keys_and_pick_up_manifests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys translated before a capture carry its manifest hashes afterwards; eager collectives, capture
    collectives and steps go through the wrappers' fast paths into the same ledger the analyzer reads."""
    from collectors.vllm import worker as wrappers

    monkeypatch.setenv(st.ENV_LEDGER_DIR, str(tmp_path))
    proc = st.ProcessState()
    monkeypatch.setattr(wrappers, "STATE", proc)
    monkeypatch.setattr(wrappers, "_describe", lambda cfg: lambda: (1, 2, tr.dispatch_config("FULL", [2, 4], 2, 1)))
    monkeypatch.setattr(wrappers, "_capturing", lambda: True)

    made: list[Hook] = []

    def t(name: str) -> Hook:
        made.append(Hook(Target("test", name, (), "test")))
        return made[-1]

    desc = {
        32: SimpleNamespace(num_tokens=32, num_reqs=16, uniform=True, has_lora=False, num_active_loras=0),
        300: SimpleNamespace(num_tokens=300, num_reqs=None, uniform=False, has_lora=False, num_active_loras=0),
    }
    model = wrappers._v1_model_dispatch(
        t("m"),
        lambda self, num_tokens, num_reqs, *a, **k: (
            _FULL if num_tokens <= 32 else _NONE,
            desc[32 if num_tokens <= 32 else 300],
        ),
    )
    drafter = wrappers._v1_drafter_dispatch(
        t("d"),
        lambda self, num_tokens, *a, **k: (_PIECEWISE, 32, None) if num_tokens <= 32 else (_NONE, num_tokens, None),
    )
    ar = wrappers._collective("all_reduce", "_all_reduce_out_place")(t("c"), lambda self, input_, *a, **k: input_)

    def forward(self: Any, n: int, r: int) -> None:
        model(self, n, r)
        ar(self, _Tensor(4096))
        drafter(self, n)
        ar(self, [_Tensor(8), _Tensor(8, "torch.float32")])

    def capture_body(self: Any) -> None:
        forward(self, 32, 16)

    capture = wrappers._v1_capture(t("cap"), capture_body)
    execute = wrappers._execute_model(t("e"), lambda self, scheduler_output: None)
    sample = wrappers._sample_tokens(t("s"), lambda self, grammar_output: object())
    w = _Owner()
    so = SimpleNamespace(scheduled_spec_decode_tokens={i: [-1] for i in range(15)})

    execute(w, so)  # step 0: keys translated (and cached) before any capture
    forward(w, 30, 15)
    sample(w, None)
    capture(w)  # the graphs: manifests for (model, FULL 32) and (drafter, PIECEWISE 32)
    for n, r in ((30, 15), (300, 1)):  # step 1 replays the cached keys, step 2 runs eagerly
        execute(w, so)
        forward(w, n, r)
        sample(w, None)
    ws = proc.current_worker()
    assert ws is not None
    assert [h.error for h in made] == [""] * 6  # no wrapper switched itself off
    ws.rec.close()

    ledger = read_ledger(tmp_path / "rank001.ledger")
    full = GraphKey(CUDAGraphMode.FULL, 32, 16, uniform=True)
    pw = GraphKey(CUDAGraphMode.PIECEWISE, 32)
    manifests = {(m.role, m.key): m for m in ledger.manifests.values()}
    assert set(manifests) == {(Role.MODEL, full), (Role.DRAFTER, pw)}
    # each captured graph holds the collective issued after its key was chosen
    assert manifests[(Role.MODEL, full)].collectives == (CollectiveOp("all_reduce", "tp", "bfloat16", 4096),)
    assert manifests[(Role.DRAFTER, pw)].collectives == (CollectiveOp("all_reduce", "tp", "bfloat16", 16),)
    launches = [(r.step, r.role, r.key, r.manifest_hash) for r in format_launches(ledger.records)]
    h_model, h_drafter = manifests[(Role.MODEL, full)].hash, manifests[(Role.DRAFTER, pw)].hash
    eager = GraphKey(CUDAGraphMode.NONE, 300)
    assert launches == [
        (0, Role.MODEL, full, 0),  # before the capture: no manifest yet
        (0, Role.DRAFTER, pw, 0),
        (1, Role.MODEL, full, h_model),  # the same cached keys, now with their manifests
        (1, Role.DRAFTER, pw, h_drafter),
        (2, Role.MODEL, eager, 0),
        (2, Role.DRAFTER, eager, 0),
    ]
    colls = [
        (c.step, c.group, c.op, c.dtype, c.numel, c.group_seq) for c in ledger.records if isinstance(c, CollectiveRec)
    ]
    # eager collectives in steps 0..2 (the capture's are in the manifests, not the ring)
    assert [c[0] for c in colls] == [0, 0, 1, 1, 2, 2]
    assert colls[0][1:] == ("tp", "all_reduce", "bfloat16", 4096, 0)
    assert colls[1][1:] == ("tp", "all_reduce", "bfloat16", 16, 1)  # a list of tensors: summed, first dtype
    begins = [(b.step, b.key, b.padded_reqs, b.placeholders) for b in ledger.records if isinstance(b, StepBegin)]
    assert begins == [(0, full, 1, 15), (1, full, 1, 15), (2, eager, 0, 15)]
    assert [(e.step, e.ok) for e in ledger.records if isinstance(e, StepEnd)] == [(0, True), (1, True), (2, True)]


def test_bench_plugin_runs_and_splits_the_cost() -> None:
    """``watchdog bench plugin``: the hooked step, the bare records and the plugin's own part are all
    measured (small counts: this checks the bench, not the figures)."""
    from watchdog.bench.plugin import SCHEMA, bench_plugin

    out = bench_plugin(steps=300, repeats=3)
    assert out["schema"] == SCHEMA and out["ledger_enabled_throughout"] is True
    assert out["us_records_floor_median"] > 0 and out["us_per_eager_collective_median"] > 0
    assert out["records_per_step"] == 1  # the timed step is the in-place one vLLM's captured graphs give
    assert len(out["us_per_step_runs"]) == 3
    total, floor, own = out["us_per_step_median"], out["us_records_floor_median"], out["us_plugin_own_median"]
    assert abs(total - floor - own) < 0.01
    assert out["within_target"] == (total < out["target_us_per_step"])
    parts = out["us_records_floor_median"] + out["us_wrapper_frames_median"] + out["us_key_lookups_median"]
    assert abs(out["us_lower_bound"] - parts) < 0.01


def test_bench_wrappers_reads_step_time_and_calls_per_step_from_rank_ledgers(tmp_path: Path) -> None:
    """``--wrappers --ledgers``: steps whose begin and end are both in a rank ledger give the step time,
    their collectives and drafter launches the calls per step; the engine ledger is not a rank's."""
    from collectors.format import ProcessKind
    from collectors.recorder import Recorder
    from watchdog.bench.wrappers import ledger_facts

    key = GraphKey(CUDAGraphMode.NONE, 8)
    for rank in (0, 1):
        rec = Recorder(tmp_path, kind=ProcessKind.WORKER, rank=rank, world_size=2)
        for step in range(5):
            rec.step_begin(step, key, unpadded_tokens=8, unpadded_reqs=2, launch_manifest=0)
            for _ in range(3):
                rec.collective(step, "tp", "all_reduce", "float32", 64)
            rec.launch(step, Role.DRAFTER, GraphKey(CUDAGraphMode.PIECEWISE, 8), 0)  # no manifest: a record
            rec.step_end(step)
        rec.step_begin(5, key, unpadded_tokens=8, unpadded_reqs=2, launch_manifest=0)  # still open: not counted
        rec.close()
    eng = Recorder(tmp_path, kind=ProcessKind.ENGINE, rank=-1, world_size=2)
    eng.engine_step(0, total_tokens=8, num_reqs=2, num_decode_reqs=2, placeholders=0, max_query_len=4,
                    min_query_len=4, running=2, waiting=0)  # fmt: skip
    eng.close()
    facts = ledger_facts(tmp_path)
    assert facts["steps"] == 10 and facts["collectives_per_step"] == 3 and facts["drafter_launches_per_step"] == 1
    assert facts["step_ms_median"] > 0
    with pytest.raises(ValueError, match="no rank ledger with a whole step"):
        ledger_facts(tmp_path / "nothing")


@pytest.mark.parametrize("with_loras", [False, True], ids=["0.20.x-descriptor", "0.33.x-descriptor"])
def test_v2_dispatch_hook_both_descriptor_shapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_loras: bool
) -> None:
    """``CudaGraphManager.dispatch``: the model's and the drafter's managers (vLLM's class names) are
    told apart, other managers are ignored; 0.20.x's ``BatchExecutionDescriptor`` has no
    ``num_active_loras``, 0.33.x's has."""
    from collectors.vllm import worker as wrappers

    monkeypatch.setenv(st.ENV_LEDGER_DIR, str(tmp_path))
    proc = st.ProcessState()
    monkeypatch.setattr(wrappers, "STATE", proc)
    monkeypatch.setattr(wrappers, "_describe", lambda cfg: lambda: (0, 1, {}))

    def desc(mode: _Mode, tokens: int, reqs: int | None, uniform: int | None) -> Any:
        fields = {"cg_mode": mode, "num_tokens": tokens, "num_reqs": reqs, "uniform_token_count": uniform}
        return SimpleNamespace(**fields, **({"num_active_loras": 0} if with_loras else {}))

    full, pw = desc(_FULL, 32, 16, 2), desc(_PIECEWISE, 32, None, None)

    class ModelCudaGraphManager(_Owner):
        pass

    class EagleCudaGraphManager(_Owner):
        pass

    class EncoderCudaGraphManager(_Owner):
        pass

    made: list[Hook] = []

    def dispatch(out: Any) -> Any:
        made.append(Hook(Target("test", "dispatch", (), "test")))
        return wrappers._v2_dispatch(made[-1], lambda self, num_reqs, num_tokens, *a, **k: out)

    model, drafter, encoder = dispatch(full), dispatch(pw), dispatch(pw)

    def forward(self: Any, scheduler_output: Any) -> object:  # the runner's step: its managers dispatch inside it
        encoder(EncoderCudaGraphManager(), 15, 30)  # not part of the step: not recorded
        model(ModelCudaGraphManager(), 15, 30)
        drafter(EagleCudaGraphManager(), 15, 30)
        return object()  # sampled in the same call: execute_model ends the step

    execute = wrappers._execute_model(Hook(Target("test", "e", (), "test")), forward)
    so = SimpleNamespace(scheduled_spec_decode_tokens={i: [-1] for i in range(15)})
    for _ in range(2):
        execute(_Owner(), so)
    ws = proc.current_worker()
    assert ws is not None and [h.error for h in made] == ["", "", ""]
    ws.rec.close()
    ledger = read_ledger(tmp_path / "rank000.ledger")
    k_full = GraphKey(CUDAGraphMode.FULL, 32, 16, uniform=True)
    k_pw = GraphKey(CUDAGraphMode.PIECEWISE, 32)
    begins = [
        (b.step, b.key, b.unpadded_reqs, b.padded_reqs, b.placeholders)
        for b in ledger.records
        if isinstance(b, StepBegin)
    ]
    assert begins == [(0, k_full, 15, 1, 15), (1, k_full, 15, 1, 15)]
    launches = [(r.step, r.role, r.key) for r in format_launches(ledger.records)]
    assert launches == [(s, role, k) for s in (0, 1) for role, k in ((Role.MODEL, k_full), (Role.DRAFTER, k_pw))]
