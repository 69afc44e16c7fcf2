"""The resuming proxy against a real upstream process (tests/upstream_server.py), over real HTTP.

The upstream is SIGKILLed mid-request and restarted on the same port, the way the supervisor
restarts a deadlocked server; the client must see the same text as a fault-free run (the upstream's
next token is a function of the whole text before it, so a continuation is exact).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.upstream_server import chat_prompt, continue_text
from watchdog.supervisor.proxy import DEFAULT_COMPLETION_MAX_TOKENS, ResumingProxy, UpstreamGate, continuation_request

UPSTREAM_SCRIPT = Path(__file__).with_name("upstream_server.py")


# --------------------------------------------------------------------------------------------------
# helpers


class Upstream:
    """The test upstream as a separate process; restartable on the same port; close() reaps all."""

    def __init__(self, token_delay: float = 0.02, prefill_delay: float = 0.0) -> None:
        self.token_delay = token_delay
        self.prefill_delay = prefill_delay
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.all: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, prefill_delay: float | None = None) -> Upstream:
        argv = [sys.executable, str(UPSTREAM_SCRIPT), "--port", str(self.port)]
        argv += ["--token-delay", str(self.token_delay)]
        argv += ["--prefill-delay", str(self.prefill_delay if prefill_delay is None else prefill_delay)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
        self.all.append(proc)
        self.proc = proc
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("PORT "), f"upstream did not start: {line!r}"
        self.port = int(line.split()[1])
        wait_for(lambda: request(self.port, "GET", "/health")[0] == 200, 30, "upstream /health")
        return self

    def kill(self) -> None:
        proc = self.proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def terminate(self) -> None:
        proc = self.proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

    def stats(self) -> dict[str, int]:
        status, _, body = request(self.port, "GET", "/stats")
        assert status == 200
        result: dict[str, int] = json.loads(body)
        return result

    def close(self) -> None:
        for proc in self.all:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()
        assert all(p.returncode is not None for p in self.all), "orphan upstream process"


@contextlib.contextmanager
def deployment(
    token_delay: float = 0.02, prefill_delay: float = 0.0, resume_timeout_s: float = 120.0
) -> Iterator[tuple[Upstream, UpstreamGate, ResumingProxy]]:
    upstream = Upstream(token_delay, prefill_delay)
    proxy: ResumingProxy | None = None
    try:
        upstream.start()
        gate = UpstreamGate(upstream.url)
        proxy = ResumingProxy(gate, resume_timeout_s=resume_timeout_s)
        proxy.start()
        yield upstream, gate, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        upstream.close()


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if cond():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def request(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 120
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class SseClient:
    """A streaming request read event by event (http.client, like a plain OpenAI client)."""

    def __init__(self, port: int, path: str, body: dict[str, Any]) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()
        self.events: list[str] = []

    def next(self) -> str | None:
        """The next event's data, or None at the end of the body."""
        data: list[str] = []
        while True:
            line = self.resp.readline()
            if not line:
                assert not data, "stream ended inside an event"
                return None
            text = line.decode().rstrip("\r\n")
            if text == "":
                if data:
                    event = "\n".join(data)
                    self.events.append(event)
                    return event
                continue
            if text.startswith("data:"):
                data.append(text[5:].removeprefix(" "))

    def read_tokens(self, n: int) -> None:
        """Read until ``n`` token-carrying chunks have arrived."""
        while len(self.chunks_with_text()) < n:
            assert self.next() is not None, "stream ended early"

    def rest(self) -> list[str]:
        while self.next() is not None:
            pass
        return self.events

    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]

    def chunks_with_text(self) -> list[dict[str, Any]]:
        return [c for c in self.chunks() if c.get("choices") and _piece(c["choices"][0])]

    def text(self) -> str:
        return "".join(_piece(c["choices"][0]) for c in self.chunks() if c.get("choices"))

    def close(self) -> None:
        self.conn.close()


def _piece(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return str(choice["text"] or "")
    return str((choice.get("delta") or {}).get("content") or "")


def completion_body(prompt: str, max_tokens: int, stream: bool, **extra: Any) -> dict[str, Any]:
    return {"model": "test-model", "prompt": prompt, "max_tokens": max_tokens, "stream": stream, **extra}


def chat_body(content: str, max_tokens: int, stream: bool, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {"model": "test-model", "messages": messages, "max_tokens": max_tokens, "stream": stream, **extra}


def expected(prompt: str, max_tokens: int) -> str:
    return "".join(continue_text(prompt, max_tokens))


def restart(upstream: Upstream, gate: UpstreamGate, prefill_delay: float | None = None) -> None:
    """What the supervisor does: going_down() must already have been called; SIGKILL, start again, up()."""
    upstream.kill()
    time.sleep(0.3)  # the proxy notices and starts waiting for up()
    upstream.start(prefill_delay=prefill_delay)
    gate.up()


def assert_one_stream(client: SseClient) -> None:
    """Ordered, one [DONE] at the very end, one id and one created for all chunks."""
    assert client.events.count("[DONE]") == 1 and client.events[-1] == "[DONE]", client.events[-3:]
    chunks = client.chunks()
    assert len({c["id"] for c in chunks}) == 1, {c["id"] for c in chunks}
    assert len({c["created"] for c in chunks}) == 1


class Background:
    """Run a blocking call in a thread; result() re-raises its exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.value = fn()
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float = 120) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background call still running"
        if self.error is not None:
            raise self.error
        return self.value


# --------------------------------------------------------------------------------------------------
# no processes


@pytest.mark.timeout(30)
def test_gate_states_and_generation() -> None:
    gate = UpstreamGate("http://127.0.0.1:1/")
    assert gate.base_url == "http://127.0.0.1:1" and gate.state == "up" and gate.generation == 0
    assert gate.wait_up(0)
    gate.going_down()
    assert gate.generation == 1 and gate.state == "down"
    t0 = time.monotonic()
    assert not gate.wait_up(0.2)
    assert time.monotonic() - t0 >= 0.15
    waiter = Background(lambda: gate.wait_up(30))
    time.sleep(0.1)
    gate.up()
    assert waiter.result(10) is True
    gate.set_base_url("http://127.0.0.1:2")
    assert gate.base_url == "http://127.0.0.1:2"
    gate.going_down()
    waiter = Background(lambda: gate.wait_up(30))
    time.sleep(0.1)
    gate.gave_up()
    assert waiter.result(10) is False
    assert gate.generation == 2 and gate.state == "gave_up"


@pytest.mark.timeout(30)
def test_continuation_request_rules() -> None:
    body = completion_body("p", 10, True, min_tokens=4, stream_options={"include_usage": True})
    cont = continuation_request(body, " a b c", 3)
    assert isinstance(cont, dict)
    assert cont["prompt"] == "p a b c" and cont["max_tokens"] == 7 and cont["min_tokens"] == 1
    assert cont["stream_options"] == {"include_usage": True} and body["prompt"] == "p"
    default = continuation_request({"prompt": "p", "stream": True}, " a", 1)
    assert isinstance(default, dict) and default["max_tokens"] == DEFAULT_COMPLETION_MAX_TOKENS - 1
    unlimited = continuation_request(completion_body("p", 0, True) | {"max_tokens": None}, " a", 1)
    assert isinstance(unlimited, dict) and unlimited["max_tokens"] is None
    used_up = continuation_request(completion_body("p", 3, True), " a b c", 3)
    assert isinstance(used_up, dict) and used_up["max_tokens"] == 0
    for bad in (
        completion_body("p", 10, True, n=2),
        completion_body("p", 10, True, best_of=3),
        completion_body("p", 10, True, logprobs=1),
        completion_body("p", 10, True, echo=True),
        completion_body("p", 10, True) | {"prompt": ["p"]},
        completion_body("p", 10, True) | {"prompt": [1, 2, 3]},
        [1, 2],
    ):
        assert isinstance(continuation_request(bad, " a", 1), str), bad


def test_continuation_by_token_ids_is_exact_and_ids_stay_hidden() -> None:
    """With the server's token ids (vLLM's return_token_ids) a stream continues from ids, not text:
    a token that decodes to no text yet (half a UTF-8 character) is counted, and a token prompt works."""
    from watchdog.supervisor.proxy.policy import StreamState as _Stream
    from watchdog.supervisor.proxy.policy import hide_ids as _hide_ids

    s = _Stream()
    chunks = [
        {"id": "c", "choices": [{"text": "a", "token_ids": [7], "prompt_token_ids": [1, 2]}]},
        {"id": "c", "choices": [{"text": "", "token_ids": [200]}]},  # half a character: no text yet
        {"id": "c", "choices": [{"text": "\u00e9", "token_ids": [201]}]},
    ]
    for c in chunks:
        s.observe(c)
    assert s.total_tokens == 3 and s.token_prompt() == [1, 2, 7, 200, 201]
    cont = continuation_request(completion_body("p", 10, True), "".join(s.text), s.total_tokens, s.token_prompt())
    assert isinstance(cont, dict) and cont["prompt"] == [1, 2, 7, 200, 201] and cont["max_tokens"] == 7
    token_prompt = completion_body("p", 10, True) | {"prompt": [1, 2]}
    assert isinstance(continuation_request(token_prompt, "a", 1, [1, 2, 7]), dict)
    # a chunk without ids (another server): back to the text rule, which needs a string prompt
    s.observe({"id": "c", "choices": [{"text": "b"}]})
    assert s.token_prompt() is None and s.total_tokens == 4
    # vLLM primes its detokenizer with the continuation's prompt ids; where they end inside a
    # character its first delta can carry the whole decoded prompt: taken off, once
    s.begin_continuation(("p" + "a\u00e9b",))
    echoed = {"choices": [{"text": "pa\u00e9b x", "token_ids": [9]}]}
    s.strip_echo(echoed)
    assert echoed["choices"][0]["text"] == " x" and s.echo_guard == ()
    later = {"choices": [{"text": "pa\u00e9b", "token_ids": [9]}]}
    s.strip_echo(later)
    assert later["choices"][0]["text"] == "pa\u00e9b"  # only the first chunk of a continuation
    # the continuation starts inside a character: its first tokens decode to no text, and the echo
    # comes with the first text released, not with the first chunk
    s.begin_continuation(("p" + "a\u00e9b",))
    for chunk in (
        {"choices": [{"text": "", "token_ids": [10]}]},
        {"choices": [{"text": "pa\u00e9b\u00fc", "token_ids": [11]}]},
    ):
        s.strip_echo(chunk)
    assert chunk["choices"][0]["text"] == "\u00fc" and s.echo_guard == ()
    shown = {"choices": [{"text": "a", "token_ids": [7], "prompt_token_ids": [1, 2]}]}
    _hide_ids(shown)
    assert shown == {"choices": [{"text": "a", "token_ids": None, "prompt_token_ids": None}]}


@pytest.mark.timeout(60)
def test_unreachable_upstream_is_502_and_resume_timeout_is_503() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    gate = UpstreamGate(f"http://127.0.0.1:{dead_port}")
    proxy = ResumingProxy(gate, resume_timeout_s=1.0)
    try:
        proxy.start()
        status, headers, body = request(proxy.port, "POST", "/v1/completions", completion_body("p", 4, False))
        assert status == 502 and headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == 502
        gate.going_down()  # a restart that never comes back within resume_timeout_s
        t0 = time.monotonic()
        status, _, body = request(proxy.port, "POST", "/v1/completions", completion_body("p", 4, False))
        assert status == 503 and 0.9 <= time.monotonic() - t0 < 30
        assert json.loads(body)["error"]["type"] == "watchdog_restart"
        assert proxy.stats["resubmitted"] == 0 and proxy.stats["failed_unresumable"] == 1
    finally:
        proxy.stop()


# --------------------------------------------------------------------------------------------------
# in-process: the proxy's app driven through httpx.ASGITransport, its upstream an httpx.MockTransport


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def token_chunk(i: int, word: str, server: str, *, first: bool = False, last: bool = False) -> dict[str, Any]:
    """Token ``i`` (id 100 + i) as vLLM streams it with return_token_ids; ids and times per server."""
    choice: dict[str, Any] = {"index": 0, "text": word, "token_ids": [100 + i], "finish_reason": None}
    if last:
        choice["finish_reason"] = "length"
    if first:
        choice["prompt_token_ids"] = [1, 2, 3]
    return {"id": f"cmpl-{server}", "created": 1000 if server == "A" else 2000, "choices": [choice]}


class ScriptedStream(httpx.AsyncByteStream):
    """An upstream body: events, then (optionally) a hook and a failure, or a hang until cancelled."""

    def __init__(self, events: list[bytes], then: Callable[[], None] | None = None, fail: bool = False) -> None:
        self.events, self.then, self.fail = events, then, fail
        self.cancelled = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for event in self.events:
            yield event
        if self.then is not None:
            self.then()
        if self.fail:
            raise httpx.ReadError("connection reset by peer")
        try:
            await asyncio.Event().wait()  # an old server's connection that still looks alive
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def in_process(
    proxy: ResumingProxy, method: str, path: str, body: dict[str, Any], timeout_s: float = 20
) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=proxy.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            return await asyncio.wait_for(client.request(method, path, json=body), timeout_s)

    return asyncio.run(go())


def events_of(resp: httpx.Response) -> list[str]:
    return [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("failure", ["reset", "stale"])
def test_mid_stream_restart_continues_by_token_ids_in_process(failure: str) -> None:
    """Restart after 3 of 5 tokens: the old server's connection is reset, or stays open and is
    cancelled once the new server is up (a stale generation). The continuation is sent as token ids
    with the budget left; the client sees one stream, ids hidden, original id/created."""
    gate = UpstreamGate("http://upstream:8000/prefix")
    sent: list[httpx.Request] = []
    first: list[ScriptedStream] = []

    def restart() -> None:
        gate.going_down()
        asyncio.get_running_loop().call_later(0.05, gate.up)

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        headers = {"content-type": "text/event-stream"}
        if len(sent) == 1:
            events = [sse(token_chunk(i, w, "A", first=i == 0)) for i, w in enumerate(["a", "b", "c"])]
            first.append(ScriptedStream(events, then=restart, fail=failure == "reset"))
            return httpx.Response(200, headers=headers, stream=first[0])
        rest = [sse(token_chunk(3, "d", "B")), sse(token_chunk(4, "e", "B", last=True)), b"data: [DONE]\n\n"]
        return httpx.Response(200, headers=headers, stream=ScriptedStream(rest, fail=True))

    proxy = ResumingProxy(gate, resume_timeout_s=10, transport=httpx.MockTransport(handler))
    resp = in_process(proxy, "POST", "/v1/completions", completion_body("p", 5, True))
    events = events_of(resp)
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    assert resp.status_code == 200 and events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abcde"
    assert {c["id"] for c in chunks} == {"cmpl-A"} and {c["created"] for c in chunks} == {1000}
    assert all(c["choices"][0]["token_ids"] is None for c in chunks)  # asked for by the proxy only
    assert [str(r.url) for r in sent] == ["http://upstream:8000/prefix/v1/completions"] * 2
    assert json.loads(sent[0].content)["return_token_ids"] is True
    cont = json.loads(sent[1].content)
    assert cont["prompt"] == [1, 2, 3, 100, 101, 102] and cont["max_tokens"] == 2
    assert first[0].cancelled == (failure == "stale")
    assert proxy.stats["forwarded"] == 1 and proxy.stats["resumed_mid_stream"] == 1


@pytest.mark.timeout(30)
def test_headers_pass_through_without_additions_in_process() -> None:
    """The upstream sees the client's headers (no hop-by-hop ones, no httpx defaults), its own Host."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, headers={"x-up": "1", "connection": "close"}, content=b'{"ok":1}')

    proxy = ResumingProxy(UpstreamGate("http://upstream:9"), transport=httpx.MockTransport(handler))

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy.app), base_url="http://p") as c:
            hdrs = {"x-custom": "yes", "connection": "x-drop", "x-drop": "1", "user-agent": "client/1"}
            return await c.put("/echo?a=1", content=b"raw", headers=hdrs)

    resp = asyncio.run(go())
    assert resp.status_code == 201 and resp.content == b'{"ok":1}' and resp.headers["x-up"] == "1"
    assert "connection" not in resp.headers
    (req,) = seen
    assert str(req.url) == "http://upstream:9/echo?a=1" and req.content == b"raw"
    names = {k.lower(): v for k, v in req.headers.items()}
    assert names["x-custom"] == "yes" and names["user-agent"] == "client/1" and names["host"] == "upstream:9"
    assert "x-drop" not in names and "connection" not in names


@pytest.mark.timeout(30)
def test_non_stream_resubmitted_and_unrelated_failure_is_502_in_process() -> None:
    gate = UpstreamGate("http://upstream:9")
    calls: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:  # the watchdog restarts the server while the request is in flight
            gate.going_down()
            asyncio.get_running_loop().call_later(0.05, gate.up)
            raise httpx.ConnectError("connection refused")
        if len(calls) == 2:
            return httpx.Response(200, json={"choices": [{"text": "ok"}]})
        raise httpx.ConnectError("connection refused")  # gate up, generation unchanged: not a restart

    proxy = ResumingProxy(gate, resume_timeout_s=10, transport=httpx.MockTransport(handler))
    resp = in_process(proxy, "POST", "/v1/completions", completion_body("p", 2, False))
    assert resp.status_code == 200 and resp.json() == {"choices": [{"text": "ok"}]}
    assert proxy.stats["resubmitted"] == 1
    resp = in_process(proxy, "POST", "/v1/completions", completion_body("p", 2, False))
    assert resp.status_code == 502 and resp.json()["error"]["type"] == "upstream_error"


# --------------------------------------------------------------------------------------------------
# a real upstream process


@pytest.mark.timeout(120)
def test_fault_free_passthrough() -> None:
    with deployment() as (upstream, _gate, proxy):
        direct = request(upstream.port, "GET", "/v1/models")
        via = request(proxy.port, "GET", "/v1/models")
        assert via[0] == 200 and json.loads(via[2]) == json.loads(direct[2])
        status, _, body = request(
            proxy.port, "PUT", "/echo?a=1&b=two", {"x": 1}, headers={"X-Custom": "yes", "Connection": "close"}
        )
        echo = json.loads(body)
        assert status == 200 and echo["method"] == "PUT" and echo["query"] == "a=1&b=two"
        assert json.loads(echo["body"]) == {"x": 1}
        names = dict(echo["headers"])
        assert names["x-custom"] == "yes" and "connection" not in names
        assert names["host"] == f"127.0.0.1:{upstream.port}"
        assert request(proxy.port, "GET", "/nope")[0] == 404

        prompt = "the watchdog watches"
        status, _, body = request(proxy.port, "POST", "/v1/completions", completion_body(prompt, 12, False))
        assert status == 200 and json.loads(body)["choices"][0]["text"] == expected(prompt, 12)
        client = SseClient(proxy.port, "/v1/completions", completion_body(prompt, 12, True))
        try:
            assert client.resp.getheader("content-type", "").startswith("text/event-stream")
            client.rest()
        finally:
            client.close()
        assert client.text() == expected(prompt, 12) and len(client.chunks_with_text()) == 12
        assert_one_stream(client)
        assert proxy.stats == {
            "forwarded": 5,
            "resubmitted": 0,
            "resumed_mid_stream": 0,
            "failed_unresumable": 0,
            "client_cancelled": 0,
        }


@pytest.mark.timeout(60)
def test_client_connections_send_without_delay() -> None:
    """Accepted client connections have TCP_NODELAY: without it Nagle holds a small write (a response's
    body after its headers, a stream's next token) until the client's delayed ACK, ~40 ms each."""
    with deployment() as (_upstream, _gate, proxy), socket.create_connection(("127.0.0.1", proxy.port), 30) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        assert proxy._server is not None
        socks = [p.transport.get_extra_info("socket") for p in list(proxy._server.server_state.connections)]
        assert socks and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in socks)


@pytest.mark.timeout(180)
def test_completion_stream_resumed_mid_stream_after_restart() -> None:
    prompt = "rank 1 replays a padded graph"
    max_tokens = 100
    with deployment() as (upstream, gate, proxy):
        client = SseClient(
            proxy.port,
            "/v1/completions",
            completion_body(prompt, max_tokens, True, stream_options={"include_usage": True}),
        )
        try:
            client.read_tokens(10)
            gate.going_down()
            restart(upstream, gate)
            client.rest()
        finally:
            client.close()
        assert client.text() == expected(prompt, max_tokens)
        assert len(client.chunks_with_text()) == max_tokens
        assert_one_stream(client)
        usage = client.chunks()[-1]["usage"]
        assert usage["completion_tokens"] == max_tokens
        assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"]
        finishes = [c["choices"][0]["finish_reason"] for c in client.chunks() if c["choices"]]
        assert finishes[-1] == "length" and finishes.count("length") == 1
        stats = proxy.stats
        assert stats["resumed_mid_stream"] == 1 and stats["resubmitted"] == 0 and stats["failed_unresumable"] == 0

        fault_free = SseClient(proxy.port, "/v1/completions", completion_body(prompt, max_tokens, True))
        try:
            fault_free.rest()
        finally:
            fault_free.close()
        assert fault_free.text() == client.text()


@pytest.mark.timeout(180)
def test_pooled_connections_of_a_restarted_upstream_lose_and_repeat_nothing() -> None:
    """The proxy keeps upstream connections between requests. Those of a server that was killed and
    started again on the same port, with the gate up all along (not the watchdog's restart) or through
    going_down()/up() (the watchdog's), never cost a request: each is answered whole, and reaches the
    new server once."""
    prompt = "a server restarted under the pool"
    with deployment(token_delay=0.001) as (upstream, gate, proxy):

        def both() -> None:
            status, _, body = request(proxy.port, "POST", "/v1/completions", completion_body(prompt, 8, False))
            assert status == 200 and json.loads(body)["choices"][0]["text"] == expected(prompt, 8)
            client = SseClient(proxy.port, "/v1/completions", completion_body(prompt, 8, True))
            try:
                client.rest()
            finally:
                client.close()
            assert client.text() == expected(prompt, 8) and len(client.chunks_with_text()) == 8
            assert_one_stream(client)

        for watchdog_restart in (False, True):
            for each in [Background(both) for _ in range(4)]:  # several connections left in the pool
                each.result()
            if watchdog_restart:
                gate.going_down()
                restart(upstream, gate)
            else:
                upstream.kill()
                upstream.start()
            for _ in range(3):
                both()
            assert upstream.stats()["started"] == 6
        stats = proxy.stats
        assert stats["forwarded"] == 28 and stats["resubmitted"] == 0 and stats["failed_unresumable"] == 0


class KeepAliveServer:
    """A real HTTP/1.1 server that answers ``answers`` requests on each connection, keeping it open,
    then reads the next request on it and closes it unanswered (with ``answers=1``: a server closing
    an idle keep-alive connection just as a request is sent on it)."""

    def __init__(self, answers: int) -> None:
        self.answers = answers
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.answered = 0
        self.dropped = 0
        self.closed_by_client = 0
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn, conn.makefile("rb") as reader:
            for n in range(self.answers + 1):
                length = 0
                if not reader.readline():
                    self.closed_by_client += 1
                    return
                while (line := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                reader.read(length)
                if n == self.answers:
                    self.dropped += 1
                    return
                body = json.dumps({"choices": [{"text": "ok"}]}).encode()
                head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
                conn.sendall(head + body)
                self.answered += 1

    def close(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=30)
        self.sock.close()


def ok_request(port: int) -> None:
    status, _, body = request(port, "POST", "/v1/completions", completion_body("p", 1, False))
    assert status == 200 and json.loads(body) == {"choices": [{"text": "ok"}]}


@pytest.mark.timeout(60)
def test_a_request_that_meets_a_connection_closed_under_it_goes_again_on_a_new_one() -> None:
    server = KeepAliveServer(answers=1)
    proxy = ResumingProxy(UpstreamGate(f"http://127.0.0.1:{server.port}"))
    try:
        proxy.start()
        for _ in range(5):
            ok_request(proxy.port)
        # every request after the first met a kept connection the server then closed, and went again
        assert server.answered == 5 and server.dropped == 4 and server.connections == 5
        assert proxy.stats["forwarded"] == 5 and proxy.stats["resubmitted"] == 0
    finally:
        proxy.stop()
        server.close()


@pytest.mark.timeout(60)
def test_upstream_connections_are_kept_between_requests_and_closed_once_idle_too_long() -> None:
    server = KeepAliveServer(answers=100)
    proxy = ResumingProxy(UpstreamGate(f"http://127.0.0.1:{server.port}"))
    try:
        proxy.start()
        for _ in range(3):
            ok_request(proxy.port)
        assert server.connections == 1 and server.answered == 3
        time.sleep(1.5)  # longer than the proxy keeps an idle connection (1 s)
        ok_request(proxy.port)
        assert server.connections == 2 and server.dropped == 0
        wait_for(lambda: server.closed_by_client == 1, 10, "the proxy to close the connection it kept too long")
    finally:
        proxy.stop()
        server.close()


@pytest.mark.timeout(180)
def test_non_stream_resubmitted_after_restart_and_new_requests_wait_for_up() -> None:
    prompt = "the engine stalls at step 91"
    with deployment() as (upstream, gate, proxy):
        first = Background(lambda: request(proxy.port, "POST", "/v1/completions", completion_body(prompt, 150, False)))
        wait_for(lambda: upstream.stats()["in_flight"] == 1, 30, "the request to reach the upstream")
        gate.going_down()
        upstream.kill()
        # a request arriving while the server is down waits for it instead of failing
        second = Background(lambda: request(proxy.port, "POST", "/v1/completions", completion_body("late", 5, False)))
        time.sleep(0.3)
        upstream.start()
        gate.up()
        status, _, body = first.result()
        assert status == 200 and json.loads(body)["choices"][0]["text"] == expected(prompt, 150)
        status, _, body = second.result()
        assert status == 200 and json.loads(body)["choices"][0]["text"] == expected("late", 5)
        stats = proxy.stats
        assert stats["resubmitted"] == 1 and stats["forwarded"] == 2 and stats["resumed_mid_stream"] == 0


@pytest.mark.parametrize("kind", ["completions", "chat"])
@pytest.mark.timeout(180)
def test_stream_interrupted_before_first_token_is_resubmitted(kind: str) -> None:
    prompt = "prefill of a long prompt"
    path = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
    body = completion_body(prompt, 20, True) if kind == "completions" else chat_body(prompt, 20, True)
    with deployment(prefill_delay=60.0) as (upstream, gate, proxy):
        client = Background(lambda: SseClient(proxy.port, path, body))
        wait_for(lambda: upstream.stats()["in_flight"] == 1, 30, "the request to reach the upstream")
        gate.going_down()
        restart(upstream, gate, prefill_delay=0.0)
        sse: SseClient = client.result()
        try:
            sse.rest()
        finally:
            sse.close()
        text_prompt = prompt if kind == "completions" else chat_prompt(body["messages"])
        assert sse.text() == expected(text_prompt, 20)
        assert_one_stream(sse)
        if kind == "chat":
            roles = [i for i, c in enumerate(sse.chunks()) if c["choices"][0]["delta"].get("role")]
            assert roles == [0]  # the role chunk of the first attempt was held back, not repeated
        stats = proxy.stats
        assert stats["resubmitted"] == 1 and stats["resumed_mid_stream"] == 0 and stats["failed_unresumable"] == 0


@pytest.mark.parametrize("kind", ["chat", "logprobs"])
@pytest.mark.timeout(180)
def test_unresumable_stream_gets_error_event(kind: str) -> None:
    prompt = "collective mismatch"
    if kind == "chat":
        path, body = "/v1/chat/completions", chat_body(prompt, 200, True)
    else:
        path, body = "/v1/completions", completion_body(prompt, 200, True, logprobs=1)
    with deployment() as (upstream, gate, proxy):
        client = SseClient(proxy.port, path, body)
        try:
            client.read_tokens(5)
            gate.going_down()
            upstream.kill()
            events = client.rest()
        finally:
            client.close()
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        error = json.loads(events[-2])["error"]
        assert error["type"] == "watchdog_restart" and error["code"] == 503
        assert "interrupted by a watchdog restart and cannot be resumed safely" in error["message"]
        text_prompt = prompt if kind == "logprobs" else chat_prompt(body["messages"])
        assert expected(text_prompt, 200).startswith(client.text()) and len(client.chunks_with_text()) >= 5
        assert proxy.stats["failed_unresumable"] == 1 and proxy.stats["resumed_mid_stream"] == 0


@pytest.mark.timeout(180)
def test_crash_without_going_down_is_passed_through() -> None:
    prompt = "a crash nobody planned"
    with deployment() as (upstream, gate, proxy):
        # raw HTTP, to see the chunked framing: http.client's readline() hides a truncated body
        body = json.dumps(completion_body(prompt, 200, True)).encode()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as sock:
            head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            raw = b""
            while raw.count(b'"text":') < 5:
                data = sock.recv(65536)
                assert data, "stream ended early"
                raw += data
            upstream.kill()
            while data := sock.recv(65536):
                raw += data
        assert raw.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in raw.lower()
        assert not raw.endswith(b"0\r\n\r\n") and b"[DONE]" not in raw  # truncated like the upstream's
        upstream.start()
        pending = Background(
            lambda: request(proxy.port, "POST", "/v1/completions", completion_body(prompt, 200, False))
        )
        wait_for(lambda: upstream.stats()["in_flight"] == 1, 30, "the request to reach the upstream")
        upstream.kill()
        status, headers, body = pending.result()
        assert status == 502 and headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == 502
        assert gate.generation == 0
        stats = proxy.stats
        assert stats["resubmitted"] == 0 and stats["resumed_mid_stream"] == 0 and stats["failed_unresumable"] == 0


@pytest.mark.timeout(120)
def test_client_disconnect_cancels_the_upstream_request() -> None:
    with deployment() as (upstream, _gate, proxy):
        client = SseClient(proxy.port, "/v1/completions", completion_body("a client that leaves", 500, True))
        try:
            client.read_tokens(3)
            assert upstream.stats()["in_flight"] == 1
        finally:
            client.close()
        t0 = time.monotonic()
        wait_for(lambda: upstream.stats()["disconnects"] == 1, 10, "the upstream to see the disconnect")
        assert time.monotonic() - t0 < 5  # 500 tokens x 20 ms would take 10 s
        stats = upstream.stats()
        assert stats["in_flight"] == 0 and stats["completed"] == 0
        wait_for(lambda: proxy.stats["client_cancelled"] == 1, 10, "the proxy to count the cancellation")


@pytest.mark.timeout(180)
def test_gave_up_fails_waiting_requests_with_503() -> None:
    prompt = "no restart is coming"
    with deployment() as (upstream, gate, proxy):
        stream = SseClient(proxy.port, "/v1/completions", completion_body(prompt, 300, True))
        try:
            stream.read_tokens(3)
            plain = Background(
                lambda: request(proxy.port, "POST", "/v1/completions", completion_body(prompt, 300, False))
            )
            wait_for(lambda: upstream.stats()["in_flight"] == 2, 30, "both requests to reach the upstream")
            gate.going_down()
            upstream.kill()
            time.sleep(0.3)
            gate.gave_up()
            events = stream.rest()
        finally:
            stream.close()
        status, _, body = plain.result()
        assert status == 503 and json.loads(body)["error"]["type"] == "watchdog_gave_up"
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "watchdog_gave_up"
        status, _, body = request(proxy.port, "POST", "/v1/completions", completion_body(prompt, 4, False))
        assert status == 503 and "gave up" in json.loads(body)["error"]["message"]
        assert proxy.stats["failed_unresumable"] == 3


@pytest.mark.timeout(180)
def test_graceful_stop_error_event_and_500_are_resumed() -> None:
    """SIGTERM (the supervisor's first signal): vLLM-like error event / 500 while going down are not passed on."""
    prompt = "SIGTERM first, then SIGKILL"
    with deployment() as (upstream, gate, proxy):
        client = SseClient(proxy.port, "/v1/completions", completion_body(prompt, 100, True))
        try:
            client.read_tokens(10)
            plain = Background(
                lambda: request(proxy.port, "POST", "/v1/completions", completion_body(prompt, 150, False))
            )
            wait_for(lambda: upstream.stats()["in_flight"] == 2, 30, "both requests to reach the upstream")
            gate.going_down()
            upstream.terminate()
            upstream.start()
            gate.up()
            client.rest()
        finally:
            client.close()
        assert client.text() == expected(prompt, 100) and "error" not in "".join(client.events)
        assert_one_stream(client)
        status, _, body = plain.result()
        assert status == 200 and json.loads(body)["choices"][0]["text"] == expected(prompt, 150)
        stats = proxy.stats
        assert stats["resumed_mid_stream"] == 1 and stats["resubmitted"] == 1 and stats["failed_unresumable"] == 0
