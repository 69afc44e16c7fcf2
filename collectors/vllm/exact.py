"""The exact-signature wrapper generator and the per-hook on/off switch.

A wrapper always calls the original exactly once and passes its result or exception through
untouched. Its own work runs in ``try``; the first failure switches that hook off with one
warning (``Hook.fail``) and vLLM carries on as if the plugin were not there.

Wrappers take the original's exact parameters (``exact``: generated from its signature) and pass
them on by position: a ``(*args, **kwargs)`` wrapper pays for building and unpacking a tuple and a
dict on every call, as much as the records it writes, and the step hooks run four times a step.
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


def exact(
    hook: Hook,
    orig: Callable[..., Any],
    names: tuple[str, ...] = (),
    *,
    before: Body | None = None,
    after: Body | None = None,
    failed: Body | None = None,
) -> Callable[..., Any]:
    """A wrapper with ``orig``'s own parameters that calls ``orig`` once, forwarding every argument.

    Around the call, while ``hook`` is on: ``before(self, *named)``, then ``after(self, *named, result)``
    or, if ``orig`` raised, ``failed(self, *named)`` before the exception goes on; ``named`` are the
    arguments of the parameters ``names``. A body that raises switches the hook off (``Hook.fail``).
    ValueError if ``orig`` has no such parameters (or no readable signature)."""
    sig = inspect.signature(orig)
    params = list(sig.parameters.values())
    have = {p.name for p in params}
    for name in ("self", *names):
        if name not in have or keyword.iskeyword(name):
            raise ValueError(f"{getattr(orig, '__qualname__', orig)!r} has no parameter {name!r}")
    ns: dict[str, Any] = {"_orig": orig, "_hook": hook, "_before": before, "_after": after, "_failed": failed}
    head: list[str] = []
    call: list[str] = []
    star = False
    P = inspect.Parameter
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
    args = ", ".join(("self", *names))
    lines = [f"def wrapper({', '.join(head)}):"]
    if before is not None:
        lines += [
            "    if _hook.on:",
            "        try:",
            f"            _before({args})",
            "        except Exception as exc:",
            "            _hook.fail(exc)",
        ]
    if failed is not None:
        lines += [
            "    try:",
            f"        result = _orig({', '.join(call)})",
            "    except BaseException:",
            "        if _hook.on:",
            "            try:",
            f"                _failed({args})",
            "            except Exception as exc:",
            "                _hook.fail(exc)",
            "        raise",
        ]
    else:
        lines.append(f"    result = _orig({', '.join(call)})")
    if after is not None:
        lines += [
            "    if _hook.on:",
            "        try:",
            f"            _after({args}, result)",
            "        except Exception as exc:",
            "            _hook.fail(exc)",
        ]
    lines.append("    return result")
    if {"result", "exc", "wrapper"} & have or any(n.startswith("_") and n in ns for n in have):
        raise ValueError(f"{getattr(orig, '__qualname__', orig)!r}: a parameter name the wrapper uses itself")
    exec("\n".join(lines), ns)  # the source is built above from the signature's names only
    return ns["wrapper"]  # type: ignore[no-any-return]
