"""Installing the wrappers: each target present in this vLLM is wrapped once, by its maker.

``install`` never raises: a target absent in this vLLM (another runner generation) is recorded in
``INSTALLED.absent`` with why, a maker that fails switches its hook off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from collectors.vllm import engine, worker
from collectors.vllm.targets import TARGETS, WRAPPED, Target, resolve
from collectors.vllm.wrap import Hook


@dataclass
class Installed:
    hooks: dict[str, Hook] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)  # target name -> why it was not hooked


INSTALLED = Installed()


def _wrap(target: Target, make: Callable[[Hook, Any], Callable[..., Any]]) -> None:
    try:
        owner, attr, orig = resolve(target)
    except Exception as exc:  # absent in this vLLM (another runner generation) or not importable here
        INSTALLED.absent[target.name] = f"{type(exc).__name__}: {exc}"
        return
    if getattr(orig, WRAPPED, False):
        return  # plugins load more than once per process
    hook = Hook(target)
    try:
        wrapper = functools.wraps(orig)(make(hook, orig))
        setattr(wrapper, WRAPPED, True)
        setattr(owner, attr, wrapper)
    except Exception as exc:
        hook.fail(exc)
        return
    INSTALLED.hooks[target.name] = hook


_MAKERS: dict[str, Callable[[Hook, Any], Callable[..., Any]]] = {**worker.MAKERS, **engine.MAKERS}


def install(groups: frozenset[str] | None = None) -> Installed:
    """Wrap every target present in this vLLM (only ``groups`` if given). Never raises."""
    for target in TARGETS:
        make = _MAKERS.get(target.qualname)
        if make is None or (groups is not None and target.group not in groups):
            continue
        try:
            _wrap(target, make)
        except Exception as exc:  # belt and braces: installation must not break vLLM start-up
            INSTALLED.absent[target.name] = repr(exc)
    return INSTALLED
