"""`watchdog agent` as a separate process watching a separately running demo deployment, queried
over real HTTP: it catches the hang, /livez turns 503, the incident and metrics are served."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, get, start, stop, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


class FakeKubeApi:
    """The one edge that cannot exist here: a Kubernetes API server. Records what the agent asks."""

    def __init__(self) -> None:
        calls: list[tuple[str, str, str, Any]] = []
        self.calls = calls

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                calls.append(("GET", self.path, self.headers.get("Authorization", ""), None))
                self._answer(200, {"kind": "Pod", "metadata": {"name": "vllm-0", "uid": "uid-4242"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                calls.append(("POST", self.path, self.headers.get("Authorization", ""), body))
                self._answer(201, body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_agent_process_diagnoses_a_separate_deployment_over_http(tmp_path: Path) -> None:
    work = tmp_path / "w"
    (work / "ledgers").mkdir(parents=True)
    port = free_port()
    kube = FakeKubeApi()
    (tmp_path / "sa-token").write_text("sa-token-1\n")
    agent = start(
        ["agent", "--ledger-dir", str(work / "ledgers"), "--incidents-dir", str(tmp_path / "inc"), "--port", str(port),
         "--on-deadlock", "evict", "--kube-events", "--kube-api", f"http://127.0.0.1:{kube.port}",
         "--kube-token-file", str(tmp_path / "sa-token")],
        # the CLI's --port wins over the environment; the pod comes from the downward API's env
        env={"WATCHDOG_API_TOKEN": "s3cret", "WATCHDOG_PORT": "1", "WATCHDOG_POD_NAME": "vllm-0",
             "WATCHDOG_POD_NAMESPACE": "llm"},
    )  # fmt: skip
    demo = None
    try:
        assert wait_for(lambda: get(port, "/healthz")[0] == 200, 30)
        status, body = get(port, "/livez")
        assert status == 200 and json.loads(body)["deadlocked"] is False
        demo = start(
            ["demo", "--no-watch", "--tp", "2", "--fault", "host-hang", "--workdir", str(work), "--timeout", "120"]
        )
        incidents = wait_for(lambda: json.loads(get(port, "/v1/incidents")[1]), 120)
        assert len(incidents) == 1 and incidents[0]["verdict"] == "host_hang"
        assert incidents[0]["culprit_ranks"] == [1]
        status, body = get(port, "/livez")
        assert status == 503 and json.loads(body)["last_verdict"] == "host_hang"
        status, body = get(port, f"/v1/incidents/{incidents[0]['id']}")
        assert status == 200 and json.loads(body)["schema"] == "watchdog.diagnosis/v1"
        assert get(port, "/v1/incidents/nope")[0] == 404
        # the incident's page, linked from the summary, and the list of pages
        ident = incidents[0]["id"]
        assert incidents[0]["page"] == f"/incidents/{ident}"
        status, page = get(port, incidents[0]["page"])
        assert status == 200 and 'data-verdict="host_hang"' in page and 'class="lane culprit" data-rank="1"' in page
        status, listing = get(port, "/incidents")
        assert status == 200 and f'href="/incidents/{ident}"' in listing and "host_hang" in listing
        assert get(port, "/incidents/nope")[0] == 404
        assert (tmp_path / "inc" / ident / "incident.html").is_file()
        assert json.loads(get(port, "/v1/status")[1])["incidents"] == 1
        metrics = get(port, "/metrics")[1]
        assert 'watchdog_incidents_total{tp_group="tp0",verdict="host_hang"} 1.0' in metrics
        assert 'watchdog_deadlocked{tp_group="tp0"} 1.0' in metrics
        assert f'watchdog_incident_info{{culprit_ranks="1",incident="{ident}",step="' in metrics
        assert 'watchdog_stalls_detected_total{tp_group="tp0"} 1.0' in metrics
        for series in ("watchdog_rank_last_step", "watchdog_rank_open_step_age_seconds"):
            assert f'{series}{{rank="1",tp_group="tp0"}}' in metrics
        assert 'watchdog_ring_read_lag_chunks{rank="1",role="broadcast",tp_group="tp0"}' in metrics
        assert "watchdog_graph_dispatches_total{mode=" in metrics
        assert (tmp_path / "inc" / incidents[0]["id"] / "diagnosis.json").is_file()

        # Eviction mode: the pod's uid, an Event naming the verdict, then the Eviction (PDB-aware).
        # (The log's state changes, start-up and the stall among them, are Events too: picked by reason.)
        def incident_calls() -> list[Any] | None:
            posts = [c for c in kube.calls if c[0] == "POST"]
            at = next((i for i, c in enumerate(posts) if (c[3] or {}).get("reason") == "DeadlockDiagnosed"), None)
            return None if at is None or len(posts) <= at + 1 else [kube.calls[0], posts[at], posts[at + 1]]

        get_pod, event, eviction = wait_for(incident_calls, 30)
        assert {c[2] for c in kube.calls} == {"Bearer sa-token-1"}
        assert get_pod[:2] == ("GET", "/api/v1/namespaces/llm/pods/vllm-0")
        assert event[:2] == ("POST", "/api/v1/namespaces/llm/events")
        reasons = [c[3]["reason"] for c in kube.calls if c[1].endswith("/events")]
        assert reasons.index("WatchdogStarted") < reasons.index("StallDeclared") < reasons.index("DeadlockDiagnosed")
        assert event[3]["reason"] == "DeadlockDiagnosed" and event[3]["message"].startswith("host_hang: ")
        assert event[3]["involvedObject"] == {
            "apiVersion": "v1", "kind": "Pod", "name": "vllm-0", "namespace": "llm", "uid": "uid-4242"
        }  # fmt: skip
        assert eviction[:2] == ("POST", "/api/v1/namespaces/llm/pods/vllm-0/eviction")
        assert eviction[3] == {
            "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "vllm-0", "namespace": "llm"}
        }  # fmt: skip

        # Evidence for a coordinator: token-protected when a token is configured.
        assert get(port, "/v1/snapshot")[0] == 401
        status, body = get(port, "/v1/snapshot", token="s3cret")
        snap = json.loads(body)
        assert status == 200 and snap["schema"] == "watchdog.snapshot/v1"
        assert sorted(snap["ledgers"]) == ["engine.ledger", "rank000.ledger", "rank001.ledger"]
        assert set(snap["evidence"]["pids"]) == {"0", "1", "engine"}
        # Changing state needs the token; the forced diagnosis sees the same hang.
        assert get(port, "/v1/diagnose-now", method="POST")[0] == 401
        assert get(port, "/v1/diagnose-now", token="wrong", method="POST")[0] == 401
        status, body = get(port, "/v1/diagnose-now", token="s3cret", method="POST")
        assert status == 200 and json.loads(body)["verdict"] == "host_hang", body
        assert len(json.loads(get(port, "/v1/incidents")[1])) == 2
        paths = json.loads(get(port, "/openapi.json")[1])["paths"]
        assert {"/v1/snapshot", "/v1/diagnose-now", "/livez", "/metrics"} <= set(paths)
    finally:
        if demo is not None:
            stop(demo)
        stop(agent)
        kube.close()


def test_gpu_gauges_name_the_rank_whose_process_runs_on_each_gpu(tmp_path: Path) -> None:
    from tests.factory import Deployment
    from watchdog.agent import Agent
    from watchdog.evidence import EvidenceError
    from watchdog.evidence.gpus import FakeGpus
    from watchdog.metrics import AgentMetrics
    from watchdog.snapshot import Sources
    from watchdog.types import GpuInfo
    from watchdog.watcher import Watcher

    dep = Deployment(tmp_path, tp=1)  # rank 0's ledger is written by this process
    dep.decode_step(0, reqs=4)
    gpus = FakeGpus(
        (GpuInfo(0, 100.0, 612.5, 1980.0, pids=(os.getpid(),)), GpuInfo(1, 3.0, 81.0, 345.0, pids=(2**22 + 7,)))
    )

    def agent(source: FakeGpus) -> tuple[Agent, str]:
        a = Agent(Watcher(dep.dir, tmp_path / "inc", Sources(stacks=None, procs=None, gpus=source)), AgentMetrics("t"))
        a.step()
        return a, a.metrics.exposition().decode()

    _, text = agent(gpus)
    assert 'watchdog_gpu_utilization_percent{gpu="0",rank="0",tp_group="t"} 100.0' in text
    assert 'watchdog_gpu_power_watts{gpu="0",rank="0",tp_group="t"} 612.5' in text
    assert 'watchdog_gpu_utilization_percent{gpu="1",rank="",tp_group="t"} 3.0' in text
    _, text = agent(FakeGpus(error=EvidenceError("nvml", "NVML_ERROR_DRIVER_NOT_LOADED")))
    assert 'watchdog_scrape_errors_total{source="gpu",tp_group="t"} 1.0' in text
    assert "watchdog_gpu_utilization_percent{" not in text
