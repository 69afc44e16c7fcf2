"""Golden scenarios: bundles from real demo hangs must keep their diagnosis; damaged copies of
them must give one clear error or a diagnosis, never a crash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watchdog.analyzer import diagnose
from watchdog.bundle import load_snapshot
from watchdog.cli import main
from watchdog.errors import InputError

SCENARIOS = Path(__file__).parent / "scenarios"
NAMES = sorted(p.name for p in SCENARIOS.iterdir() if (p / "expected.json").is_file())


def test_every_fault_class_has_a_scenario() -> None:
    from watchdog.demo.faults import FAULTS

    assert set(NAMES) == set(FAULTS) - {"none"}


@pytest.mark.parametrize("name", NAMES)
def test_scenario_diagnosis(name: str) -> None:
    expected = json.loads((SCENARIOS / name / "expected.json").read_text())
    d = diagnose(load_snapshot(SCENARIOS / name)).to_json()
    for field in ("verdict", "step", "culprit_ranks", "first_divergence", "novelty"):
        assert d[field] == expected[field], field
    assert {r: v["state"] for r, v in d["ranks"].items()} == expected["states"]
    assert {r: v["graph_key"] for r, v in d["ranks"].items()} == expected["graph_keys"]
    assert {k: d["recommendation"][k] for k in ("action", "cudagraph_mode")} == expected["recommendation"]


@pytest.mark.parametrize("name", NAMES)
def test_scenario_ledgers_alone_still_name_the_culprit(name: str) -> None:
    """Post-mortem on the raw ledger directory: no stacks, no process state."""
    expected = json.loads((SCENARIOS / name / "expected.json").read_text())
    d = diagnose(load_snapshot(SCENARIOS / name / "ledgers"))
    assert any("post-mortem" in m for m in d.missing)
    if expected["verdict"] in ("collective_mismatch", "host_hang"):
        assert d.verdict.value == expected["verdict"]
        assert list(d.culprit_ranks) == expected["culprit_ranks"]
    elif expected["verdict"] == "worker_dead":
        # without process state a dead rank cannot be told from a stuck one: never "healthy"
        assert d.verdict.value != "no_deadlock"
    else:
        assert d.verdict.value in (expected["verdict"], "inconclusive")


def test_cli_diagnose_exit_codes_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", str(SCENARIOS / "graph-key-divergence"), "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["schema"] == "watchdog.diagnosis/v1" and out["verdict"] == "collective_mismatch"
    assert main(["diagnose", str(SCENARIOS / "host-hang")]) == 3
    assert "VERDICT  host_hang" in capsys.readouterr().out


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p / "nope",
        lambda p: (p / "f.txt").write_text("hello") and p / "f.txt",
        lambda p: (p / "x.ledger").write_bytes(b"\0" * 100) and p / "x.ledger",
        lambda p: (p / "d").mkdir() or p / "d",
    ],
)
def test_cli_bad_input_is_one_line_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str], make) -> None:  # type: ignore[no-untyped-def]
    rc = main(["diagnose", str(make(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("watchdog: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_cli_usage_error_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose"]) == 2
    assert main(["no-such-command"]) == 2


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    target=st.sampled_from(
        ["evidence.json", "ledgers/rank000.ledger", "ledgers/rank001.ledger", "ledgers/engine.ledger"]
    ),
    offset=st.floats(0, 1),
    junk=st.binary(min_size=1, max_size=64),
)
def test_damaged_bundle_never_crashes(tmp_path: Path, target: str, offset: float, junk: bytes) -> None:
    work = tmp_path / "b"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(SCENARIOS / "graph-key-divergence", work)
    path = work / target
    data = bytearray(path.read_bytes())
    at = int(offset * (len(data) - 1))
    data[at : at + len(junk)] = junk
    path.write_bytes(bytes(data))
    try:
        snap = load_snapshot(work)
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    d = diagnose(snap)
    assert d.verdict.value in {
        "collective_mismatch",
        "device_hang",
        "host_hang",
        "worker_dead",
        "engine_stall",
        "inconclusive",
        "no_deadlock",
    }
