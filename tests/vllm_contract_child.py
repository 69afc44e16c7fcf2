"""Runs inside a real-vLLM environment (tests/vllm_envs.py), in one process (one vLLM import: CI time):
checks every hook target, then loads the plugin through vLLM's own ``load_general_plugins()`` three
times: filtered out by ``VLLM_PLUGINS`` and with no ledger directory (both must wrap nothing), then
for real. Prints one JSON object."""

from __future__ import annotations

import inspect
import json
import os

from collectors.vllm.hooks import TARGETS, WRAPPED, resolve


def check_targets() -> dict[str, object]:
    missing: dict[str, str] = {}
    bad: dict[str, str] = {}
    for t in TARGETS:
        try:
            _, _, fn = resolve(t)
        except Exception as exc:
            missing[t.name] = f"{type(exc).__name__}: {exc}"
            continue
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        if tuple(params[: len(t.params)]) != t.params:
            bad[t.name] = f"expected leading parameters {list(t.params)}, found {params}"
    return {"missing": missing, "bad_signature": bad, "checked": len(TARGETS)}


def load_plugins() -> dict[str, object]:
    from importlib.metadata import entry_points

    from vllm.plugins import load_general_plugins

    eps = [f"{e.name}={e.value}" for e in entry_points(group="vllm.general_plugins")]
    load_general_plugins()
    wrapped = sorted(t.name for t in TARGETS if _wrapped(t))
    return {"entry_points": eps, "wrapped": wrapped}


def _wrapped(t: object) -> bool:
    try:
        return bool(getattr(resolve(t)[2], WRAPPED, False))  # type: ignore[arg-type]
    except Exception:
        return False


if __name__ == "__main__":
    import vllm.plugins

    out: dict[str, object] = {"targets": check_targets()}  # first: it wraps nothing
    ledgers = os.environ.pop("WATCHDOG_LEDGER_DIR", "")
    os.environ["VLLM_PLUGINS"] = "other"
    out["filtered"] = load_plugins()
    del os.environ["VLLM_PLUGINS"]
    vllm.plugins.plugins_loaded = False  # vLLM loads its plugins once per process
    out["no_ledger_dir"] = load_plugins()
    os.environ["WATCHDOG_LEDGER_DIR"] = ledgers
    vllm.plugins.plugins_loaded = False
    out["plugins"] = load_plugins()
    from importlib.metadata import version

    out["vllm"] = version("vllm")
    print("RESULT " + json.dumps(out))
