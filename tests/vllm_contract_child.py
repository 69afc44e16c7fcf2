"""Runs inside a real-vLLM environment (tests/vllm_envs.py): checks every hook target (``targets``), loads
the plugin through vLLM's own ``load_general_plugins()`` (``plugins``), or both in one process
(``both``). Prints one JSON object."""

from __future__ import annotations

import inspect
import json
import sys

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
    mode = sys.argv[1]
    if mode == "targets":
        out = check_targets()
    elif mode == "plugins":
        out = load_plugins()
    else:  # "both": one vLLM import for the two checks (targets first: it wraps nothing)
        out = {"targets": check_targets(), "plugins": load_plugins()}
    from importlib.metadata import version

    out["vllm"] = version("vllm")
    print("RESULT " + json.dumps(out))
