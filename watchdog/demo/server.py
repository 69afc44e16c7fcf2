"""The demo engine behind an OpenAI-compatible HTTP front, like ``vllm serve``.

``python -m watchdog.demo.server --tp 4 --port 8000 --workdir W [--cudagraph-mode M]`` starts the
demo EngineCore and its TP workers (``watchdog/demo/engine.py``), waits until the graphs are
captured, then serves ``POST /v1/completions`` (streamed as SSE, one token per chunk, or not),
``GET /v1/models``, ``GET /health`` (500 once the engine died) and ``GET /metrics`` with vLLM's own
metric names (``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:generation_tokens_total``, ``vllm:prompt_tokens_total``). This is the server that
``watchdog run -- ...`` supervises in the demo, so a restart is a real process tree going down and
coming up, and requests cross it over real HTTP.

Text: a prompt's tokens are its whitespace-separated words; generated tokens follow
``watchdog/demo/tokens.py`` (each token a function of all the text before it), so a completion
resumed from ``prompt + text so far`` continues it exactly. The engine reports after every step how
many tokens each request has; the front turns counts into text.

Ledgers go to ``--ledger-dir``, else ``$WATCHDOG_LEDGER_DIR`` (what ``watchdog run`` sets), else
``W/ledgers``. A fault is never on this command line: ``--fault-from SOCKET`` connects to the demo
orchestrator, which sends the plan over the socket (and hears back when the fault bit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from starlette.responses import JSONResponse, Response, StreamingResponse

from watchdog.demo.engine import EngineArgs
from watchdog.demo.faults import FaultPlan
from watchdog.demo.tokens import MODEL, model_text, prompt_tokens
from watchdog.keys import LADDER, DispatchConfig, default_capture_sizes
from watchdog.supervisor.proc import die_with_parent, spawn_args, spawn_entry
from watchdog.supervisor.tree import kill_tree, unlink_rings

DEFAULT_MAX_TOKENS = 16  # vLLM's and OpenAI's default for /v1/completions

# Events on a request's queue: ("tok", tokens generated so far), ("done", total), ("error", message).
Event = tuple[str, Any]


class Front:
    """Request bookkeeping between the HTTP handlers (event loop) and the engine (queues)."""

    def __init__(self, model: str, requests: Any, results: Any, engine: Any) -> None:
        self.model = model
        self.requests = requests
        self.results = results
        self.engine = engine
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pending: dict[int, asyncio.Queue[Event]] = {}
        self._rid = 0
        self._rid_lock = threading.Lock()
        self.dead = ""
        self.registry = CollectorRegistry()
        self.m_running = Gauge(
            "vllm:num_requests_running", "Requests in the running batch.", ["model_name"], registry=self.registry
        )
        self.m_waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting to be scheduled.", ["model_name"], registry=self.registry
        )
        self.m_gen = Counter("vllm:generation_tokens", "Generated tokens.", ["model_name"], registry=self.registry)
        self.m_prompt = Counter(
            "vllm:prompt_tokens", "Prefilled prompt tokens.", ["model_name"], registry=self.registry
        )
        for m in (self.m_running, self.m_waiting, self.m_gen, self.m_prompt):
            m.labels(model)
        self._counts: dict[int, int] = {}
        self.corrupt_from: dict[int, int] = {}  # rid -> first token sampled from mismatched reductions

    def submit(self, prompt: str, max_tokens: int) -> tuple[int, asyncio.Queue[Event]]:
        with self._rid_lock:
            rid = self._rid
            self._rid += 1
        q: asyncio.Queue[Event] = asyncio.Queue()
        self.pending[rid] = q
        n_prompt = prompt_tokens(prompt)
        self.m_prompt.labels(self.model).inc(n_prompt)
        self.requests.put((rid, n_prompt, max_tokens))
        return rid, q

    def release(self, rid: int, finished: bool) -> None:
        self.pending.pop(rid, None)
        self._counts.pop(rid, None)
        self.corrupt_from.pop(rid, None)
        if not finished and not self.dead:
            self.requests.put(("abort", rid))

    def _post(self, rid: int, event: Event) -> None:
        q = self.pending.get(rid)
        if q is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(q.put_nowait, event)

    def pump(self) -> None:
        """Engine results -> request queues (a thread). Ends when the engine is gone."""
        while True:
            try:
                item = self.results.get(timeout=0.5)
            except queue.Empty:
                if not self.engine.is_alive():
                    self._engine_died()
                    return
                continue
            if item[0] == "progress":
                _, running, waiting, tokens = item
                self.m_running.labels(self.model).set(running)
                self.m_waiting.labels(self.model).set(waiting)
                for rid, n, bad in tokens:
                    self.m_gen.labels(self.model).inc(max(0, n - self._counts.get(rid, 0)))
                    self._counts[rid] = n
                    if bad >= 0:
                        self.corrupt_from.setdefault(rid, bad)
                    self._post(rid, ("tok", n))
            elif item[0] != "control":
                rid, _ok, n, bad = item
                if bad >= 0:
                    self.corrupt_from.setdefault(rid, bad)
                self._post(rid, ("done", n))

    def _engine_died(self) -> None:
        self.dead = f"the engine process exited with {self.engine.exitcode}"
        for rid in list(self.pending):
            self._post(rid, ("error", self.dead))


def _chunk(cid: str, created: int, model: str, text: str, finish: str | None) -> bytes:
    body = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n".encode()


def _error(status: int, message: str, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": status}}, status_code=status)


def make_app(front: Front) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        front.loop = asyncio.get_running_loop()
        threading.Thread(target=front.pump, name="engine-results", daemon=True).start()
        yield

    app = FastAPI(title="watchdog demo server", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.get("/health")
    async def health() -> Response:
        if front.dead:
            return _error(500, front.dead, "engine_dead")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": front.model, "object": "model", "created": 0, "owned_by": "watchdog", "root": front.model}],
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(front.registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt.strip():
            return _error(400, "prompt must be a non-empty string")
        max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return _error(400, "max_tokens must be an integer >= 1")
        if body.get("model", front.model) != front.model:
            return _error(404, f"the model {body.get('model')!r} does not exist", "NotFoundError")
        if front.dead:
            return _error(500, front.dead, "engine_dead")
        rid, q = front.submit(prompt, max_tokens)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))
        n_prompt = prompt_tokens(prompt)
        if body.get("stream"):
            return StreamingResponse(
                _stream(front, rid, q, prompt, cid, created, n_prompt, usage_wanted), media_type="text/event-stream"
            )
        finished, bad = False, -1
        try:
            while True:
                kind, value = await q.get()
                if kind == "error":
                    return _error(500, str(value), "engine_dead")
                if kind == "done":
                    finished = True
                    n = int(value)
                    break
        finally:
            bad = front.corrupt_from.get(rid, -1)
            front.release(rid, finished)
        text = "".join(model_text(prompt, n, 0, bad))
        return JSONResponse(
            {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": front.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n},
            }
        )

    return app


async def _stream(
    front: Front,
    rid: int,
    q: asyncio.Queue[Event],
    prompt: str,
    cid: str,
    created: int,
    n_prompt: int,
    usage_wanted: bool,
) -> AsyncIterator[bytes]:
    text, sent, finished = prompt, 0, False
    try:
        while True:
            kind, value = await q.get()
            if kind == "error":
                err = {"error": {"message": str(value), "type": "engine_dead", "code": 500}}
                yield f"data: {json.dumps(err)}\n\n".encode()
                return
            for tok in model_text(text, int(value) - sent, sent, front.corrupt_from.get(rid, -1)):
                text += tok
                sent += 1
                yield _chunk(cid, created, front.model, tok, None)
            if kind == "done":
                finished = True
                yield _chunk(cid, created, front.model, "", "length")
                if usage_wanted:
                    usage = {"prompt_tokens": n_prompt, "completion_tokens": sent, "total_tokens": n_prompt + sent}
                    final = {"id": cid, "object": "text_completion", "created": created, "model": front.model}
                    yield f"data: {json.dumps({**final, 'choices': [], 'usage': usage})}\n\n".encode()
                yield b"data: [DONE]\n\n"
                return
    finally:
        front.release(rid, finished)


# ---- the fault plan, over a socket ---------------------------------------------------------------


def receive_plan(path: str) -> tuple[FaultPlan, socket.socket]:
    """Connect to the orchestrator's socket and read the plan (one JSON line); the socket stays open."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    line = sock.makefile("rb").readline()
    sock.settimeout(None)
    plan = json.loads(line)
    return FaultPlan(plan["name"], int(plan["rank"]), plan.get("step")), sock


def _forward_bites(bites: Any, sock: socket.socket) -> None:
    while True:
        try:
            rank, ns = bites.get()
            sock.sendall(json.dumps({"bite_ns": ns, "rank": rank}).encode() + b"\n")
        except (OSError, EOFError, ValueError):
            return


# ---- main ---------------------------------------------------------------------------------------


def _compilation_config(text: str) -> dict[str, Any]:
    try:
        cfg = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
    if not isinstance(cfg, dict) or cfg.get("cudagraph_mode", LADDER[0]) not in LADDER:
        raise argparse.ArgumentTypeError(f"cudagraph_mode must be one of {', '.join(LADDER)}: {text!r}")
    return cfg


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m watchdog.demo.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (worker processes)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workdir", default=None, help="ledgers (unless --ledger-dir / $WATCHDOG_LEDGER_DIR) and stores")
    p.add_argument("--ledger-dir", default=None)
    p.add_argument("--cudagraph-mode", default="FULL_AND_PIECEWISE", choices=LADDER)
    p.add_argument(
        "-cc",
        "--compilation-config",
        type=_compilation_config,
        default=None,
        help="as vLLM's: JSON whose cudagraph_mode, if given, sets the mode (what `watchdog run` merges into)",
    )
    p.add_argument("--num-speculative-tokens", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=MODEL, help="the name served in /v1/models")
    p.add_argument("--fault-from", default=None, help="the demo orchestrator's socket that sends the fault plan")
    args = p.parse_args(argv)
    if args.compilation_config and "cudagraph_mode" in args.compilation_config:
        args.cudagraph_mode = args.compilation_config["cudagraph_mode"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    die_with_parent()
    # When the supervisor stops this tree, multiprocessing's resource tracker unlinks what the
    # killed engine and workers leave (queue semaphores, rings) -- its job -- and warns about each
    # kind; in a supervised restart that is noise, not news. It inherits this environment.
    os.environ.setdefault("PYTHONWARNINGS", "ignore:resource_tracker:UserWarning")
    import uvicorn

    workdir = Path(args.workdir or os.getcwd())
    ledger_dir = Path(args.ledger_dir or os.environ.get("WATCHDOG_LEDGER_DIR") or workdir / "ledgers")
    ledger_dir.mkdir(parents=True, exist_ok=True)
    try:
        plan, fault_sock = receive_plan(args.fault_from) if args.fault_from else (FaultPlan(), None)
    except (OSError, ValueError, KeyError) as exc:
        print(f"demo server: --fault-from {args.fault_from}: {exc}", file=sys.stderr)
        return 1
    q = 1 + args.num_speculative_tokens
    eargs = EngineArgs(
        tp=args.tp,
        workdir=str(workdir),
        ledger_dir=str(ledger_dir),
        dispatch=DispatchConfig(args.cudagraph_mode, default_capture_sizes(min(2 * args.max_num_seqs, 512), q), q),
        num_spec=args.num_speculative_tokens,
        seed=args.seed,
        max_num_seqs=args.max_num_seqs,
        progress=True,
    )
    ctx = mp.get_context("spawn")
    requests_q: Any = ctx.Queue()
    results_q: Any = ctx.Queue()
    bites_q: Any = ctx.Queue()
    ready_rx, ready_tx = ctx.Pipe(duplex=False)
    engine = ctx.Process(  # spawn_entry: dies with us from its first instruction, before heavy imports
        target=spawn_entry,
        args=spawn_args("watchdog.demo.engine:engine_main", (eargs, plan), (requests_q, results_q, bites_q, ready_tx)),
        name="demo-engine",
    )
    engine.start()
    if fault_sock is not None:
        threading.Thread(target=_forward_bites, args=(bites_q, fault_sock), daemon=True).start()
    try:
        if not ready_rx.poll(240):
            print("demo server: the engine did not become ready within 240 s", file=sys.stderr)
            return 1
        ready = ready_rx.recv()
        if "error" in ready:
            print(f"demo server: the engine failed to start: {ready['error']}", file=sys.stderr)
            return 1
        print(f"demo server: TP={args.tp} {args.cudagraph_mode} ready on {args.host}:{args.port}", file=sys.stderr)
        front = Front(args.model, requests_q, results_q, engine)
        uvicorn.run(
            make_app(front), host=args.host, port=args.port, log_level="warning", access_log=False,
            timeout_graceful_shutdown=2,
        )  # fmt: skip
        return 0
    finally:
        kill_tree(engine)
        unlink_rings(ledger_dir)
        for store in workdir.glob("pg-store-*"):
            store.unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
