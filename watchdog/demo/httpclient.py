"""The bench client over HTTP: streamed ``/v1/completions`` requests, as the seed's client sends them.

Same workload as the in-process client (``Workload``: lengths, bounded concurrency, bursts with idle
gaps). Each request streams; a request succeeds when its stream ends with ``[DONE]`` and the text
is exactly what the demo model generates for that prompt (``watchdog/demo/tokens.py``) — so a
stream that a proxy resumed across a restart counts only if it is the uninterrupted text.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

import httpx

from watchdog.demo.client import Workload
from watchdog.demo.tokens import MODEL, continue_text, make_prompt


@dataclass
class HttpResult:
    total: int
    succeeded: int = 0
    wrong_text: int = 0  # ended with [DONE] but not the expected text
    errors: dict[str, int] = field(default_factory=dict)  # failure reason -> count
    done: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def failed(self) -> int:
        return self.total - self.succeeded

    def count(self, ok: bool, reason: str = "") -> None:
        with self._lock:
            if ok:
                self.succeeded += 1
            elif reason == "wrong_text":
                self.wrong_text += 1
            else:
                self.errors[reason] = self.errors.get(reason, 0) + 1


def complete(
    base_url: str,
    prompt: str,
    max_tokens: int,
    timeout_s: float,
    model: str = MODEL,
    *,
    client: httpx.Client | None = None,
    transport: httpx.BaseTransport | None = None,
) -> tuple[str, str]:
    """Stream one completion; returns (text, "") or (text so far, failure reason).

    ``client``: one to reuse (its connections too); else one is made for this request, over ``transport``."""
    if client is None:
        with _client(timeout_s, transport) as own:
            return complete(base_url, prompt, max_tokens, timeout_s, model, client=own)
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,  # exactly max_tokens (vLLM)
        "temperature": 0,  # greedy: a resumed stream can be checked against an uninterrupted run (vLLM)
    }
    text = ""
    try:
        with client.stream("POST", base_url.rstrip("/") + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return text, f"http {resp.status_code}"
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:].strip()
                if data == "[DONE]":
                    return text, ""
                event = json.loads(data)
                if "error" in event:
                    return text, f"error event: {event['error'].get('type', '?')}"
                for choice in event.get("choices", []):
                    text += choice.get("text") or ""
            return text, "stream ended without [DONE]"
    except (httpx.HTTPError, ValueError) as exc:
        return text, type(exc).__name__


def _client(timeout_s: float, transport: httpx.BaseTransport | None = None) -> httpx.Client:
    # plain http to the demo / vLLM server: no CA bundle to load (verify=False costs nothing)
    limits = httpx.Limits(keepalive_expiry=2.0)  # before the server's 5-s keep-alive closes it
    return httpx.Client(transport=transport, timeout=timeout_s, verify=False, trust_env=False, limits=limits)


def run_http_client(
    workload: Workload, base_url: str, stop: threading.Event, result: HttpResult, timeout_s: float
) -> None:
    """Send the workload with bounded concurrency, burst by burst; sets ``result.done`` at the end."""
    drawn = list(enumerate(workload.draw()))
    first = 0
    for i, size in enumerate(workload.burst_sizes()):
        if stop.is_set() or (i > 0 and workload.idle_gap_s > 0 and stop.wait(workload.idle_gap_s)):
            break
        _send_burst(drawn[first : first + size], workload, base_url, stop, result, timeout_s)
        first += size
    result.done.set()


def _send_burst(
    burst: list[tuple[int, tuple[int, int]]],
    workload: Workload,
    base_url: str,
    stop: threading.Event,
    result: HttpResult,
    timeout_s: float,
) -> None:
    todo = iter(burst)
    lock = threading.Lock()

    def worker() -> None:
        with _client(timeout_s) as client:  # one per thread: its connection is reused request after request
            while not stop.is_set():
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                rid, (prompt_len, output_len) = item
                prompt = make_prompt(prompt_len, workload.seed * 1_000_003 + rid)
                text, reason = complete(base_url, prompt, output_len, timeout_s, client=client)
                if not reason and text != "".join(continue_text(prompt, output_len)):
                    reason = "wrong_text"
                result.count(not reason, reason)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(workload.concurrency, len(burst)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def start_http_client(workload: Workload, base_url: str, stop: threading.Event, timeout_s: float) -> HttpResult:
    result = HttpResult(total=workload.requests)
    threading.Thread(
        target=run_http_client, args=(workload, base_url, stop, result, timeout_s), name="http-bench", daemon=True
    ).start()
    return result
