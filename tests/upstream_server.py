"""A tiny deterministic OpenAI-like server for the resuming proxy's tests (stdlib + the demo's tokens).

Run it as its own process: ``python tests/upstream_server.py --port P`` (``--port 0`` picks one);
it prints ``PORT <n>`` once it listens.

Generation rule: the next token is a function of the *whole text before it* (prompt plus the tokens
generated so far): the demo engine's own rule
(``watchdog/demo/tokens.py``). So continuing from ``prompt + text streamed so far`` with fewer
``max_tokens`` yields exactly the rest of the uninterrupted completion: a stream the proxy resumed
after a restart can be checked against a fault-free run word for word.

Endpoints: ``/health``, ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (streamed
as SSE with one token per chunk, or not), ``/echo`` (any method: what the request looked like) and
``/stats`` (requests started / in flight / completed, client disconnects seen). On SIGTERM it fails
its open requests the way vLLM does when its engine dies (an SSE ``data: {"error": ...}`` event and
``[DONE]``, or a 500) and exits. ``--token-delay``
(default 20 ms) is slept before each token and ``--prefill-delay`` before the first one, checking
for a client disconnect all along.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from watchdog.demo.tokens import continue_text, next_token

MODEL = "test-model"


def chat_prompt(messages: list[dict[str, Any]]) -> str:
    return "".join(f"{m.get('role')}: {m.get('content')}\n" for m in messages)


class Disconnected(Exception):
    pass


class Terminating(Exception):
    pass


ENGINE_DEAD = {
    "message": "EngineCore encountered an issue (EngineDeadError)",
    "type": "InternalServerError",
    "code": 500,
}


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values = {"started": 0, "in_flight": 0, "completed": 0, "disconnects": 0}

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.values[key] += n

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.values)


STATS = Stats()
TERMINATING = threading.Event()  # SIGTERM: like vLLM when its engine dies, fail open requests, then exit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "upstream-test"
    token_delay = 0.02
    prefill_delay = 0.0

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # ---- plumbing

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError as exc:
            raise Disconnected from exc

    def _event(self, obj: Any) -> None:
        self._chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    def _client_gone(self) -> bool:
        sock: socket.socket = self.connection
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _sleep(self, seconds: float) -> None:
        """Sleep, noticing a client that went away meanwhile."""
        end = time.monotonic() + seconds
        while True:
            if self._client_gone():
                raise Disconnected
            if TERMINATING.is_set():
                raise Terminating
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.01))

    # ---- routes

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/health":
            self._json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "test"}]})
        elif path == "/stats":
            self._json(200, STATS.snapshot())
        elif path == "/echo":
            self._echo()
        else:
            self._json(404, {"error": {"message": f"no route {path}", "type": "not_found", "code": 404}})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path == "/echo":
            self._echo()
            return
        if path not in ("/v1/completions", "/v1/chat/completions"):
            self._body()
            self._json(404, {"error": {"message": f"no route {path}", "type": "not_found", "code": 404}})
            return
        body = json.loads(self._body() or b"{}")
        max_tokens = body.get("max_tokens") or 16
        if max_tokens < 1:
            self._json(400, {"error": {"message": "max_tokens must be >= 1", "type": "invalid", "code": 400}})
            return
        chat = path == "/v1/chat/completions"
        if chat:
            prompts = [chat_prompt(body["messages"])]
        else:
            prompts = [body["prompt"]] if isinstance(body["prompt"], str) else list(body["prompt"])
        STATS.add("started")
        STATS.add("in_flight")
        try:
            if body.get("stream"):
                self._stream(chat, prompts, max_tokens, body)
            else:
                self._complete(chat, prompts, max_tokens)
            STATS.add("completed")
        except Disconnected:
            STATS.add("disconnects")
            self.close_connection = True
        except Terminating:
            self.close_connection = True
            if body.get("stream"):  # headers are out: vLLM's error event, then [DONE]
                self._event({"error": ENGINE_DEAD})
                self._event(b"[DONE]")
                self._chunk(b"")
            else:
                self._json(500, {"error": ENGINE_DEAD})
        finally:
            STATS.add("in_flight", -1)

    def do_PUT(self) -> None:
        self._echo()

    def do_DELETE(self) -> None:
        self._echo()

    def _echo(self) -> None:
        parts = urlsplit(self.path)
        body = self._body()
        self._json(
            200,
            {
                "method": self.command,
                "path": parts.path,
                "query": parts.query,
                "headers": [[k.lower(), v] for k, v in self.headers.items()],
                "body": body.decode("utf-8", errors="replace"),
            },
        )

    def _complete(self, chat: bool, prompts: list[str], max_tokens: int) -> None:
        self._sleep(self.prefill_delay + self.token_delay * max_tokens)
        texts = ["".join(continue_text(p, max_tokens)) for p in prompts]
        usage = {
            "prompt_tokens": sum(len(p.split()) for p in prompts),
            "completion_tokens": max_tokens * len(prompts),
            "total_tokens": sum(len(p.split()) for p in prompts) + max_tokens * len(prompts),
        }
        if chat:
            choices: list[dict[str, Any]] = [
                {"index": 0, "message": {"role": "assistant", "content": texts[0]}, "finish_reason": "length"}
            ]
            obj = "chat.completion"
        else:
            choices = [
                {"index": i, "text": t, "logprobs": None, "finish_reason": "length"} for i, t in enumerate(texts)
            ]
            obj = "text_completion"
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self._json(
            200,
            {"id": cid, "object": obj, "created": int(time.time()), "model": MODEL, "choices": choices, "usage": usage},
        )

    def _stream(self, chat: bool, prompts: list[str], max_tokens: int, body: dict[str, Any]) -> None:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        texts = list(prompts)
        self._sleep(self.prefill_delay)
        for i in range(max_tokens):
            self._sleep(self.token_delay)
            last = i == max_tokens - 1
            for j in range(len(prompts)):
                tok = next_token(texts[j])
                texts[j] += tok
                if chat:
                    if i == 0:  # vLLM's first chunk: the role, no content
                        role = {"index": j, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        self._event({"id": cid, "object": obj, "created": created, "model": MODEL, "choices": [role]})
                    choice: dict[str, Any] = {
                        "index": j,
                        "delta": {"content": tok},
                        "logprobs": None,
                        "finish_reason": "length" if last else None,
                    }
                else:
                    choice = {"index": j, "text": tok, "logprobs": None, "finish_reason": "length" if last else None}
                self._event({"id": cid, "object": obj, "created": created, "model": MODEL, "choices": [choice]})
        if include_usage:
            prompt_tokens = sum(len(p.split()) for p in prompts)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": max_tokens * len(prompts),
                "total_tokens": prompt_tokens + max_tokens * len(prompts),
            }
            self._event({"id": cid, "object": obj, "created": created, "model": MODEL, "choices": [], "usage": usage})
        self._event(b"[DONE]")
        self._chunk(b"")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token-delay", type=float, default=0.02)
    ap.add_argument("--prefill-delay", type=float, default=0.0)
    args = ap.parse_args(argv)
    Handler.token_delay = args.token_delay
    Handler.prefill_delay = args.prefill_delay
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer((args.host, args.port), Handler)

    def on_sigterm(signum: int, frame: Any) -> None:
        TERMINATING.set()
        threading.Thread(target=lambda: (time.sleep(0.3), server.shutdown()), daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
