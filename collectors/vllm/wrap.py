"""The hook wrapper and the per-hook on/off switch.

A wrapper always calls the original exactly once and passes its result or exception through
untouched. Its own work runs in ``try``; the first failure switches that hook off with one
warning (``Hook.fail``) and vLLM carries on as if the plugin were not there.

Wrappers are plain ``(self, *args, **kwargs)`` forwarders that pick the arguments the hook reads by
position or by name. Wrappers generated with each original's exact signature (exec'd source) were
faster by 0.1-1.5 us a call, 2-4 us a step: 0.07-0.19 % of a real step, far below what a bench on a
real server resolves (``watchdog bench plugin --wrappers``, figures in README "Cost"), so they went.
"""

from __future__ import annotations

import inspect
import keyword
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collectors.vllm.targets import Target

log = logging.getLogger("watchdog.vllm")


@dataclass
class Hook:
    """One installed wrapper's on/off switch."""

    target: Target
    on: bool = True
    error: str = ""

    def fail(self, exc: BaseException) -> None:
        if self.on:
            self.on = False
            self.error = repr(exc)
            log.warning("watchdog: hook %s disabled after an error: %r", self.target.name, exc)


Body = Callable[..., None]
_MISSING: Any = object()
_NOT_POSITIONAL = 1 << 30  # a keyword-only parameter's "position": never inside ``args``


def _places(orig: Callable[..., Any], names: tuple[str, ...]) -> tuple[tuple[int, str, Any], ...]:
    """(index in the wrapper's ``args``, keyword name or "" if positional-only, default) of each of
    ``names``; ValueError if ``orig`` has no such parameter (or no readable signature)."""
    params = list(inspect.signature(orig).parameters.values())
    P = inspect.Parameter
    if not params or params[0].name != "self" or params[0].kind not in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD):
        raise ValueError(f"{getattr(orig, '__qualname__', orig)!r} has no parameter 'self'")
    where = []
    for name in names:
        i = next((i for i, p in enumerate(params) if p.name == name), -1)
        p = params[i]
        if i < 1 or keyword.iskeyword(name) or p.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD):
            raise ValueError(f"{getattr(orig, '__qualname__', orig)!r} has no parameter {name!r}")
        default = _MISSING if p.default is P.empty else p.default
        if p.kind is P.KEYWORD_ONLY:
            where.append((_NOT_POSITIONAL, name, default))
        else:
            where.append((i - 1, "" if p.kind is P.POSITIONAL_ONLY else name, default))
    return tuple(where)


def wrap(
    hook: Hook,
    orig: Callable[..., Any],
    names: tuple[str, ...] = (),
    *,
    before: Body | None = None,
    after: Body | None = None,
    failed: Body | None = None,
) -> Callable[..., Any]:
    """A wrapper that calls ``orig`` once with every argument it was given.

    Around the call, while ``hook`` is on: ``before(self, *named)``, then ``after(self, *named, result)``
    or, if ``orig`` raised, ``failed(self, *named)`` before the exception goes on; ``named`` are the
    arguments of the parameters ``names`` (at most two; their defaults where not given). A call
    that does not give them goes to ``orig`` alone, which raises as it would unwrapped. A body that
    raises switches the hook off (``Hook.fail``).
    ValueError if ``orig`` has no such parameters (or no readable signature)."""
    where = _places(orig, names)
    if len(where) > 2:
        raise ValueError(f"a hook reads at most two parameters, not {names!r}")
    # One wrapper per number of named arguments, each calling its bodies with that many: a call
    # with ``*named`` costs ~0.2 us more per call (CPython cannot inline it), four times a step.
    i0, n0, d0 = where[0] if where else (0, "", None)
    i1, n1, d1 = where[1] if len(where) > 1 else (0, "", None)

    if not where:

        def wrapper0(self: Any, *args: Any, **kwargs: Any) -> Any:
            if before is not None and hook.on:
                try:
                    before(self)
                except Exception as exc:
                    hook.fail(exc)
            if failed is None:
                result = orig(self, *args, **kwargs)
            else:
                try:
                    result = orig(self, *args, **kwargs)
                except BaseException:
                    if hook.on:
                        try:
                            failed(self)
                        except Exception as exc:
                            hook.fail(exc)
                    raise
            if after is not None and hook.on:
                try:
                    after(self, result)
                except Exception as exc:
                    hook.fail(exc)
            return result

        return wrapper0

    if len(where) == 1:

        def wrapper1(self: Any, *args: Any, **kwargs: Any) -> Any:
            a = args[i0] if len(args) > i0 else kwargs.get(n0, d0)
            if a is _MISSING:
                return orig(self, *args, **kwargs)
            if before is not None and hook.on:
                try:
                    before(self, a)
                except Exception as exc:
                    hook.fail(exc)
            if failed is None:
                result = orig(self, *args, **kwargs)
            else:
                try:
                    result = orig(self, *args, **kwargs)
                except BaseException:
                    if hook.on:
                        try:
                            failed(self, a)
                        except Exception as exc:
                            hook.fail(exc)
                    raise
            if after is not None and hook.on:
                try:
                    after(self, a, result)
                except Exception as exc:
                    hook.fail(exc)
            return result

        return wrapper1

    def wrapper2(self: Any, *args: Any, **kwargs: Any) -> Any:
        n = len(args)
        a = args[i0] if n > i0 else kwargs.get(n0, d0)
        b = args[i1] if n > i1 else kwargs.get(n1, d1)
        if a is _MISSING or b is _MISSING:
            return orig(self, *args, **kwargs)
        if before is not None and hook.on:
            try:
                before(self, a, b)
            except Exception as exc:
                hook.fail(exc)
        if failed is None:
            result = orig(self, *args, **kwargs)
        else:
            try:
                result = orig(self, *args, **kwargs)
            except BaseException:
                if hook.on:
                    try:
                        failed(self, a, b)
                    except Exception as exc:
                        hook.fail(exc)
                raise
        if after is not None and hook.on:
            try:
                after(self, a, b, result)
            except Exception as exc:
                hook.fail(exc)
        return result

    return wrapper2
