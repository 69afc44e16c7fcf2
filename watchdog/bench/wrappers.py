"""``watchdog bench plugin --wrappers``: what the shape of the hooks' wrappers costs in a real step.

The plugin's wrappers (``collectors.vllm.wrap``) are plain ``(self, *args, **kwargs)`` forwarders.
Until issue 16 point 5 they were generated with each original's exact signature (no tuple or dict
built per call); ``_exact`` below is that generator, kept here only as the reference this bench
measures against. Both are built around vLLM's real per-step targets, each around a do-nothing
original with the real method's own signature (so the figure is the wrapper's, not vLLM's), with
do-nothing bodies where the hook has them, and called the way vLLM calls them. Medians of
``repeats`` runs, the bare call and both wrappers alternating within each run.

Per step, a worker goes through ``Worker.execute_model``, the model's graph-key choice,
``Worker.sample_tokens`` (and the drafter's graph-key choice with MTP) and one wrapper per
collective outside a graph; the engine through ``MultiprocExecutor.execute_model``,
``Scheduler.schedule`` and ``Scheduler.update_from_output``. With ``--ledgers`` (a real server's
ledger directory) the collectives and drafter launches per step and the median step duration
come from that server's rank ledgers; the share is also given of an assumed GPU step
(``--step-ms``).

This module runs where vLLM is importable; ``bench_wrappers`` starts it in the vLLM environment
(the interpreter of the ``vllm`` executable) when this one has no vLLM.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCHEMA = "watchdog.bench.plugin.wrappers/v1"


def _source(fn: Callable[..., Any], ns: dict[str, Any]) -> tuple[str, str]:
    """(parameter list, call's argument list) of ``fn``'s signature, defaults bound in ``ns``."""
    P = inspect.Parameter
    params = list(inspect.signature(fn).parameters.values())
    head: list[str] = []
    call: list[str] = []
    star = False
    for i, p in enumerate(params):
        text = p.name
        if p.default is not P.empty:
            ns[f"_d{i}"] = p.default
            text += f"=_d{i}"
        if p.kind is P.VAR_POSITIONAL:
            head.append(f"*{p.name}")
            call.append(f"*{p.name}")
            star = True
        elif p.kind is P.VAR_KEYWORD:
            head.append(f"**{p.name}")
            call.append(f"**{p.name}")
        elif p.kind is P.KEYWORD_ONLY:
            if not star:
                head.append("*")
                star = True
            head.append(text)
            call.append(f"{p.name}={p.name}")
        else:
            head.append(text)
            call.append(p.name)
            if p.kind is P.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind is not P.POSITIONAL_ONLY):
                head.append("/")
    return ", ".join(head), ", ".join(call)


def _noop_like(real: Callable[..., Any]) -> Callable[..., Any]:
    """A function with ``real``'s parameters that does nothing."""
    ns: dict[str, Any] = {}
    head, _ = _source(real, ns)
    exec(f"def noop({head}):\n    return None", ns)  # source built from the signature's names only
    return ns["noop"]  # type: ignore[no-any-return]


def _exact(
    hook: Any,
    orig: Callable[..., Any],
    names: tuple[str, ...],
    before: Callable[..., None] | None,
    after: Callable[..., None] | None,
    failed: Callable[..., None] | None,
) -> Callable[..., Any]:
    """The reference: the exact-signature wrapper the plugin generated before (same bodies, same order)."""
    ns: dict[str, Any] = {"_orig": orig, "_hook": hook, "_before": before, "_after": after, "_failed": failed}
    head, call = _source(orig, ns)
    args = ", ".join(("self", *names))
    lines = [f"def wrapper({head}):"]
    if before is not None:
        lines += ["    if _hook.on:", "        try:", f"            _before({args})"]
        lines += ["        except Exception as exc:", "            _hook.fail(exc)"]
    if failed is not None:
        lines += ["    try:", f"        result = _orig({call})", "    except BaseException:", "        if _hook.on:"]
        lines += ["            try:", f"                _failed({args})", "            except Exception as exc:"]
        lines += ["                _hook.fail(exc)", "        raise"]
    else:
        lines.append(f"    result = _orig({call})")
    if after is not None:
        lines += ["    if _hook.on:", "        try:", f"            _after({args}, result)"]
        lines += ["        except Exception as exc:", "            _hook.fail(exc)"]
    lines.append("    return result")
    exec("\n".join(lines), ns)  # source built from the signature's names only
    return ns["wrapper"]  # type: ignore[no-any-return]


def _nothing(*_: Any) -> None:
    pass


# target qualname -> (names the hook reads, bodies it has: b(efore) a(fter) f(ailed), side)
_SPECS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "Worker.execute_model": (("scheduler_output",), "baf", "worker"),
    "GPUModelRunner._determine_batch_execution_and_padding": (("num_tokens", "num_reqs"), "a", "worker"),
    "SpecDecodeBaseProposer._determine_batch_execution_and_padding": (("num_tokens",), "a", "drafter"),
    "Worker.sample_tokens": ((), "af", "worker"),
    "GroupCoordinator._all_reduce_out_place": (("input_",), "b", "collective"),
    "MultiprocExecutor.execute_model": (("scheduler_output",), "b", "engine"),
    "Scheduler.schedule": ((), "a", "engine"),
    "Scheduler.update_from_output": (("scheduler_output",), "af", "engine"),
}


def _calls(so: Any, x: Any) -> dict[str, Callable[[Callable[..., Any], Any], Any]]:
    """How vLLM 0.32 calls each target (gpu_worker.py, gpu_model_runner.py, llm_base_proposer.py,
    parallel_state.py, core.py): positional or by keyword, as there."""
    return {
        "Worker.execute_model": lambda f, o: f(o, so),
        "GPUModelRunner._determine_batch_execution_and_padding": lambda f, o: f(
            o,
            num_tokens=30,
            num_reqs=15,
            num_scheduled_tokens_np=None,
            max_num_scheduled_tokens=2,
            use_cascade_attn=False,
            num_encoder_reqs=0,
            allow_microbatching=False,
        ),
        "SpecDecodeBaseProposer._determine_batch_execution_and_padding": lambda f, o: f(o, 30),
        "Worker.sample_tokens": lambda f, o: f(o, None),
        "GroupCoordinator._all_reduce_out_place": lambda f, o: f(o, x),
        "MultiprocExecutor.execute_model": lambda f, o: f(o, so, non_block=True),
        "Scheduler.schedule": lambda f, o: f(o),
        "Scheduler.update_from_output": lambda f, o: f(o, so, None),
    }


def measure(*, calls: int = 20000, repeats: int = 7) -> dict[str, Any]:
    """ns per call over the bare call, plain vs exact wrapper, per real target present in this vLLM."""
    from collectors.vllm.targets import TARGETS, resolve
    from collectors.vllm.wrap import Hook, wrap

    shapes = _calls(object(), object())
    owner = object()
    out: dict[str, Any] = {}
    for target in TARGETS:
        spec = _SPECS.get(target.qualname)
        if spec is None:
            continue
        names, bodies, side = spec
        try:
            real = resolve(target)[2]
        except Exception as exc:  # another runner generation: not in this vLLM
            out[target.qualname] = {"absent": f"{type(exc).__name__}: {exc}"}
            continue
        bare = _noop_like(real)
        b, a, f = (_nothing if c in bodies else None for c in "baf")
        plain = wrap(Hook(target), bare, names, before=b, after=a, failed=f)
        exact = _exact(Hook(target), bare, names, b, a, f)
        call = shapes[target.qualname]
        fns: list[Callable[[], Any]] = [
            lambda fn=fn, call=call: call(fn, owner)  # type: ignore[misc]
            for fn in (bare, plain, exact)
        ]
        runs: list[list[float]] = [[], [], []]
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter_ns()
                for _ in range(calls):
                    fn()
                runs[i].append((time.perf_counter_ns() - t0) / calls)
        m_bare, m_plain, m_exact = (statistics.median(r) for r in runs)
        out[target.qualname] = {
            "side": side,
            "ns_bare_call": round(m_bare, 1),
            "ns_plain_wrapper": round(m_plain - m_bare, 1),
            "ns_exact_wrapper": round(m_exact - m_bare, 1),
            "ns_exact_saves": round(m_plain - m_exact, 1),
        }
    return out


def _measure_in_vllm_env(vllm_exe: str | None, calls: int, repeats: int) -> tuple[dict[str, Any], str]:
    """``measure`` run by the vLLM environment's interpreter (this project on its path); (result, vllm version)."""
    from watchdog.demo.vllm.serve import find_vllm, vllm_python
    from watchdog.errors import WatchdogError

    if vllm_exe is None and shutil.which("vllm") is None:
        raise WatchdogError(
            "bench plugin --wrappers: no vLLM here (not importable, no `vllm` on PATH); "
            "pass --vllm-exe PATH/TO/bin/vllm"
        )
    python = vllm_python(find_vllm(vllm_exe))
    root = Path(__file__).resolve().parents[2]  # the checkout (watchdog/bench/ is two below it)
    code = (
        "import json; from importlib.metadata import version; from watchdog.bench.wrappers import measure; "
        f"print('RESULT ' + json.dumps([measure(calls={calls}, repeats={repeats}), version('vllm')]))"
    )
    env = {**os.environ, "PYTHONPATH": str(root), "VLLM_LOGGING_LEVEL": "ERROR"}
    res = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if res.returncode != 0 or line is None:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise WatchdogError(f"bench plugin --wrappers: the measurement in {python} failed: {tail}")
    result, version = json.loads(line[len("RESULT ") :])
    return result, str(version)


def ledger_facts(directory: Path) -> dict[str, Any]:
    """From a real server's rank ledgers: median step duration (begin to end, ms), collectives and
    drafter launches per step (medians over the steps whose begin and end are both in the ring)."""
    from collectors.bounds import LedgerError
    from collectors.format import Collective, Launch, Role, StepBegin, StepEnd
    from collectors.reader import ledger_paths, read_ledger

    durations: list[float] = []
    colls: list[int] = []
    drafts: list[int] = []
    for path in ledger_paths(directory):
        try:
            ledger = read_ledger(path)
        except (LedgerError, OSError) as exc:
            raise ValueError(f"--ledgers: {exc}") from None
        if ledger.header.rank < 0:
            continue  # the engine's ledger: no worker steps
        begins = {r.step: r for r in ledger.records if isinstance(r, StepBegin)}
        ends = {r.step: r for r in ledger.records if isinstance(r, StepEnd)}
        per_coll = Counter(r.step for r in ledger.records if isinstance(r, Collective))
        per_draft = Counter(r.step for r in ledger.records if isinstance(r, Launch) and r.role is Role.DRAFTER)
        for step, begin in begins.items():
            end = ends.get(step)
            if end is not None:
                durations.append((end.mono_ns - begin.mono_ns) / 1e6)
                colls.append(per_coll[step])
                drafts.append(per_draft[step])
    if not durations:
        raise ValueError(f"{directory}: no rank ledger with a whole step in it")
    return {
        "steps": len(durations),
        "step_ms_median": round(statistics.median(durations), 3),
        "collectives_per_step": statistics.median(colls),
        "drafter_launches_per_step": statistics.median(drafts),
    }


def bench_wrappers(
    *,
    vllm_exe: str | None = None,
    ledgers: Path | None = None,
    step_ms: float = 3.0,
    collectives: int = 6,
    calls: int = 20000,
    repeats: int = 7,
) -> dict[str, Any]:
    """Per-call figures around the real targets, and per step: calls, ns the exact wrappers would
    save, and that as a share of a real step (``ledgers``) and of an assumed GPU step (``step_ms``)."""
    facts = ledger_facts(ledgers) if ledgers is not None else None
    if importlib.util.find_spec("vllm") is not None:
        from importlib.metadata import version

        per_call, vllm_version = measure(calls=calls, repeats=repeats), version("vllm")
    else:
        per_call, vllm_version = _measure_in_vllm_env(vllm_exe, calls, repeats)
    present = {k: v for k, v in per_call.items() if "absent" not in v}
    n_coll = float(facts["collectives_per_step"]) if facts else float(collectives)
    n_draft = float(facts["drafter_launches_per_step"]) if facts else 1.0
    counts = {"worker": 1.0, "drafter": n_draft, "collective": n_coll, "engine": 1.0}

    def per_step(sides: tuple[str, ...], field: str) -> float:
        return float(sum(counts[v["side"]] * v[field] for v in present.values() if v["side"] in sides))

    worker_sides = ("worker", "drafter", "collective")
    saved_worker = per_step(worker_sides, "ns_exact_saves")
    saved_engine = per_step(("engine",), "ns_exact_saves")
    plain_worker = per_step(worker_sides, "ns_plain_wrapper")
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "vllm": vllm_version,
        "per_call": per_call,
        "calls_per_step_worker": sum(counts[v["side"]] for v in present.values() if v["side"] in worker_sides),
        "calls_per_step_engine": sum(1 for v in present.values() if v["side"] == "engine"),
        "ns_exact_saves_per_step_worker": round(saved_worker, 1),
        "ns_exact_saves_per_step_engine": round(saved_engine, 1),
        "ns_plain_wrappers_per_step_worker": round(plain_worker, 1),
        "assumed_gpu_step_ms": step_ms,
        "exact_saves_pct_of_gpu_step": round(100 * saved_worker / (step_ms * 1e6), 5),
        "calls": calls,
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    if facts is not None:
        result["real_step"] = facts
        result["exact_saves_pct_of_real_step"] = round(100 * saved_worker / (facts["step_ms_median"] * 1e6), 5)
    return result
