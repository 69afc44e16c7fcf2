"""The agent's /metrics as a real Prometheus sees it: `promtool check metrics` lints the text of a
running agent that has diagnosed an incident, and a real `prometheus` server scrapes the agent
while a demo deployment hangs, and sees the stall counter rise.

Needs Debian's `prometheus` package (`prometheus`, `promtool` on PATH). Without it the tests
skip, unless WATCHDOG_CI=1 (CI installs it), where they fail.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    agent_up,
    free_port,
    get,
    leftover_rings,
    metric,
    need,
    prom_query,
    spawn,
    stop,
    tail,
    wait_for,
)

pytestmark = [pytest.mark.slow]

STALLS = 'watchdog_stalls_detected_total{job="watchdog"}'


def start_agent(tmp_path: Path, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    work = tmp_path / "w"
    (work / "ledgers").mkdir(parents=True)
    agent = spawn(
        ["agent", "--ledger-dir", str(work / "ledgers"), "--incidents-dir", str(tmp_path / "inc"), "--port", str(port)],
        tmp_path / "agent.log",
    )
    return agent, work


def start_hanging_demo(tmp_path: Path, work: Path) -> subprocess.Popen[bytes]:
    return spawn(
        ["demo", "--no-watch", "--tp", "2", "--fault", "host-hang", "--requests", "32", "--workdir", str(work),
         "--timeout", "200"],
        tmp_path / "demo.log",
    )  # fmt: skip


def wait_incident(port: int, demo_log: Path, timeout: float = 150) -> list[dict[str, Any]]:
    try:
        incidents: list[dict[str, Any]] = wait_for(lambda: json.loads(get(port, "/v1/incidents")[1]), timeout)
    except AssertionError:
        raise AssertionError(f"no incident within {timeout:.0f} s; demo:\n{tail(demo_log)}") from None
    return incidents


@pytest.mark.timeout(300)
def test_promtool_accepts_the_agents_metrics(tmp_path: Path, port: int, spawned: Any) -> None:
    promtool = need("promtool")
    agent, work = start_agent(tmp_path, port)
    spawned(agent)
    agent_up(agent, port, tmp_path / "agent.log")
    demo = spawned(start_hanging_demo(tmp_path, work))
    incidents = wait_incident(port, tmp_path / "demo.log")
    assert incidents[0]["verdict"] == "host_hang", incidents
    status, text = get(port, "/metrics")
    assert status == 200
    # the labelled series exist now
    assert metric(text, "watchdog_incidents_total", 'verdict="host_hang"') == 1, text
    assert metric(text, "watchdog_stalls_detected_total") >= 1, text
    scraped = tmp_path / "metrics.txt"
    scraped.write_text(text)
    with open(scraped, "rb") as stdin:
        cp = subprocess.run([promtool, "check", "metrics"], stdin=stdin, capture_output=True, timeout=60)
    lint = (cp.stdout + cp.stderr).decode(errors="replace")
    assert cp.returncode == 0 and lint.strip() == "", f"promtool check metrics (exit {cp.returncode}):\n{lint}"
    stop(demo)  # (again at teardown, a no-op then): its rings must be gone once it has stopped
    assert leftover_rings(work / "ledgers") == [], "the demo left its shm rings in /dev/shm"


def prom_value(prom_port: int, query: str) -> float | None:
    """The single instant value of ``query``, or None while there is no sample."""
    result = prom_query(prom_port, query)
    if not result:
        return None
    assert len(result) == 1, result
    return float(result[0]["value"][1])


@pytest.mark.timeout(360)
def test_prometheus_scrapes_the_stall_counter_rising(tmp_path: Path) -> None:
    prometheus = need("prometheus")
    port = free_port()
    prom_port = wait_for(lambda: (p := free_port()) != port and p, 10)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: watchdog\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{port}']\n"
    )
    prom_log = tmp_path / "prometheus.log"
    work = tmp_path / "w"  # start_agent's
    prom = agent = demo = None
    try:
        with open(prom_log, "wb") as log:
            prom = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=log,
                cwd=tmp_path,
                start_new_session=True,
            )
        agent, work = start_agent(tmp_path, port)
        agent_up(agent, port, tmp_path / "agent.log")
        try:
            wait_for(lambda: prom is not None and prom.poll() is None and get(prom_port, "/-/ready")[0] == 200, 60)
            # scraped at least once, healthy, and the counter is there at 0 before any fault
            wait_for(lambda: prom_value(prom_port, 'up{job="watchdog"}') == 1, 60)
            wait_for(lambda: prom_value(prom_port, STALLS) is not None, 30)
        except AssertionError:
            raise AssertionError(f"prometheus did not scrape the agent:\n{tail(prom_log)}") from None
        before = prom_value(prom_port, STALLS)
        assert before == 0, before
        demo = start_hanging_demo(tmp_path, work)
        incidents = wait_incident(port, tmp_path / "demo.log")
        assert incidents[0]["verdict"] == "host_hang", incidents
        try:
            after = wait_for(lambda: (v := prom_value(prom_port, STALLS)) is not None and v >= 1 and v, 30)
        except AssertionError:
            raise AssertionError(
                "prometheus never saw watchdog_stalls_detected_total >= 1: "
                f"{prom_query(prom_port, 'watchdog_stalls_detected_total')}\n{tail(prom_log)}"
            ) from None
        assert after == 1, after  # one stall, one incident
        rose = prom_value(prom_port, f"increase({STALLS}[1m])")
        assert rose is not None and rose > 0, rose
        hung = wait_for(lambda: prom_value(prom_port, 'watchdog_incidents_total{verdict="host_hang"}'), 30)
        assert hung == 1, hung
        assert prom_value(prom_port, 'up{job="watchdog"}') == 1
    finally:
        if demo is not None:
            stop(demo)
        if agent is not None:
            stop(agent)
        if prom is not None:
            stop(prom, first=signal.SIGTERM)
    assert leftover_rings(work / "ledgers") == [], "the demo left its shm rings in /dev/shm"
