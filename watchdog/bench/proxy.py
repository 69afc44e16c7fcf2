"""``watchdog bench proxy``: what the resuming proxy costs on the request path.

A real upstream (a minimal OpenAI-shaped SSE server on asyncio streams, in its own process, so that
its cost is the same with and without the proxy) and the real :class:`ResumingProxy` (in its own
process, so that its RSS can be read alone) are started; the client (httpx, in this process) then
measures, each time straight to the upstream and through the proxy:

* added latency per request: median of sequential non-streamed requests (one token each);
* added latency per token: median time of sequential streams divided by their tokens;
* streams/s at a given concurrency (default 128): completed streams per second over a window;
* memory per open stream: the proxy's RSS growth while N streams are held open, divided by N;
* the proxy's CPU time (user + system, all its threads) per request, per token of the sequential
  streams (their requests' share included) and per stream of the throughput runs: the cost itself,
  where the latencies above also hold the waits for a core on a loaded machine.

Every stream is checked to arrive whole (all its tokens, then ``[DONE]``): a fast but lossy proxy
does not get a figure.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

import httpx
import psutil

__all__ = ["bench_proxy"]

_TOKEN = " tok"


# --------------------------------------------------------------------------------------------------
# the upstream: as little work per token as a server can do, so the proxy's share shows


def _chunk(i: int, last: bool, ids: bool) -> bytes:
    choice = {
        "index": 0,
        "text": _TOKEN,
        "logprobs": None,
        "finish_reason": "length" if last else None,
        "token_ids": [i] if ids else None,
    }
    obj = {"id": "cmpl-bench", "object": "text_completion", "created": 0, "model": "bench", "choices": [choice]}
    if ids and i == 0:
        choice["prompt_token_ids"] = [1, 2, 3]
    data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            target = line.split(b" ")[1] if line.count(b" ") >= 2 else b"/"
            length = 0
            while True:
                header = await reader.readline()
                if header in (b"\r\n", b"\n", b""):
                    break
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip() or b"0")
            req: Any = json.loads(await reader.readexactly(length)) if length else {}
            if target == b"/health" or not isinstance(req, dict):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                continue
            tokens = int(req.get("max_tokens", 16))
            delay = float(req.get("bench_token_delay", 0.0))
            ids = bool(req.get("return_token_ids"))
            if not req.get("stream"):
                body = json.dumps({"id": "cmpl-bench", "choices": [{"index": 0, "text": _TOKEN * tokens}]}).encode()
                head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
                writer.write(head + body)
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(tokens):
                await asyncio.sleep(delay)  # one token per event loop turn, like an engine's steps
                writer.write(_chunk(i, i == tokens - 1, ids))
                await writer.drain()
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
        pass
    finally:
        writer.close()


def _upstream_main(ports: Queue[int], stop: Event) -> None:
    async def main() -> None:
        open_: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            open_[task] = writer
            try:
                await _serve_one(reader, writer)
            finally:
                del open_[task]

        server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=4096)
        ports.put(server.sockets[0].getsockname()[1])
        while not stop.is_set():
            await asyncio.sleep(0.2)
        server.close()
        # The proxy keeps idle connections: end them, so that their handlers return rather than
        # being cancelled by asyncio.run (which asyncio's stream protocol reports as an error).
        for writer in list(open_.values()):
            writer.close()
        if open_:
            await asyncio.wait(list(open_), timeout=5.0)

    asyncio.run(main())


def _proxy_main(upstream: str, ports: Queue[int], stop: Event) -> None:
    from watchdog.supervisor.proxy import ResumingProxy, UpstreamGate

    proxy = ResumingProxy(UpstreamGate(upstream), "127.0.0.1", 0, resume_timeout_s=30.0)
    proxy.start()
    ports.put(proxy.port)
    stop.wait()
    proxy.stop()


# --------------------------------------------------------------------------------------------------
# the client


def _body(tokens: int, stream: bool, delay: float = 0.0) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "bench", "prompt": "bench", "max_tokens": tokens, "stream": stream}
    if delay:
        body["bench_token_delay"] = delay
    return body


async def _stream(client: httpx.AsyncClient, url: str, tokens: int) -> float:
    t0 = time.perf_counter()
    got = 0
    async with client.stream("POST", url + "/v1/completions", json=_body(tokens, True)) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                break
            if line.startswith("data: "):
                choice = json.loads(line[6:])["choices"][0]
                if choice["text"] != _TOKEN or choice.get("token_ids") is not None:
                    raise RuntimeError(f"unexpected chunk {line!r}")
                got += 1
    if got != tokens:
        raise RuntimeError(f"a stream brought {got} of {tokens} tokens")
    return time.perf_counter() - t0


async def _request(client: httpx.AsyncClient, url: str) -> float:
    t0 = time.perf_counter()
    resp = await client.post(url + "/v1/completions", json=_body(1, False))
    resp.raise_for_status()
    if resp.json()["choices"][0]["text"] != _TOKEN:
        raise RuntimeError(f"unexpected answer {resp.text!r}")
    return time.perf_counter() - t0


async def _streams_per_s(
    client: httpx.AsyncClient, url: str, concurrency: int, tokens: int, seconds: float
) -> tuple[float, int]:
    """(streams/s, streams completed)."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await _stream(client, url, tokens)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - t0), done


async def _rss_per_stream(client: httpx.AsyncClient, url: str, proxy_pid: int, n: int) -> float:
    """KiB of proxy RSS per stream held open (each has had its first token)."""
    proc = psutil.Process(proxy_pid)
    before = proc.memory_info().rss
    opened = 0
    all_open = asyncio.Event()

    async def hold() -> None:
        nonlocal opened
        body = _body(1_000_000, True, delay=0.5)
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            resp.raise_for_status()
            first = True
            async for _ in resp.aiter_lines():
                if first:
                    first = False
                    opened += 1
                    if opened == n:
                        all_open.set()

    tasks = [asyncio.ensure_future(hold()) for _ in range(n)]
    try:
        waiter = asyncio.ensure_future(all_open.wait())
        done, _ = await asyncio.wait({waiter, *tasks}, timeout=120.0, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            for t in done:
                t.result()  # a failed stream says why
            raise RuntimeError(f"only {opened} of {n} streams opened")
        await asyncio.sleep(1.0)
        after = proc.memory_info().rss
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return float(after - before) / 1024 / n


async def _measure(
    direct: str,
    proxied: str,
    proxy_pid: int,
    *,
    requests: int,
    tokens: int,
    concurrency: int,
    stream_tokens: int,
    seconds: float,
    repeats: int,
    open_streams: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=max(concurrency, 16))
    timeout = httpx.Timeout(120.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        for url in (direct, proxied):  # warm-up: connections, imports, the proxy's first requests
            for _ in range(20):
                await _stream(client, url, 8)
                await _request(client, url)
        say(f"bench proxy: {open_streams} streams held open through the proxy")
        kib = await _rss_per_stream(client, proxied, proxy_pid, open_streams)
        say(f"bench proxy: {requests} sequential requests and {requests} streams of {tokens} tokens, each way")
        lat: dict[str, list[float]] = {"req_direct": [], "req_proxy": [], "tok_direct": [], "tok_proxy": []}
        cpu = {"request": 0.0, "stream": 0.0, "throughput": 0.0}  # proxy CPU seconds while it served them
        proc = psutil.Process(proxy_pid)
        for _ in range(requests):  # interleaved, so that load from elsewhere hits both alike
            lat["req_direct"].append(await _request(client, direct))
            c0 = _cpu_s(proc)
            lat["req_proxy"].append(await _request(client, proxied))
            cpu["request"] += _cpu_s(proc) - c0
            lat["tok_direct"].append(await _stream(client, direct, tokens) / tokens)
            c0 = _cpu_s(proc)
            lat["tok_proxy"].append(await _stream(client, proxied, tokens) / tokens)
            cpu["stream"] += _cpu_s(proc) - c0
        rates: dict[str, list[float]] = {"direct": [], "proxy": []}
        streams = 0
        for i in range(repeats):
            say(f"bench proxy: {seconds:g} s of {concurrency} concurrent streams each way ({i + 1}/{repeats})")
            rates["direct"].append((await _streams_per_s(client, direct, concurrency, stream_tokens, seconds))[0])
            c0 = _cpu_s(proc)
            rate, done = await _streams_per_s(client, proxied, concurrency, stream_tokens, seconds)
            cpu["throughput"] += _cpu_s(proc) - c0
            rates["proxy"].append(rate)
            streams += done
    med = {k: statistics.median(v) for k, v in lat.items()}
    return {
        "request_ms_direct": round(med["req_direct"] * 1e3, 3),
        "request_ms_proxy": round(med["req_proxy"] * 1e3, 3),
        "added_ms_per_request": round((med["req_proxy"] - med["req_direct"]) * 1e3, 3),
        "token_us_direct": round(med["tok_direct"] * 1e6, 1),
        "token_us_proxy": round(med["tok_proxy"] * 1e6, 1),
        "added_us_per_token": round((med["tok_proxy"] - med["tok_direct"]) * 1e6, 1),
        "concurrency": concurrency,
        "streams_per_s_direct": round(statistics.median(rates["direct"]), 1),
        "streams_per_s_proxy": round(statistics.median(rates["proxy"]), 1),
        "open_streams": open_streams,
        "proxy_rss_kib_per_open_stream": round(kib, 1),
        "proxy_cpu_ms_per_request": round(cpu["request"] / requests * 1e3, 3),
        "proxy_cpu_us_per_token": round(cpu["stream"] / (requests * tokens) * 1e6, 1),
        "proxy_cpu_ms_per_stream_at_concurrency": round(cpu["throughput"] / max(streams, 1) * 1e3, 3),
    }


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def bench_proxy(
    *,
    requests: int = 200,
    tokens: int = 64,
    concurrency: int = 128,
    stream_tokens: int = 16,
    seconds: float = 5.0,
    repeats: int = 3,
    open_streams: int = 512,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Start an upstream and a proxy (two processes), measure, stop both; returns the figures."""
    if min(requests, tokens, concurrency, stream_tokens, repeats, open_streams) < 1 or seconds <= 0:
        raise ValueError("every count must be >= 1 and --seconds > 0")
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    ports: Queue[int] = ctx.Queue()
    procs: list[BaseProcess] = []
    try:
        up = ctx.Process(target=_upstream_main, args=(ports, stop), daemon=True)
        up.start()
        procs.append(up)
        direct = f"http://127.0.0.1:{ports.get(timeout=60)}"
        px = ctx.Process(target=_proxy_main, args=(direct, ports, stop), daemon=True)
        px.start()
        procs.append(px)
        proxied = f"http://127.0.0.1:{ports.get(timeout=60)}"
        assert px.pid is not None
        return asyncio.run(
            _measure(
                direct,
                proxied,
                px.pid,
                requests=requests,
                tokens=tokens,
                concurrency=concurrency,
                stream_tokens=stream_tokens,
                seconds=seconds,
                repeats=repeats,
                open_streams=open_streams,
                say=say,
            )
        )
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
