"""The product's HTTP clients through their transport seam (``transport=``): what each sends and how
each turns answers and failures into its own result. No processes; the end-to-end tests (agent's
Kubernetes actions, multinode, fallback, proxy) run the same code against real servers."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from watchdog.coordinator import AgentUnreachable, fetch_json
from watchdog.demo.httpclient import complete
from watchdog.kube import Kube, KubeError
from watchdog.supervisor.run import healthy


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


def test_kube_calls_carry_the_token_and_json(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("sa-token\n")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "GET":
            return httpx.Response(200, json={"metadata": {"uid": "u-1"}})
        return httpx.Response(201, json={})

    kube = Kube("https://k8s:6443/", token, None, "ns", "pod-0", transport=httpx.MockTransport(handler))
    kube.event("DeadlockDiagnosed", "x" * 2000)
    kube.evict()
    assert [(r.method, r.url.path) for r in seen] == [
        ("GET", "/api/v1/namespaces/ns/pods/pod-0"),
        ("POST", "/api/v1/namespaces/ns/events"),
        ("POST", "/api/v1/namespaces/ns/pods/pod-0/eviction"),
    ]
    assert {r.headers["authorization"] for r in seen} == {"Bearer sa-token"}
    event = json.loads(seen[1].content)
    assert event["involvedObject"]["uid"] == "u-1" and len(event["message"]) == 1024
    assert seen[1].headers["content-type"] == "application/json"
    assert json.loads(seen[2].content)["kind"] == "Eviction"


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (lambda r: httpx.Response(403, text="forbidden: evictions"), "HTTP 403 forbidden: evictions"),
        (refused, "Connection refused"),
    ],
)
def test_kube_failures_are_one_kube_error(tmp_path: Path, handler: object, message: str) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    kube = Kube("http://k8s", token, None, "ns", "pod", transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
    with pytest.raises(KubeError, match=message):
        kube.evict()


def test_health_check_is_a_200_on_slash_health() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(str(request.url))
        return httpx.Response(200 if request.url.port == 1 else 503)

    assert healthy("http://h:1/v1", transport=httpx.MockTransport(handler))
    assert not healthy("http://h:2", transport=httpx.MockTransport(handler))
    assert not healthy("http://h:3", transport=httpx.MockTransport(refused))
    assert paths == ["http://h:1/health", "http://h:2/health"]


def test_coordinator_pull_answers_or_one_line_reason() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/ok":
            assert request.headers["authorization"] == "Bearer tok"
            return httpx.Response(200, json={"progress": 3})
        if request.url.path == "/bad":
            return httpx.Response(200, content=b"not json")
        return httpx.Response(401)

    mock = httpx.MockTransport(handler)
    assert fetch_json("http://a/ok", "tok", 1.0, mock) == {"progress": 3}
    with pytest.raises(AgentUnreachable, match=r"^http://a/denied: HTTP 401 Unauthorized$"):
        fetch_json("http://a/denied", "tok", 1.0, mock)
    with pytest.raises(AgentUnreachable, match=r"^http://a/bad: "):
        fetch_json("http://a/bad", "tok", 1.0, mock)
    with pytest.raises(AgentUnreachable, match=r"Connection refused"):
        fetch_json("http://a/ok", "", 1.0, httpx.MockTransport(refused))


def test_demo_client_reads_a_stream_and_names_its_failures() -> None:
    def sse(*events: bytes) -> httpx.Response:
        body = b"".join(b"data: " + e + b"\n\n" for e in events)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    def handler(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["prompt"]
        if prompt == "ok":
            return sse(b'{"choices":[{"text":"a"}]}', b'{"choices":[{"text":"b"}]}', b"[DONE]")
        if prompt == "cut":
            return sse(b'{"choices":[{"text":"a"}]}')
        if prompt == "err":
            return sse(b'{"error":{"type":"watchdog_restart"}}', b"[DONE]")
        return httpx.Response(503)

    mock = httpx.MockTransport(handler)
    assert complete("http://s", "ok", 2, 5.0, transport=mock) == ("ab", "")
    assert complete("http://s", "cut", 2, 5.0, transport=mock) == ("a", "stream ended without [DONE]")
    assert complete("http://s", "err", 2, 5.0, transport=mock) == ("", "error event: watchdog_restart")
    assert complete("http://s", "503", 2, 5.0, transport=mock) == ("", "http 503")
    assert complete("http://s", "ok", 2, 5.0, transport=httpx.MockTransport(refused)) == ("", "ConnectError")
