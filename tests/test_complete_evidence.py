"""Verdicts only from complete evidence: every golden scenario with one rank's (or the engine's)
ledger removed or damaged gives its true verdict or ``inconclusive``, never a confident wrong one."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectors.format import HEADER_SIZE, SLOT_SIZE
from collectors.reader import parse_header
from watchdog.analyzer import diagnose
from watchdog.analyzer.completeness import implausible
from watchdog.bundle import load_snapshot
from watchdog.cli import main
from watchdog.snapshot import assemble, read_ledger_files
from watchdog.types import Diagnosis

SCENARIOS = Path(__file__).parent / "scenarios"
NAMES = sorted(p.name for p in SCENARIOS.iterdir() if (p / "expected.json").is_file())


def _load(name: str) -> tuple[dict[str, bytes], dict[str, Any], dict[str, Any]]:
    d = SCENARIOS / name
    files = {p.name: p.read_bytes() for p in sorted((d / "ledgers").glob("*.ledger"))}
    return files, json.loads((d / "evidence.json").read_text()), json.loads((d / "expected.json").read_text())


BUNDLES = {name: _load(name) for name in NAMES}


def _damage(data: bytes, how: str, rng: random.Random, flips: int) -> bytes | None:
    if how == "removed":
        return None
    if how == "truncated":
        return data[: rng.randrange(0, len(data))]
    if how == "random":
        return rng.randbytes(len(data))
    if how == "zeros":
        return bytes(len(data))
    out = bytearray(data)
    if how == "flips":  # anywhere in the body (meta and ring): the header has a checksum
        for _ in range(flips):
            at = rng.randrange(HEADER_SIZE, len(out))
            out[at] ^= 1 << rng.randrange(8)
        return bytes(out)
    # A few flips in the fields a reader can check: a slot's seq (head or trailer) or its step.
    header = parse_header(data)
    for _ in range(flips):
        slot = header.ring_offset + rng.randrange(header.n_slots) * SLOT_SIZE
        field = rng.choice((0, 16, SLOT_SIZE - 8))
        out[slot + field + rng.randrange(8)] ^= 1 << rng.randrange(8)
    return bytes(out)


def _check(name: str, d: Diagnosis, what: str) -> None:
    expected = BUNDLES[name][2]
    assert d.verdict.value in (expected["verdict"], "inconclusive"), (what, d.summary)
    if d.verdict.value == expected["verdict"]:
        # Never an innocent rank alone: without the engine's referee a TP=2 divergence may name both.
        assert set(expected["culprit_ranks"]) <= set(d.culprit_ranks), (what, d.summary)


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    target=st.sampled_from(["rank000.ledger", "rank001.ledger", "engine.ledger"]),
    how=st.sampled_from(["removed", "truncated", "random", "zeros", "flips", "field_flips"]),
    many=st.integers(200, 2000),
    few=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_one_ledger_removed_or_damaged_never_gives_a_wrong_verdict(
    name: str, target: str, how: str, many: int, few: int, seed: int
) -> None:
    """Slots carry no checksum (format.py), so one flipped bit in a field nothing cross-checks (a
    collective's element count) cannot be told from the truth; what is tested is damage that shows:
    many flips anywhere, or a few in the seq and step fields."""
    flips = many if how == "flips" else few
    files, evidence, _ = BUNDLES[name]
    files = dict(files)
    damaged = _damage(files[target], how, random.Random(seed), flips)
    if damaged is None:
        del files[target]
    else:
        files[target] = damaged
    _check(name, diagnose(assemble(read_ledger_files(files), evidence)), f"{target} {how} x{flips}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rank", [0, 1])
def test_a_missing_rank_is_named_and_blocks_every_comparing_rule(name: str, rank: int) -> None:
    files, evidence, expected = BUNDLES[name]
    files = {n: b for n, b in files.items() if n != f"rank{rank:03d}.ledger"}
    d = diagnose(assemble(read_ledger_files(files), evidence))
    assert any(m.startswith(f"rank {rank}: no") for m in d.missing)
    assert d.verdict.value != "no_deadlock"
    # Only a dead rank may still be blamed, and only by its own process state.
    if d.verdict.value != "inconclusive":
        assert d.verdict.value == "worker_dead" == expected["verdict"] and rank not in d.culprit_ranks
    else:
        assert "evidence incomplete" in d.summary


# ---- the reproducers from the issue ----------------------------------------------------------


def _bundle_with(tmp: Path, name: str, target: str, data: bytes | None) -> Path:
    import shutil

    work = tmp / name
    shutil.copytree(SCENARIOS / name, work)
    path = work / "ledgers" / target
    path.unlink()
    if data is not None:
        path.write_bytes(data)
    return work


@pytest.mark.parametrize("how", ["random", "truncated", "dev_zero"])
def test_divergence_bundle_with_rank1_ledger_damaged_is_not_a_device_hang(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    original = (SCENARIOS / "graph-key-divergence" / "ledgers" / "rank001.ledger").read_bytes()
    data = {"random": os.urandom(len(original)), "truncated": original[: len(original) // 2], "dev_zero": None}[how]
    work = _bundle_with(tmp_path, "graph-key-divergence", "rank001.ledger", data)
    if how == "dev_zero":
        (work / "ledgers" / "rank001.ledger").symlink_to("/dev/zero")
    rc = main(["diagnose", str(work), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "inconclusive" and out["culprit_ranks"] == []
    assert rc != 3
    assert any(m.startswith("rank 1: no") for m in out["missing"])


def test_host_hang_bundle_without_the_culprits_ledger_is_inconclusive(tmp_path: Path) -> None:
    work = _bundle_with(tmp_path, "host-hang", "rank001.ledger", None)
    d = diagnose(load_snapshot(work))
    assert d.verdict.value == "inconclusive"
    assert d.recommendation.action == "none"
    assert "rank 1: no ledger" in d.missing


def test_bit_flipped_step_numbers_mark_the_ledger_damaged() -> None:
    files = BUNDLES["graph-key-divergence"][0]
    ledgers = read_ledger_files(files)
    records = list(ledgers.ranks[1].records)
    assert implausible(records) == []
    i = len(records) // 2
    rec = records[i]
    records[i] = type(rec)(**{**{f: getattr(rec, f) for f in rec.__slots__}, "step": 9007199254741044})  # type: ignore[attr-defined]
    assert implausible(records) == [i]


# ---- the deployment's processes as a source of the world size ---------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_worker_titles_showing_more_ranks_than_the_ledgers_state_are_missing_evidence(name: str) -> None:
    """vLLM's worker titles are the processes' own statement of the TP size: a worker titled past the
    ledgers' world size means ranks without a ledger, whatever the headers say."""
    files, evidence, expected = BUNDLES[name]
    world = max(int(n[4:7]) for n in files if n.startswith("rank")) + 1
    titles = {str(9000 + r): f"Worker_TP{r}" for r in range(world + 1)}  # one more rank than the ledgers
    d = diagnose(assemble(read_ledger_files(files), {**evidence, "workers": titles}))
    assert d.verdict.value in ("inconclusive", expected["verdict"] if expected["verdict"] == "worker_dead" else "-")
    assert d.culprit_ranks == () or d.verdict.value == "worker_dead"
    assert any(f"deployment's processes include Worker_TP{world}" in m for m in d.missing), d.missing
    assert f"rank {world}: no readable ledger" in d.missing
    # the same titles for the ranks there are change nothing
    same = {str(9000 + r): f"Worker_PP0_TP{r}" for r in range(world)}
    again = diagnose(assemble(read_ledger_files(files), {**evidence, "workers": same}))
    assert (again.verdict.value, again.culprit_ranks) == (expected["verdict"], tuple(expected["culprit_ranks"]))


def test_worker_titles_are_read_from_the_ranks_siblings_and_nothing_else_is_kept(tmp_path: Path) -> None:
    """Real processes: three titled the way vLLM titles its workers (argv replaced by the title), one
    sibling whose command line only starts like a title (more arguments follow: a command line is never
    kept), and a titled process that is not the deployment's."""
    import subprocess

    from watchdog.evidence.titles import worker_titles

    script = (
        "import subprocess, sys\n"
        "procs = [subprocess.Popen(['bash', '-c', f'exec -a VLLM::Worker_TP{r} cat'], stdin=subprocess.PIPE)"
        " for r in range(3)]\n"
        "procs.append(subprocess.Popen(['bash', '-c', 'exec -a VLLM::Worker_TP9 sleep 60'], stdin=-3))\n"
        "print(' '.join(str(p.pid) for p in procs), flush=True)\n"
        "sys.stdin.read()\n"
    )
    with (
        subprocess.Popen(["bash", "-c", "exec -a VLLM::Worker_TP7 cat"], stdin=subprocess.PIPE) as stranger,
        subprocess.Popen(
            ["python3", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
        ) as parent,
    ):
        try:
            assert parent.stdout is not None
            pids = [int(p) for p in parent.stdout.readline().split()]
            deadline = time.monotonic() + 20  # until every child has exec'd under its title

            def titled(pid: int) -> bool:
                return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::")

            while not all(titled(p) for p in [*pids, stranger.pid]) and time.monotonic() < deadline:
                time.sleep(0.05)
            got = worker_titles("/proc", [pids[0]])  # one rank's pid: its titled siblings are found
            assert got == {pids[0]: "Worker_TP0", pids[1]: "Worker_TP1", pids[2]: "Worker_TP2"}
        finally:
            subprocess.run(["pkill", "-KILL", "-s", str(parent.pid)], check=False)
            stranger.kill()
