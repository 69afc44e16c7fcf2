"""Runs inside a real-vLLM environment (tests/vllm_envs.py): vLLM's real ``MessageQueue`` between real
processes, laid out as a TP=3 ``MultiprocExecutor`` lays it out, with one worker made to stall.

This process is the engine: it writes the broadcast ring (``rpc_broadcast_mq``: 3 local readers) and
reads each worker's response ring (``worker_response_mq = MessageQueue(1, 1)``, created by the
worker); rank 0 is the output rank, the only one that replies, as in vLLM. Workers are forked (as
vLLM forks them when CUDA is not initialised). The plugin records what it records in vLLM: the engine
ledger's ``rings`` entry comes from the plugin's ``MultiprocExecutor._init_executor`` wrapper (here
around a stand-in original that sets ``rpc_broadcast_mq`` / ``response_mqs``), and each worker opens
its ledger through the plugin's state (so the agent can tell whose pid maps which ring).

Chunks are 64 KiB (vLLM's defaults would put 16-24 MiB chunks in /dev/shm); the layout is otherwise
vLLM's own. Scenarios (argv[1]):

  stop_reading  reader 2 stops reading after step 4. Rank 0 keeps replying, so the engine keeps
                broadcasting: phase ``reader_behind`` (reader 2 missed step 5), then the engine runs
                until ``enqueue`` times out on a full ring: phase ``broadcast_full`` (the writer-side
                "No available shared memory broadcast block" situation).
  no_reply      every reader reads step 3, rank 0 never replies: the engine's ``dequeue`` times out:
                phase ``awaiting_reply``.

Protocol: at each phase one ``STATE {json}`` line on stdout, then this process waits for one line on
stdin before going on (the test inspects the rings from outside meanwhile). At the end ``DONE``.
Everything it made is cleaned up (workers killed, segments unlinked) on any exit path.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from types import SimpleNamespace
from typing import Any

N = 3
CHUNK = 1 << 16
CHUNKS = 10
STUCK_READER = 2
STOP_AFTER = 4  # reader 2 reads steps 0..4, then stops
NO_REPLY_STEP = 3


def emit(tag: str, payload: dict[str, Any]) -> None:
    print(f"{tag} {json.dumps(payload)}", flush=True)


def worker(rank: int, handle: Any, conn: Any, scenario: str) -> None:
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    from collectors.vllm.state import STATE

    STATE.worker(lambda: (rank, N, {}))  # this worker's ledger: its pid labelled with its rank
    resp = MessageQueue(1, 1, max_chunk_bytes=CHUNK, max_chunks=CHUNKS)
    conn.send((resp.export_handle(), str(resp.buffer.shared_memory.name)))
    bq = MessageQueue.create_from_handle(handle, rank)
    bq.wait_until_ready()
    resp.wait_until_ready()
    while True:
        kind, step = bq.dequeue()
        if kind == "exit":
            return
        if scenario == "no_reply" and rank == 0 and step == NO_REPLY_STEP:
            time.sleep(3600)  # read the request, never reply
        if rank == 0:
            resp.enqueue(("ok", step))
        if scenario == "stop_reading" and rank == STUCK_READER and step == STOP_AFTER:
            time.sleep(3600)  # stop reading


def wait_go() -> None:
    if not sys.stdin.readline():
        raise SystemExit("test went away")


def main(scenario: str) -> None:
    import logging

    # vLLM's own messages (its "No available shared memory broadcast block found" among them) to
    # stderr, which the test keeps in a file. VLLM_RINGBUFFER_WARNING_INTERVAL comes from the test.
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    handler = logging.StreamHandler(sys.stderr)  # stdout carries the protocol; vLLM's default is stdout
    handler.setFormatter(logging.Formatter("%(levelname)s pid=%(process)d %(name)s.%(funcName)s: %(message)s"))
    vllm_logger = logging.getLogger("vllm")
    for h in list(vllm_logger.handlers):
        vllm_logger.removeHandler(h)
    vllm_logger.addHandler(handler)
    vllm_logger.setLevel(logging.INFO)
    vllm_logger.propagate = False

    from collectors.vllm import engine as engine_wrappers
    from collectors.vllm.hooks import Hook, Target
    from collectors.vllm.state import STATE

    names: list[str] = []
    procs: list[Any] = []
    bcast: Any = None
    try:
        bcast = MessageQueue(N, N, max_chunk_bytes=CHUNK, max_chunks=CHUNKS)
        names.append(str(bcast.buffer.shared_memory.name))
        handle = bcast.export_handle()
        ctx = mp.get_context("fork")
        conns = []
        for rank in range(N):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker, args=(rank, handle, child, scenario), daemon=True)
            p.start()
            procs.append(p)
            conns.append(parent)
        handles = []
        for c in conns:
            if not c.poll(120):
                raise TimeoutError("a worker did not start")
            h, name = c.recv()
            handles.append(h)
            names.append(name)
        bcast.wait_until_ready()
        responses = [MessageQueue.create_from_handle(h, 0) for h in handles]
        for r in responses:
            r.wait_until_ready()

        # The engine ledger, written by the plugin's own _init_executor wrapper.
        def init_executor(self: Any) -> None:
            self.rpc_broadcast_mq = bcast
            self.response_mqs = responses

        executor = SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=N))
        target = Target("vllm.v1.executor.multiproc_executor", "MultiprocExecutor._init_executor", (), "engine")
        engine_wrappers._init_executor(Hook(target), init_executor)(executor)
        rec = STATE.current_engine()
        base = {
            "scenario": scenario,
            "engine_pid": os.getpid(),
            "worker_pids": [p.pid for p in procs],
            "broadcast": names[0],
            "responses": names[1:],
            "engine_ledger": None if rec is None else str(rec.path),
        }

        if scenario == "stop_reading":
            for step in range(STOP_AFTER + 2):  # steps 0..5: reader 2 reads up to step 4
                bcast.enqueue(("step", step))
                assert responses[0].dequeue(timeout=30) == ("ok", step)
            time.sleep(0.5)  # readers 0 and 1 have set their flags for step 5 (they replied / are idle)
            emit("STATE", {**base, "phase": "reader_behind", "last_step": STOP_AFTER + 1})
            wait_go()
            step = STOP_AFTER + 2
            timed_out_at = None
            t0 = time.monotonic()
            while step < 100:
                try:
                    bcast.enqueue(("step", step), timeout=3)
                except TimeoutError:
                    timed_out_at = step
                    break
                assert responses[0].dequeue(timeout=30) == ("ok", step)
                step += 1
            emit(
                "STATE",
                {
                    **base,
                    "phase": "broadcast_full",
                    "enqueue_timeout_at_step": timed_out_at,
                    "waited_s": round(time.monotonic() - t0, 1),
                },
            )
            wait_go()
        else:
            timed_out_at = None
            for step in range(NO_REPLY_STEP + 1):
                bcast.enqueue(("step", step))
                try:
                    responses[0].dequeue(timeout=3)
                except TimeoutError:
                    timed_out_at = step
                    break
            emit("STATE", {**base, "phase": "awaiting_reply", "dequeue_timeout_at_step": timed_out_at})
            wait_go()
        emit("DONE", {})
    finally:
        for p in procs:
            if p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.join(10)
        from multiprocessing import resource_tracker

        for name in names:  # killed workers never unlink their response rings
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{name}")
            with contextlib.suppress(Exception):  # unlinked here: the tracker need not (it would warn)
                resource_tracker.unregister(f"/{name}", "shared_memory")
        if bcast is not None:  # nor vLLM's ShmRingBuffer.__del__ (it would raise FileNotFoundError)
            bcast.buffer.is_creator = False


if __name__ == "__main__":
    code = 0
    try:
        main(sys.argv[1])
    except BaseException as exc:
        print(f"ERROR {exc!r}", file=sys.stderr, flush=True)
        code = 1
    sys.stdout.flush()
    os._exit(code)  # no resource-tracker or zmq teardown: everything was cleaned up above
