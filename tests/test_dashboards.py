"""dashboards/: the committed dashboard and rules are what dashboards/generate.py generates (with the
pinned grafana-foundation-sdk 11.x); panel ids, refIds and the uid are unique; and every PromQL
expression of the dashboard and of the alert rules runs on a real Prometheus (Debian's package, on
loopback) that scraped a real `watchdog run` supervising a real demo server (the OpenAI-compatible
front, which serves vLLM's own metric names) through an injected padded-slot kernel hang: the
supervisor climbs one rung, the hang recurs, the restart bound (1) is hit and the server is left up,
hung. So stalls, incidents, the ladder's climb, the exhausted budget and "no step progress while
requests run" all have data, and every expression must return some.

NVML cannot exist here: the supervisor's agent samples a fake pynvml (tests/fake_nvml.py, two
devices) through the real sampling path, so the GPU panels have data too. Nothing is allowed to
come back empty (NEEDS would list an exception by name, with its reason; it is empty).

Time scaling: a rule's range windows (e.g. `[2m]` of "no step progress") are what its promtool unit
tests (tests/test_alerts.py) check; here every range window is divided by SCALE (2m -> 20 s, 5m -> 50 s)
and Grafana's `$__rate_interval` becomes WINDOW, so that a hang of a few tens of seconds makes the
conditions true.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import agent_up, free_port, get, leftover_rings, need, prom_query, spawn, stop, tail, wait_for

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "dashboards"))
import generate  # noqa: E402

from watchdog.demo.fallback import FaultBroker  # noqa: E402
from watchdog.demo.faults import FaultPlan  # noqa: E402
from watchdog.supervisor.tree import unlink_rings  # noqa: E402

WINDOW = "20s"
SCALE = 6
NAMESPACE, POD = "ci", "demo-0"  # the labels a Kubernetes PodMonitor scrape would add
NEEDS: dict[str, str] = {}  # kind of expression -> why it may return no data here (none may)


def test_committed_files_are_what_the_generator_makes() -> None:
    cp = subprocess.run(
        [sys.executable, "dashboards/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_the_generator_is_the_pinned_11x_sdk() -> None:
    from importlib.metadata import version

    v = version("grafana-foundation-sdk")
    assert re.fullmatch(r"\d+!11\.\d+\.\d+", v), f"grafana-foundation-sdk {v}: pin an 11.x build (epoch!)"
    dash = json.loads(generate.DASHBOARD_JSON.read_text())
    assert dash["schemaVersion"] >= 39, dash["schemaVersion"]  # 10.1 builds write 36


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def test_ids_and_uids_are_unique() -> None:
    dash = json.loads(generate.DASHBOARD_JSON.read_text())
    assert dash["uid"] == generate.DASHBOARD_UID and len(dash["uid"]) <= 40
    ps = panels(dash)
    ids = [p["id"] for p in ps]
    assert len(ids) == len(set(ids)), ids
    for p in ps:
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), (p["title"], refs)
    titles = [p["title"] for p in ps]
    assert len(titles) == len(set(titles)), titles
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names == ["datasource", "namespace", "pod", "tp_group"], names
    # no two panels overlap on the grid
    cells: set[tuple[int, int]] = set()
    for p in ps:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine


def test_the_dashboard_has_the_panels_the_issue_asks_for() -> None:
    dash = json.loads(generate.DASHBOARD_JSON.read_text())
    exprs = " ".join(t["expr"] for p in panels(dash) for t in p.get("targets", []))
    for metric in (
        "watchdog_rank_last_step",
        "watchdog_rank_open_step_age_seconds",
        "watchdog_step_duration_seconds_bucket",
        "watchdog_graph_dispatches_total",
        "watchdog_stalls_detected_total",
        "watchdog_divergences_detected_total",
        "watchdog_incidents_total",
        "watchdog_supervisor_cudagraph_mode",
        "watchdog_evidence_collection_seconds_bucket",
        "watchdog_gpu_utilization_percent",
        "watchdog_gpu_power_watts",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:generation_tokens_total",
    ):
        assert metric in exprs, metric
    for p in panels(dash):
        for t in p.get("targets", []):
            if t["expr"].startswith(("sum by (pod) (vllm", "sum by (pod) (rate(vllm")):
                continue
            assert "$namespace" in t["expr"] and "$pod" in t["expr"], (p["title"], t["expr"])
    # every query the generator knows is on the dashboard, and nothing else
    assert sorted(t["expr"] for p in panels(dash) for t in p.get("targets", [])) == sorted(
        q.expr for q in generate.queries()
    )


# ---- every expression against a real Prometheus --------------------------------------------------


def scaled(expr: str) -> str:
    """Grafana's variables as the test's labels, range windows divided by SCALE (see the docstring)."""
    seconds = {"s": 1, "m": 60, "h": 3600}
    expr = re.sub(r"\[(\d+)([smh])\]", lambda m: f"[{int(m.group(1)) * seconds[m.group(2)] // SCALE}s]", expr)
    expr = expr.replace("$__rate_interval", WINDOW)
    return expr.replace("$namespace", NAMESPACE).replace("$pod", POD).replace("$tp_group", ".+")


def expressions() -> list[tuple[str, str, str]]:
    """(where, expression, needs) for every dashboard query, template-variable query and alert."""
    out = [(f"panel query {q.legend}", q.expr, q.needs) for q in generate.queries()]
    for v in generate.variable_queries():  # label_values(METRIC{...}, LABEL): Grafana asks for METRIC{...}
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", v)
        assert m is not None, v
        out.append((f"variable {m.group(2)}", m.group(1), ""))
    out += [(f"alert {a.name}", a.expr, a.needs) for a in generate.ALERTS if a.name != "WatchdogAgentDown"]
    return out


def load(port: int, stop_ev: threading.Event, n: int = 16) -> list[threading.Thread]:
    """n client threads sending completions until stopped (bounded: each request times out)."""
    rng = random.Random(0)

    def one() -> None:
        while not stop_ev.is_set():
            body = {
                "model": "watchdog-demo",
                "prompt": "tell me " * rng.randint(1, 40),
                "max_tokens": rng.randint(4, 48),
            }
            url = f"http://127.0.0.1:{port}/v1/completions"
            req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    r.read()
            except (urllib.error.URLError, OSError):
                stop_ev.wait(0.5)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_every_expression_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    prometheus = need("prometheus")
    agent_port, server_port, prom_port = free_port(), free_port(), free_port()
    assert len({agent_port, server_port, prom_port}) == 3
    ledgers = tmp_path / "ledgers"
    ledgers.mkdir()
    config = tmp_path / "prometheus.yml"
    labels = f"{{namespace: {NAMESPACE}, pod: {POD}}}"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: watchdog\n    static_configs: [{{targets: ['127.0.0.1:{agent_port}'], labels: {labels}}}]\n"
        f"  - job_name: vllm\n    static_configs: [{{targets: ['127.0.0.1:{server_port}'], labels: {labels}}}]\n"
    )
    orch = FaultBroker(tmp_path / "fault.sock", FaultPlan("padded-slot-kernel-hang"))
    stop_load = threading.Event()
    prom = agent = None
    try:
        with open(tmp_path / "prometheus.log", "wb") as log:
            prom = subprocess.Popen(
                [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                stdout=log, stderr=log, cwd=tmp_path, start_new_session=True,
            )  # fmt: skip
        agent = spawn(
            ["run", "--ledger-dir", str(ledgers), "--incidents-dir", str(tmp_path / "inc"), "--port", str(agent_port),
             "--no-native-stacks", "--nvml-module", "tests.fake_nvml",  # run from the repository root
             "--max-restarts", "1", "--on-give-up", "up", "--stop-grace-s", "5",
             "--upstream", f"http://127.0.0.1:{server_port}", "--",
             sys.executable, "-m", "watchdog.demo.server", "--tp", "2", "--port", str(server_port),
             "--workdir", str(tmp_path), "--fault-from", str(tmp_path / "fault.sock")],
            tmp_path / "agent.log",
        )  # fmt: skip
        agent_up(agent, agent_port, tmp_path / "agent.log")
        try:
            wait_for(lambda: get(server_port, "/health")[0] == 200, 120)
        except AssertionError:
            raise AssertionError(f"the demo server did not come up:\n{tail(tmp_path / 'agent.log')}") from None
        load(server_port, stop_load)
        try:
            wait_for(lambda: json.loads(get(agent_port, "/v1/status")[1])["supervisor"]["ladder"]["gave_up"], 240)
        except AssertionError:
            raise AssertionError(f"the ladder did not give up:\n{tail(tmp_path / 'agent.log')}") from None
        incidents = json.loads(get(agent_port, "/v1/incidents")[1])
        assert [i["verdict"] for i in incidents] == ["device_hang", "device_hang"], incidents  # one per rung
        # the hang goes on (given up, left up): let the scaled windows see only the hang
        time.sleep(int(WINDOW[:-1]) + 5)
        results, empty, failed = {}, [], []
        for where, expr, needs in expressions():
            try:
                result = prom_query(prom_port, scaled(expr))
            except AssertionError as exc:
                failed.append(f"{where}: {scaled(expr)}: {exc}")
                continue
            results[where] = result
            if not result and needs not in NEEDS:
                empty.append(f"{where}: {scaled(expr)}")
        assert not failed, "queries that did not execute:\n" + "\n".join(failed)
        assert not empty, "expressions that returned no data:\n" + "\n".join(empty)
        # the alerts that fired carry the labels their annotations use
        [deadlock] = results["alert WatchdogDeadlockDiagnosed"]
        assert deadlock["metric"] == {"namespace": NAMESPACE, "pod": POD, "tp_group": "tp0", "verdict": "device_hang"}
        assert results["alert WatchdogNoStepProgress"][0]["metric"] == {"namespace": NAMESPACE, "pod": POD}
        # the Incidents table: each row's link (Prometheus' instance label: the agent) opens that incident's
        # page, which shows what the ladder decided (saved with the bundle: climb, then give up)
        rows = results["panel query {{verdict}} {{incident}}"]
        assert sorted(r["metric"]["incident"] for r in rows) == sorted(i["id"] for i in incidents)
        for inc, action in zip(incidents, ("climb", "give_up"), strict=True):
            decided = json.loads((tmp_path / "inc" / inc["id"] / "supervisor.json").read_text())
            assert decided["event"]["action"] == action
            (row,) = [r for r in rows if r["metric"]["incident"] == inc["id"]]
            url = generate.INCIDENT_LINK.replace("${__data.fields.instance}", row["metric"]["instance"])
            with urllib.request.urlopen(url.replace("${__data.fields.incident}", inc["id"]), timeout=30) as resp:
                page = resp.read().decode()
            assert 'data-verdict="device_hang"' in page and f"{action}: FULL" in page, page[-3000:]
        # agent down: stop the agent, and `up` turns 0 on the next scrape
        stop(agent)
        agent = None
        down = next(a for a in generate.ALERTS if a.name == "WatchdogAgentDown")
        fired = wait_for(lambda: prom_query(prom_port, down.expr), 30)
        assert fired[0]["metric"]["job"] == "watchdog" and fired[0]["metric"]["pod"] == POD, fired
    finally:
        stop_load.set()
        if agent is not None:
            stop(agent)  # `watchdog run` stops the server's tree and unlinks its rings
        unlink_rings(ledgers)  # in case the supervisor itself had to be SIGKILLed
        if prom is not None:
            stop(prom, first=signal.SIGTERM)
        orch.close()
    assert leftover_rings(ledgers) == []


def test_the_allow_list_is_explicit_and_small() -> None:
    """No expression may come back empty above; an exception would have to be named, with its reason."""
    kinds = {needs for _w, _e, needs in expressions() if needs}
    assert kinds <= {*NEEDS, "vllm", "supervisor", "gpu"}, kinds  # and these must return data
    allowed = [w for w, _e, needs in expressions() if needs in NEEDS]
    assert allowed == [], allowed
    assert all(NEEDS[k] for k in NEEDS)
    assert os.environ.get("WATCHDOG_ALLOW_EMPTY") is None  # no switch turns the check off
