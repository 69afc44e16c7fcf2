"""``watchdog bench ...``: the benchmarks, each printing its figures (medians, ratios) as text or ``--json``.

Speed and memory targets live here rather than in timed unit tests; the heavy modules are imported
only when their command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from watchdog.cli_options import EXIT_ERROR, EXIT_OK, GroupedCommand, err
from watchdog.errors import UsageError, WatchdogError

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print figures.", rich_markup_mode=None)


@bench_app.command(cls=GroupedCommand, name="recorder")
def bench_recorder(
    records: Annotated[int, typer.Option(help="Records per timing run.")] = 20000,
    repeats: Annotated[int, typer.Option(help="Timing runs (median reported).")] = 7,
    tp: Annotated[int, typer.Option(help="TP size of the demo steps/s comparison (0 skips it).")] = 2,
    steps: Annotated[int, typer.Option(help="Demo steps per on/off run.")] = 300,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> int:
    """Ledger cost: ns per record (median), and demo steps/s with the ledger on vs off."""
    from watchdog.bench.detect import bench_recorder as run

    result = run(records=records, repeats=repeats, tp=tp, steps=steps, say=err)
    print(json.dumps(result) if as_json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return EXIT_OK


@bench_app.command(cls=GroupedCommand, name="plugin")
def bench_plugin(
    steps: Annotated[int, typer.Option(help="Timed decode steps per run.")] = 20000,
    repeats: Annotated[int, typer.Option(help="Timing runs (median reported).")] = 7,
    reqs: Annotated[int, typer.Option(help="Requests in the decode step (x 2 tokens, MTP=1).")] = 15,
    vllm: Annotated[
        bool, typer.Option("--vllm", help="On a real `vllm serve` instead: decode tokens/s with the plugin on vs off.")
    ] = False,
    vllm_exe: Annotated[
        str | None, typer.Option(help="--vllm, --wrappers: the `vllm` executable (default: on PATH).")
    ] = None,
    blocks: Annotated[int, typer.Option(help="--vllm: alternating blocks per arm (a server start each).")] = 3,
    requests: Annotated[int, typer.Option(help="--vllm: requests per timed block.")] = 64,
    concurrency: Annotated[int, typer.Option(help="--vllm: requests in flight.")] = 16,
    output_len: Annotated[int, typer.Option(help="--vllm: output tokens per request (ignore_eos).")] = 64,
    tp: Annotated[int, typer.Option(help="--vllm: tensor-parallel size.")] = 2,
    wrappers: Annotated[
        bool,
        typer.Option(
            "--wrappers",
            help="Instead: ns per call of the hooks' plain wrappers vs exact-signature ones around vLLM's real "
            "targets, per step and as a share of a step.",
        ),
    ] = False,
    ledgers: Annotated[
        Path | None, typer.Option(help="--wrappers: a real server's ledger directory (step time, calls per step).")
    ] = None,
    step_ms: Annotated[float, typer.Option(help="--wrappers: the GPU decode step assumed, in ms.")] = 3.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> int:
    """The vLLM plugin's hot path: microseconds per decode step per rank, and per eager collective; with
    --vllm, throughput on a real server with the plugin on and off (alternating blocks, medians, ratio);
    with --wrappers, what wrappers with each target's exact signature would save per step."""
    if wrappers:
        from watchdog.bench.wrappers import bench_wrappers

        if step_ms <= 0 or steps < 1 or repeats < 1:
            raise UsageError("--step-ms, --steps and --repeats must be positive")
        if ledgers is not None and not ledgers.is_dir():
            raise WatchdogError(f"--ledgers {ledgers}: not a directory")
        try:
            wresult = bench_wrappers(vllm_exe=vllm_exe, ledgers=ledgers, step_ms=step_ms, calls=steps, repeats=repeats)
        except ValueError as exc:
            raise WatchdogError(str(exc)) from None
        print(json.dumps(wresult) if as_json else json.dumps(wresult, indent=2))
        return EXIT_OK
    if vllm:
        import tempfile

        from watchdog.bench.vllm import bench_vllm_plugin

        if blocks < 1 or requests < 1 or concurrency < 1 or output_len < 1 or tp < 1:
            raise UsageError("--blocks, --requests, --concurrency, --output-len and --tp must be positive")
        with tempfile.TemporaryDirectory(prefix="watchdog-bench-vllm-") as tmp:
            vresult = bench_vllm_plugin(
                vllm=vllm_exe,
                workdir=Path(tmp),
                blocks=blocks,
                requests=requests,
                concurrency=concurrency,
                output_len=output_len,
                tp=tp,
                say=err,
            )
        print(json.dumps(vresult) if as_json else "\n".join(f"{k}: {v}" for k, v in vresult.items()))
        return EXIT_OK
    from watchdog.bench.plugin import bench_plugin as run

    result = run(steps=steps, repeats=repeats, reqs=reqs)
    print(json.dumps(result) if as_json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return EXIT_OK


@bench_app.command(cls=GroupedCommand, name="fuzz")
def bench_fuzz(
    cases: Annotated[int, typer.Option(help="Mutated ledgers and bundles to read.")] = 100_000,
    seed: Annotated[int, typer.Option(help="Seed of the mutations (a case is reproducible from it).")] = 0,
    first: Annotated[int, typer.Option(help="Number of the first case (to split a run).")] = 0,
    jobs: Annotated[int, typer.Option(help="Processes sharing the cases.")] = 1,
    scenarios: Annotated[Path, typer.Option(help="Directory of scenario bundles to mutate.")] = Path("tests/scenarios"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> int:
    """Damaged ledgers and bundles through diagnose and the live tail: failures (anything but a one-line
    error), the slowest case and the peak RSS. Exit 1 if any case failed."""
    from watchdog.bench.fuzz import bench_fuzz as run

    if not scenarios.is_dir():
        raise WatchdogError(f"--scenarios {scenarios}: not a directory")
    try:
        result = run(root=str(scenarios), cases=cases, seed=seed, jobs=jobs, first=first)
    except ValueError as exc:
        raise WatchdogError(str(exc)) from None
    print(json.dumps(result) if as_json else json.dumps(result, indent=2))
    return EXIT_ERROR if result["failed"] else EXIT_OK


@bench_app.command(cls=GroupedCommand, name="torn")
def bench_torn(
    seconds: Annotated[float, typer.Option(help="Seconds of live reading per copy mode (0 skips it).")] = 10.0,
    slots: Annotated[int, typer.Option(help="Ring slots of the hammered ledger.")] = 8,
    chunk: Annotated[list[int], typer.Option(help="Copy sizes in bytes for the live runs (0: whole file).")] = [0, 16],  # noqa: B006
    writer: Annotated[
        list[str], typer.Option(help="Write protocols of the live writer: new (Recorder) and/or old (before the fix).")
    ] = ["old", "new"],  # noqa: B006
    schedules: Annotated[int, typer.Option(help="Replayed interleavings of one write with one read.")] = 20000,
    seed: Annotated[int, typer.Option(help="Seed of the replayed interleavings.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> int:
    """Torn records accepted by the old reader (checks on a copy) and by read_ledger, under a writer process
    hammering the ledger (with the write protocol before the fix and with today's), and over seeded
    interleavings of one write with one read replayed store by store."""
    from watchdog.bench.torn import WRITERS, interleavings, stress

    bad = [w for w in writer if w not in WRITERS]
    if bad:
        raise WatchdogError(f"--writer {bad[0]}: expected one of {', '.join(WRITERS)}")
    result: dict[str, object] = {"interleavings": interleavings(schedules=schedules, seed=seed)}
    if seconds > 0:
        result["live"] = [stress(seconds=seconds, n_slots=slots, chunk=c, writer=w) for w in writer for c in chunk]
    print(json.dumps(result) if as_json else json.dumps(result, indent=2))
    return EXIT_OK


@bench_app.command(cls=GroupedCommand, name="detect")
def bench_detect(
    tp: Annotated[list[int], typer.Option(help="TP sizes to measure (repeat the option).")] = [2, 4, 8],  # noqa: B006
    fault: Annotated[list[str] | None, typer.Option(help="Fault classes (repeat; default: every fault).")] = None,
    repeats: Annotated[int, typer.Option(help="Injections per fault class and TP size.")] = 3,
    requests: Annotated[int, typer.Option(help="Requests per demo run.")] = 64,
    cpu_seconds: Annotated[float, typer.Option(help="Seconds the agent's CPU share is sampled (0 skips it).")] = 30.0,
    fault_rank: Annotated[
        list[int] | None,
        typer.Option(
            help="Culprit rank of rank faults (repeat to measure several; default 1; -1 or past the last: the last)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> int:
    """Detection latency per fault class and TP size (median, max), and the agent's CPU share while healthy."""
    from watchdog.bench.detect import bench_detect as run

    try:
        result = run(
            tps=tp,
            faults=fault,
            repeats=repeats,
            requests=requests,
            cpu_seconds=cpu_seconds,
            say=err,
            fault_ranks=fault_rank,
        )
    except ValueError as exc:  # an unknown fault class
        raise WatchdogError(str(exc)) from None
    print(json.dumps(result) if as_json else json.dumps(result, indent=2))
    return EXIT_OK


@bench_app.command(cls=GroupedCommand, name="agent")
def bench_agent(
    tp: Annotated[list[int], typer.Option(help="TP sizes of the ledgers written (repeat the option).")] = [2, 8],  # noqa: B006
    rate: Annotated[float, typer.Option(help="Decode steps per second written to the ledgers.")] = 100.0,
    seconds: Annotated[float, typer.Option(help="Measurement window per TP size.")] = 30.0,
    warmup: Annotated[float, typer.Option(help="Seconds before the window (start-up, first reads).")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> int:
    """The agent's own cost while the server is healthy: CPU share of one core and RSS, per TP size."""
    from watchdog.bench.agent import bench_agent as run

    if rate <= 0 or seconds <= 0 or warmup < 0 or any(t < 1 for t in tp):
        raise UsageError("--rate, --seconds and every --tp must be positive, --warmup >= 0")
    result = run(tps=tp, rate=rate, seconds=seconds, warmup_s=warmup, say=err)
    print(json.dumps(result) if as_json else json.dumps(result, indent=2))
    return EXIT_OK


@bench_app.command(cls=GroupedCommand, name="soak")
def bench_soak(
    seconds: Annotated[float, typer.Option(help="How long the healthy deployment is watched.")] = 600.0,
    tp: Annotated[int, typer.Option(help="TP size of the demo deployment.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> int:
    """A real agent watching a healthy demo deployment (bursts of long prefills and decodes, idle gaps):
    zero incidents, stalls and divergences, /livez 200 throughout; the agent's CPU share and RSS.
    Exit 1 on any false alarm or failed request."""
    import tempfile

    from watchdog.bench.soak import bench_soak as run
    from watchdog.bench.soak import failures

    if seconds <= 0 or tp < 1:
        raise UsageError("--seconds and --tp must be positive")
    with tempfile.TemporaryDirectory(prefix="watchdog-soak-") as tmp:
        result = run(seconds=seconds, workdir=Path(tmp), tp=tp, say=err)
    print(json.dumps(result) if as_json else json.dumps(result, indent=2))
    failed = failures(result, tp)
    if failed:
        err(f"watchdog: the soak failed: {'; '.join(failed)}")
        return EXIT_ERROR
    return EXIT_OK


@bench_app.command(cls=GroupedCommand, name="proxy")
def bench_proxy(
    requests: Annotated[int, typer.Option(help="Sequential requests and streams per way (medians).")] = 200,
    tokens: Annotated[int, typer.Option(help="Tokens of each sequential stream.")] = 64,
    concurrency: Annotated[int, typer.Option(help="Concurrent streams of the throughput runs.")] = 128,
    stream_tokens: Annotated[int, typer.Option(help="Tokens of each stream in the throughput runs.")] = 16,
    seconds: Annotated[float, typer.Option(help="Window of each throughput run.")] = 5.0,
    repeats: Annotated[int, typer.Option(help="Throughput runs per way (median reported).")] = 3,
    open_streams: Annotated[int, typer.Option(help="Streams held open for the memory figure.")] = 512,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> int:
    """The resuming proxy's cost against a real upstream: added latency per request and per token,
    streams/s at a concurrency, and the proxy's RSS per open stream (direct vs proxied, medians)."""
    from watchdog.bench.proxy import bench_proxy as run

    try:
        result = run(
            requests=requests,
            tokens=tokens,
            concurrency=concurrency,
            stream_tokens=stream_tokens,
            seconds=seconds,
            repeats=repeats,
            open_streams=open_streams,
            say=err,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(result) if as_json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return EXIT_OK
