"""The JSON the product writes stays byte-identical: every record's ``to_json`` (diagnosis, ring
verdict, divergence, rank reports, recommendation, discovered rings, step digests, dispatch
config, ring layouts, graph keys, collectives, ledger headers, ladder state, restarts), produced
from every golden scenario bundle and from records built here, is compared with what the code
wrote before the records shared one JSON mechanism (tests/json_golden/, regenerate with
``WATCHDOG_REGEN_JSON_GOLDEN=1`` only after checking a change is meant), and every record that
is read back (``from_json``) round-trips."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from collectors.format import CollectiveOp, CUDAGraphMode, GraphKey
from collectors.reader import read_ledger
from watchdog.analyzer import diagnose
from watchdog.bundle import load_snapshot
from watchdog.divergence import DivergenceMonitor, StepDigest
from watchdog.evidence.discover import DiscoveredRing, Discovery
from watchdog.evidence.rings import RingLayout
from watchdog.keys import DispatchConfig
from watchdog.snapshot import ring_from_json
from watchdog.supervisor.ladder import Event, LadderState, Policy
from watchdog.supervisor.run import Restart
from watchdog.types import (
    Divergence,
    Frame,
    GpuInfo,
    ProcInfo,
    Recommendation,
    RingChunk,
    RingState,
    RingVerdict,
    Snapshot,
    StackDump,
    ThreadStack,
)

ROOT = Path(__file__).resolve().parent
SCENARIOS = sorted(p for p in (ROOT / "scenarios").iterdir() if (p / "evidence.json").is_file())
GOLDEN = ROOT / "json_golden"


def dumps(value: Any) -> str:
    return json.dumps(value, indent=1) + "\n"  # insertion order kept: the order is part of the contract


def _to_json(record: Any) -> Any:
    return record.to_json()


def evidence_outputs(snapshot: Snapshot) -> dict[str, Any]:
    """The evidence a snapshot holds besides its ledgers, written back as evidence.json holds it."""
    procs = [snapshot.engine, *snapshot.ranks.values()]
    return {
        "stacks": [_to_json(p.stack) for p in procs if p is not None and p.stack is not None],
        "native_stacks": [_to_json(p.native_stack) for p in procs if p is not None and p.native_stack is not None],
        "procs": [_to_json(p.proc) for p in procs if p is not None and p.proc is not None],
        "gpus": [_to_json(g) for g in snapshot.gpus],
        "rings": [_to_json(r) for r in snapshot.rings],
    }


def scenario_outputs(bundle: Path) -> dict[str, Any]:
    snapshot = load_snapshot(bundle)
    diagnosis = diagnose(snapshot)
    ledgers = [read_ledger(p) for p in sorted((bundle / "ledgers").glob("*.ledger"))]
    monitor = DivergenceMonitor()
    for ledger in ledgers:
        monitor.observe(None if ledger.rank < 0 else ledger.rank, list(ledger.records))
    manifests = [  # a few per ledger: every shape, not every captured graph
        {"key": m.key.to_json(), "collectives": [c.to_json() for c in m.collectives]}
        for ledger in ledgers
        for _, m in sorted(ledger.manifests.items())[:3]
    ]
    return {
        "diagnosis": diagnosis.to_json(),
        "headers": [ledger.header.to_json() for ledger in ledgers],
        "manifests": manifests,
        # the first and last steps of each rank: every shape a digest takes, not every step
        "digests": {str(r): d[:4] + d[-4:] for r, d in sorted(monitor.digests().items())},
        "evidence": evidence_outputs(snapshot),
    }


def built_outputs() -> dict[str, Any]:
    """Records no scenario holds in every shape (None fields, LoRA keys, a give-up, ...)."""
    layout = RingLayout(n_readers=2, max_chunks=10, max_chunk_bytes=1 << 16)
    rings = (
        DiscoveredRing("psm_1", layout, "broadcast", (11, 12), None, "written by the engine"),
        DiscoveredRing("psm_2", layout, "response", (), 1, "the rank in its name"),
    )
    policy = Policy()
    state = LadderState(rung=1, gave_up=True)
    state.events.append(Event(12.5, "i-1", "host_hang", "climb", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY", "why"))
    digest = StepDigest(7, 100, [("worker", "FULL(tokens=8)", 3)], Counter({"tp": 2, "pp": 1}), None, False, True)
    return {
        "graph_keys": [
            GraphKey(CUDAGraphMode.FULL, 8, 4, True).to_json(),
            GraphKey(CUDAGraphMode.NONE, 130).to_json(),
            GraphKey(CUDAGraphMode.PIECEWISE, 16, None, False, True, 2).to_json(),
        ],
        "collective": CollectiveOp("all_reduce", "tp", "bfloat16", 4096).to_json(),
        "ring_layout": layout.to_json(),
        "discovery": Discovery(rings, ("psm_3: too small",)).to_json(),
        "dispatch": DispatchConfig("FULL_DECODE_ONLY", (1, 2, 4, 8), 2).to_json(),
        "digest": digest.to_json(),
        "ladder": state.to_json(policy),
        "fresh_ladder": LadderState().to_json(policy),
        "restarts": [
            Restart("FULL_AND_PIECEWISE", "NONE", "i-2", "device_hang", 3.14159265).to_json(),
            Restart("NONE", "NONE", "i-3", "host_hang").to_json(),
        ],
        "recommendation": Recommendation("restart_safer_mode", "NONE", "r").to_json(),
        "ring_verdict": RingVerdict("reader_behind", (1,), (), "s").to_json(),
        "divergence": Divergence(
            3, 0, {1: None, 0: CollectiveOp("all_gather", "tp", "float16", 8)}, {1: "eager", 0: "FULL"}
        ).to_json(),
        "stacks": [
            _to_json(
                StackDump(
                    7,
                    (
                        ThreadStack("MainThread", 7, True, (Frame("wait", "a.py", 3), Frame("<module>", "b.py", 1))),
                        ThreadStack("", 0, False, ()),
                    ),
                    native=True,
                )
            ),
            _to_json(StackDump(8, ())),
        ],
        "procs": [
            _to_json(ProcInfo(9, False)),
            _to_json(ProcInfo(10, True, "disk-sleep", 1, 0.25, 3, "futex_wait", {"python": 0.5, "11": 0})),
        ],
        "gpus": [_to_json(GpuInfo(0, 100, 350.5, 1980)), _to_json(GpuInfo(1, 0.0, 0.0, 0.0, (79, 13), (4242,)))],
        "rings": [
            _to_json(
                RingState("psm_1", "broadcast", 2, (RingChunk(True, (True, False)), RingChunk(False, (False, False))))
            ),
            _to_json(RingState("psm_2", "response", 0, (RingChunk(True, ()),))),
            _to_json(RingState("psm_3", "response", 1, ())),
        ],
    }


CASES = [*(pytest.param(p.name, id=p.name) for p in SCENARIOS), pytest.param("built", id="built")]


def outputs(case: str) -> dict[str, Any]:
    return built_outputs() if case == "built" else scenario_outputs(ROOT / "scenarios" / case)


@pytest.mark.parametrize("case", CASES)
def test_json_is_byte_identical_to_the_recorded_output(case: str) -> None:
    got = dumps(outputs(case))
    path = GOLDEN / f"{case}.json"
    if os.environ.get("WATCHDOG_REGEN_JSON_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(got)
    assert got == path.read_text()


@pytest.mark.parametrize("case", CASES)
def test_what_is_read_back_round_trips(case: str) -> None:
    out = outputs(case)
    for key in out.get("graph_keys", []) + [m["key"] for m in out.get("manifests", [])]:
        assert GraphKey.from_json(key).to_json() == key
    for entry in [out.get("collective", [])] if case == "built" else []:
        assert CollectiveOp.from_json(entry).to_json() == entry
    for manifest in out.get("manifests", []):
        assert [CollectiveOp.from_json(c).to_json() for c in manifest["collectives"]] == manifest["collectives"]
    digests = [out["digest"]] if case == "built" else [d for ds in out["digests"].values() for d in ds]
    for d in digests:
        assert StepDigest.from_json(d).to_json() == d
    evidence = out if case == "built" else out["evidence"]
    for read, key in (
        (StackDump.from_json, "stacks"),
        (StackDump.from_json, "native_stacks"),
        (ProcInfo.from_json, "procs"),
        (GpuInfo.from_json, "gpus"),
        (ring_from_json, "rings"),
    ):
        for entry in evidence.get(key, []):
            assert read(json.loads(json.dumps(entry))).to_json() == entry
    if case == "built":
        assert RingLayout.from_json(out["ring_layout"]).to_json() == out["ring_layout"]
        assert DispatchConfig.from_json(out["dispatch"]).to_json() == out["dispatch"]


@pytest.mark.parametrize(
    ("read", "data", "message"),
    [
        (RingLayout.from_json, {"n_readers": 1, "max_chunks": True, "max_chunk_bytes": 8}, "max_chunks"),
        (RingLayout.from_json, {"n_readers": 1, "max_chunks": 2}, "max_chunk_bytes"),
        (RingLayout.from_json, [], "expected an object"),
        (GraphKey.from_json, {"mode": "SOMETIMES", "num_tokens": 1}, "mode"),
        (CollectiveOp.from_json, ["all_reduce", "tp", "f16"], r"\[op, group, dtype, numel\]"),
        (StepDigest.from_json, {"step": 1}, "begun_ns"),
    ],
)
def test_damaged_json_is_a_value_error_naming_the_field(read: Any, data: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read(data)
