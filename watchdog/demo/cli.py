"""``watchdog demo``: the command that runs the embedded demo deployment (or a real ``vllm serve``)
with a fault, beside the product: the top-level command line registers it, and nothing in the
product imports it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from watchdog.cli_options import EXIT_DEADLOCK, EXIT_ERROR, EXIT_OK, err
from watchdog.demo.result import DemoResult
from watchdog.errors import UsageError


def demo(
    tp: Annotated[int, typer.Option(help="Tensor-parallel ranks (worker processes).")] = 2,
    requests: Annotated[int, typer.Option(help="Requests the bench client sends.")] = 128,
    concurrency: Annotated[int, typer.Option(help="Max requests in flight.")] = 32,
    input_len: Annotated[int, typer.Option(help="Max prompt length (tokens).")] = 128,
    output_len: Annotated[int, typer.Option(help="Max output length (tokens).")] = 64,
    range_ratio: Annotated[float, typer.Option(help="Lengths drawn from [ratio*len, len], as SGLang's.")] = 0.0,
    cudagraph_mode: Annotated[str, typer.Option(help="FULL_AND_PIECEWISE, FULL_DECODE_ONLY or NONE.")] = (
        "FULL_AND_PIECEWISE"
    ),
    fault: Annotated[str, typer.Option(help="Fault to inject: see `watchdog demo --list-faults`.")] = "none",
    fault_rank: Annotated[int, typer.Option(help="Rank the fault lives on (rank faults).")] = 1,
    fault_step: Annotated[int | None, typer.Option(help="Only at this step (default: when the workload hits it).")] = (
        None
    ),
    seed: Annotated[int, typer.Option(help="Workload and model seed.")] = 0,
    bursts: Annotated[int, typer.Option(help="Send the requests in this many bursts ...")] = 1,
    idle_gap: Annotated[float, typer.Option(help="... with this many idle seconds between bursts.")] = 0.0,
    workdir: Annotated[
        Path | None, typer.Option(help="Where ledgers and incident bundles go (kept). Default: a temporary directory.")
    ] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the temporary directory (its bundles).")] = False,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds (start-up included).")] = 300.0,
    native: Annotated[bool, typer.Option(help="Also take native (C) stacks with py-spy --native.")] = True,
    watch: Annotated[bool, typer.Option(help="Watch in-process; --no-watch leaves it to `watchdog agent`.")] = True,
    fallback: Annotated[
        bool,
        typer.Option(help="Serve over HTTP under `watchdog run`'s supervisor and proxy; restart safer on a deadlock."),
    ] = True,
    max_restarts: Annotated[int, typer.Option(help="The fallback's restart bound (per hour).")] = 3,
    stall_floor_s: Annotated[
        float, typer.Option("--stall-floor-s", help="No stall is declared before a step is this old.")
    ] = 1.0,
    device: Annotated[
        str, typer.Option(help="cpu (emulated device, gloo) or cuda (one GPU per rank, NCCL, CUDA graphs).")
    ] = "cpu",
    list_faults: Annotated[bool, typer.Option("--list-faults", help="List the fault catalogue and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the demo result as JSON (last line).")] = False,
    engine: Annotated[
        str, typer.Option(help="demo (the embedded engine) or vllm (a real `vllm serve` under `watchdog run`).")
    ] = "demo",
    vllm_exe: Annotated[
        str | None, typer.Option(help="--engine vllm: the `vllm` executable (default: `vllm` on PATH).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="--engine vllm: a model directory (default: a tiny Llama built offline).")
    ] = None,
) -> int:
    """Run a real TP deployment (engine + workers, gloo collectives), inject a fault, watch it get diagnosed.
    With --engine vllm: a real `vllm serve` behind `watchdog run`, a fault inside real vLLM code."""
    from watchdog.demo.faults import DESCRIPTIONS, FAULTS
    from watchdog.demo.options import DemoOptions
    from watchdog.demo.run import run_demo

    if engine not in ("demo", "vllm"):
        raise UsageError(f"--engine {engine}: demo or vllm")
    if list_faults:
        if engine == "vllm":
            from watchdog.demo.vllm.faults import DESCRIPTIONS as VLLM_FAULTS

            for name, text in VLLM_FAULTS.items():
                print(f"{name:<26} {text}")
            return EXIT_OK
        for name in FAULTS:
            print(f"{name:<26} {DESCRIPTIONS[name]}")
        return EXIT_OK
    if engine == "vllm":
        from watchdog.demo.vllm.run import VllmDemoOptions

        vopts = VllmDemoOptions(
            workdir=Path(workdir or "."),
            vllm=vllm_exe,
            model=model,
            tp=tp,
            fault=fault,
            fault_rank=fault_rank,
            fault_step=30 if fault_step is None else fault_step,
            requests=requests,
            concurrency=concurrency,
            output_len=output_len,
            range_ratio=range_ratio,
            seed=seed,
            timeout_s=timeout,
            max_restarts=max_restarts,
            stall_floor_s=stall_floor_s,
            native_stacks=native,
        )
        return _demo_vllm(vopts, temporary=workdir is None, keep=keep, as_json=as_json)
    temporary = workdir is None
    opts = DemoOptions(
        tp=tp,
        requests=requests,
        concurrency=concurrency,
        input_len=input_len,
        output_len=output_len,
        range_ratio=range_ratio,
        cudagraph_mode=cudagraph_mode,
        fault=fault,
        fault_rank=fault_rank,
        fault_step=fault_step,
        seed=seed,
        bursts=bursts,
        idle_gap_s=idle_gap,
        workdir=None if workdir is None else str(workdir),
        timeout_s=timeout,
        native_stacks=native,
        watch=watch,
        fallback=fallback,
        max_restarts=max_restarts,
        stall_floor_s=stall_floor_s,
        device=device,
    )
    from watchdog import logs

    opts.validate()  # usage errors (exit 2) before a temporary directory exists
    _sigterm_interrupts()
    logs.setup("text", "error")  # the demo narrates through `say`; the services' log lines would repeat it
    if temporary:
        opts = dataclasses.replace(opts, workdir=tempfile.mkdtemp(prefix="watchdog-demo-"))
    try:
        result = run_demo(opts, say=err)
        _print_demo(result, kept=keep or not temporary)
    finally:
        if temporary and not keep and opts.workdir:
            shutil.rmtree(opts.workdir, ignore_errors=True)
    miss = result.missed()
    if as_json:
        print(json.dumps(result.to_json(reports=False)))
    if result.gave_up:
        from watchdog.supervisor.run import EXIT_GAVE_UP

        return EXIT_GAVE_UP
    if miss is not None:
        err(f"watchdog: {miss}")
        return EXIT_ERROR
    return EXIT_DEADLOCK if result.incidents else EXIT_OK


def _demo_vllm(opts: Any, *, temporary: bool, keep: bool, as_json: bool) -> int:
    from watchdog import logs
    from watchdog.demo.vllm.run import run_vllm_demo

    opts.validate()
    _sigterm_interrupts()
    logs.setup("text", "error")
    if temporary:
        opts = dataclasses.replace(opts, workdir=Path(tempfile.mkdtemp(prefix="watchdog-demo-vllm-")))
    try:
        result = run_vllm_demo(opts, say=err)
        _print_demo(result, kept=keep or not temporary)
    finally:
        if temporary and not keep:
            shutil.rmtree(opts.workdir, ignore_errors=True)
    if as_json:
        print(json.dumps(result.to_json(reports=False)))
    miss = result.missed()
    if result.gave_up:
        from watchdog.supervisor.run import EXIT_GAVE_UP

        return EXIT_GAVE_UP
    if miss is not None:
        err(f"watchdog: {miss}")
        return EXIT_ERROR
    req, info = result.requests, result.vllm or {}
    wrong = req.wrong_text or 0
    if req.failed - wrong:
        err(f"watchdog: {req.failed - wrong} of {req.total} requests failed: {req.errors}")
        return EXIT_ERROR
    if wrong and not (info.get("output_corrupting_fault") and result.incidents):
        err(f"watchdog: {wrong} of {req.total} completions differ from the uninterrupted run's (texts.json)")
        return EXIT_ERROR
    if wrong:
        err(
            f"watchdog: {wrong} of {req.total} completions differ from the uninterrupted run's: the {result.fault} "
            "fault made the ranks compute wrong tokens in the step it bit, streamed before the incident (texts.json)"
        )
    return EXIT_DEADLOCK if result.incidents else EXIT_OK


def _sigterm_interrupts() -> None:
    """SIGTERM (a `kill`, a container stop) stops the demo as Ctrl-C does: its cleanup runs (the tree
    killed, rings unlinked, temp dir removed) instead of leaving that to the resource tracker."""
    import signal

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _print_demo(result: DemoResult, kept: bool) -> None:
    req = result.requests
    bit = f", the fault bit {len(result.fault_bites)} time(s)" if result.fault_bites else ""
    print(
        f"demo TP={result.tp} {result.cudagraph_mode} fault={result.fault}: "
        f"{req.succeeded}/{req.total} requests succeeded, {len(result.incidents)} incident(s){bit}"
    )
    for inc in result.incidents:
        print(
            f"\nincident: detected {inc.detected_after_s:.2f} s after the fault bit, "
            f"diagnosed after {inc.diagnosed_after_s:.2f} s; bundle {inc.bundle}\n"
        )
        print(inc.report, end="")
        if kept:
            print(f"\nre-run it:  watchdog diagnose {inc.bundle}")
        else:
            print("\n(the bundle goes with the temporary directory: --keep or --workdir DIR keeps it)")
    for r in result.restarts:
        down = "?" if r["downtime_s"] is None else f"{r['downtime_s']:.1f} s"
        print(f"restart after {r['after_incident']}: {r['from']} -> {r['to']} (down {down})")
    if result.gave_up:
        print("the fallback gave up: the restart bound was hit (exit code 5)")
