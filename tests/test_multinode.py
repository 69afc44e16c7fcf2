"""Multi-node correlation for real: one TP=4 demo deployment, two member agents as separate
processes on loopback each owning half the ranks (the engine lives with rank 0), and one
coordinator that pulls both over HTTP. Its diagnosis must equal that of a single agent that sees
the whole deployment; the coordinator's merge is also checked on its own for a missing agent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import DIVERGENT_WORKLOAD, free_port, get, start, stop, wait_for
from watchdog.coordinator import AgentUnreachable, merge
from watchdog.types import StallInfo

TOKEN = "group-secret"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_coordinator_over_two_member_agents_matches_a_single_agent(tmp_path: Path) -> None:
    work = tmp_path / "w"
    ledgers = work / "ledgers"
    ledgers.mkdir(parents=True)
    env = {"WATCHDOG_API_TOKEN": TOKEN, "WATCHDOG_LEDGER_DIR": str(ledgers), "WATCHDOG_NATIVE_STACKS": "0"}
    pa, pb, pc, ps = (free_port() for _ in range(4))
    procs = []
    try:
        for port, ranks in ((pa, "0-1"), (pb, "2,3")):
            procs.append(
                start(
                    [
                        "agent",
                        "--member",
                        "--ranks",
                        ranks,
                        "--port",
                        str(port),
                        "--incidents-dir",
                        str(tmp_path / f"inc-{port}"),
                    ],
                    env,
                )
            )
        coord_cfg = tmp_path / "coordinator.toml"
        coord_cfg.write_text(f'agents = "http://127.0.0.1:{pa},http://127.0.0.1:{pb}"\nport = {pc}\n')
        procs.append(
            start(["coordinator", "--config", str(coord_cfg), "--incidents-dir", str(tmp_path / "inc-c")], env)
        )
        # The reference: one agent seeing all four ranks, which never fires by itself (asked by hand below).
        procs.append(
            start(
                ["agent", "--port", str(ps), "--stall-floor-s", "100000", "--incidents-dir", str(tmp_path / "inc-s")],
                env,
            )
        )
        for port in (pa, pb, pc, ps):
            assert wait_for(lambda port=port: get(port, "/healthz")[0] == 200, 30)
        assert json.loads(get(pb, "/v1/status")[1])["ranks"] == [2, 3]
        demo = start(
            [
                "demo",
                "--no-watch",
                "--tp",
                "4",
                "--fault",
                "graph-key-divergence",
                "--fault-rank",
                "3",
                "--workdir",
                str(work),
                "--timeout",
                "200",
                *DIVERGENT_WORKLOAD,
            ]
        )
        procs.append(demo)
        got = wait_for(lambda: json.loads(get(pc, "/v1/incidents")[1]), 200)
        assert len(got) == 1, got
        coord = json.loads(get(pc, f"/v1/incidents/{got[0]['id']}")[1])
        assert get(pc, "/livez")[0] == 503
        # A member agent never diagnoses by itself.
        assert json.loads(get(pa, "/v1/incidents")[1]) == [] and json.loads(get(pb, "/v1/incidents")[1]) == []
        assert get(pb, "/v1/diagnose-now", token=TOKEN, method="POST")[0] == 409
        status, body = get(ps, "/v1/diagnose-now", token=TOKEN, method="POST")
        assert status == 200, body
        single = json.loads(body)["diagnosis"]
        assert coord["verdict"] == single["verdict"] == "collective_mismatch"
        for key in ("step", "culprit_ranks", "first_divergence"):
            assert coord[key] == single[key], key
        assert coord["culprit_ranks"] == [3]
        bundle = tmp_path / "inc-c" / got[0]["id"]
        evidence = json.loads((bundle / "evidence.json").read_text())
        assert [n["agent"] for n in evidence["nodes"]] == [f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"]
        assert sorted(p.name for p in (bundle / "ledgers").iterdir()) == [
            "engine.ledger",
            "rank000.ledger",
            "rank001.ledger",
            "rank002.ledger",
            "rank003.ledger",
        ]
        metrics = get(pc, "/metrics")[1]
        assert 'watchdog_incidents_total{tp_group="tp0",verdict="collective_mismatch"} 1.0' in metrics
        # the coordinator serves the merged incident's page: four lanes from two nodes, rank 3 the culprit
        status, page = get(pc, got[0]["page"])
        assert status == 200 and 'data-verdict="collective_mismatch"' in page
        assert 'class="lane culprit" data-rank="3"' in page and page.count('class="lane') == 5
    finally:
        for p in reversed(procs):
            stop(p)


def test_merge_marks_an_unreachable_agent_missing_and_keeps_the_rest() -> None:
    from watchdog.snapshot import LedgerSet, snapshot_payload

    part = snapshot_payload(
        LedgerSet({}, None, {"rank000.ledger": b"\x00" * 64}, ()),
        {"pids": {"0": 10}, "stacks": {"10": {"x": 1}}, "procs": {"10": {"y": 2}}, "missing": ["gpus: none"]},
    )
    clash = snapshot_payload(
        LedgerSet({}, None, {"rank001.ledger": b"\x01"}, ()), {"pids": {"1": 10}, "stacks": {"10": {}}}
    )
    stall = StallInfo("open_step", 7, 3.0, 1.0)
    files, ev = merge(
        {"http://a": part, "http://b": AgentUnreachable("http://b/v1/snapshot: connection refused"), "http://c": clash},
        stall,
    )
    assert sorted(files) == ["rank000.ledger", "rank001.ledger"]
    assert "agent http://b/v1/snapshot: connection refused" in ev["missing"]
    assert "agent http://a: gpus: none" in ev["missing"]
    # pid 10 on two nodes: whose stack it is cannot be told, so it is dropped and said so.
    assert "10" not in ev["stacks"] and "stacks of pid 10: reported by two agents, dropped" in ev["missing"]
    assert ev["procs"] == {"10": {"y": 2}} and ev["stall"]["step"] == 7
    files, ev = merge({"http://a": {"schema": "something else"}}, None)
    assert files == {} and ev["missing"] == ["agent http://a: not a watchdog.snapshot/v1 payload"]
