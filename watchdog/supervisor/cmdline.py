"""Put a cudagraph mode into a server command line, keeping everything else.

vLLM has no environment variable for ``cudagraph_mode``; it lives in the compilation config, and a
second ``--compilation-config`` silently *replaces* the first (argparse ``store``: last one wins, the
value is parsed whole by ``TypeAdapter(CompilationConfig).validate_json``), so appending one would
lose ``custom_ops``, ``pass_config`` etc. :func:`with_cudagraph_mode` finds every place the command
line gives the compilation config, merges them into one dict, sets ``cudagraph_mode`` and emits
exactly one ``--compilation-config <compact JSON>`` where the first of them stood (at the end when
there was none). Every other argument keeps its place and its text: the model, ``--`` separators
(scanning goes on past them, so a launcher prefix such as ``torchrun ... -- python -m vllm...`` is
fine), other flags whose values look like JSON (``--speculative-config {...}``), ``-O3``.

How vLLM reads these (checked against vLLM's ``FlexibleArgumentParser.parse_args`` /
``load_config_file`` in ``vllm/utils/argparse_utils.py`` and ``EngineArgs.add_cli_args`` in
``vllm/engine/arg_utils.py``, vllm-project/vllm main, and older copies of the same code; PR #29557
"Remap -O to -cc"; docs.vllm.ai design/optimization_levels, v0.12.0 and latest):

* ``--compilation-config`` has the alias ``-cc`` (PR #29557, v0.12.0). Before that the alias was
  ``-O``: ``-O '{...}'`` / ``-O{...}`` was the compilation config, and ``-O3`` its level/mode. From
  v0.12.0 ``-O<n>`` / ``-O <n>`` / ``-O=<n>`` is ``--optimization-level`` (defaults only; an
  explicit ``cudagraph_mode`` wins over them), ``-O.key`` and ``-O {...}`` were remapped to ``-cc``
  with a deprecation warning, and on main every ``-O<x>`` is an optimization level. Here:
  ``-O <digit>``, ``-O<x>``, ``-O=<x>`` are an optimization level and left alone; ``-O {json}``,
  ``-O{json}``, ``-O={json}`` and ``-O.key ...`` are compilation config (what they meant while
  ``-O`` was its alias; current vLLM rejects them) and are folded into the one emitted
  ``--compilation-config``, which every version reads. Caveat: on vLLM < 0.12 a kept ``-O3`` *is*
  a compilation config (``{"level": 3}`` or ``{"mode": 3}``) that vLLM appends after ours and that
  replaces it whole; this module targets vLLM >= 0.12 and does not rewrite ``-O<n>``.
* Both ``--name value`` and ``--name=value``; the name part of a ``--`` option (up to the first
  ``.``) may use ``_`` for ``-`` (``--compilation_config``). argparse's ``allow_abbrev`` also takes a
  unique prefix, so ``--compilation``... up to the full name counts too.
* Dotted keys: any ``-...`` argument with a ``.`` in its name (before any ``=``) is
  ``--json-arg.key1.key2 value`` / ``--json-arg.key=value``; the value is ``json.loads``-ed, else a
  human-readable int (``80g``, ``1K``), else the plain string; a trailing ``+`` (``-cc.custom_ops+
  a,b``) makes a list of the comma-split strings. All dotted args are merged among themselves
  (nested dicts merge, two lists concatenate, anything else: later wins) and appended at the end
  of the command line, so they take precedence over every plain ``--compilation-config``.
* ``--config FILE`` (the separate-word form only: vLLM tests ``"--config" in args``; at most one;
  ``.yaml``/``.yml``): the file's keys become ``--key value`` arguments inserted *before* all
  command-line arguments, so the command line overrides the file. A mapping value becomes JSON, a
  string is passed as is; dotted keys (``compilation_config.cudagraph_mode: NONE``) are dotted
  args. ``--config=FILE`` is not expanded by vLLM, so it is left alone here too.

Precedence used here, lowest first: ``--config`` file's compilation config; each command-line
``--compilation-config`` / ``-cc`` / ``-O {json}`` in order; then the dotted keys (file's first,
then the command line's, in order). One deliberate difference from vLLM: where vLLM lets a later
source replace an earlier one *whole* (two plain JSON values, or any JSON value plus dotted keys,
or the file plus any command-line flag), this merges them (nested dicts merge, a later non-dict
value replaces), so keys given anywhere are kept. When the file holds a compilation config, the
file is never edited: its content is merged into the emitted command-line flag, which overrides
it in vLLM; ``--config FILE`` itself stays. The file is read only when ``--config`` is present,
relative to ``cwd`` (default: this process's), with PyYAML, an optional import.

The demo server (``watchdog demo ... --cudagraph-mode X`` or ``--cudagraph-mode=X``) takes the mode
as its own flag: when argv has ``--cudagraph-mode``, its value is replaced (every occurrence) and
nothing else changes. A command line with both that flag and a compilation config is refused.

Input that cannot be merged safely raises :class:`CmdlineError` (one line): an unknown mode, invalid
JSON or a non-object in a compilation-config value (the message names the flag), a flag without
its value, two ``--config`` files, an unreadable or malformed config file, PyYAML missing.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from watchdog.errors import WatchdogError

__all__ = ["CUDAGRAPH_MODES", "CmdlineError", "compilation_config_of", "cudagraph_mode_of", "with_cudagraph_mode"]

CUDAGRAPH_MODES = ("NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")

_LONG = "--compilation-config"
_SHORTEST_ABBREV = len("--compilation")
_DEMO_FLAG = "--cudagraph-mode"
_OPT_LEVEL_WORDS = frozenset({"0", "1", "2", "3"})
_HUMAN_INT = re.compile(r"(\d+(?:\.\d+)?)([kKmMgGtT])")
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class CmdlineError(WatchdogError):
    """A server command line this module cannot rewrite safely; the message is one line."""


@dataclass(frozen=True)
class _Hit:
    """One place the command line gives the compilation config (or the demo's mode)."""

    start: int  # index of its first argument
    stop: int  # index after its last argument
    flag: str  # as written, for messages
    kind: Literal["json", "dotted", "demo"]
    value: str
    keys: tuple[str, ...] = ()  # dotted only
    append: bool = False  # dotted with a trailing "+"
    eq: bool = False  # value given as flag=value


@dataclass(frozen=True)
class _Scan:
    hits: tuple[_Hit, ...]
    config_file: str | None


def with_cudagraph_mode(argv: Sequence[str], mode: str, *, cwd: str | Path | None = None) -> list[str]:
    """``argv`` with its compilation config's ``cudagraph_mode`` set to ``mode`` (see the module doc)."""
    if mode not in CUDAGRAPH_MODES:
        raise CmdlineError(f"cudagraph mode {mode!r}: choose one of {', '.join(CUDAGRAPH_MODES)}")
    args = list(argv)
    scan = _scan(args)
    demo = [h for h in scan.hits if h.kind == "demo"]
    if demo:
        _refuse_mixed(scan, demo[0])
        out = list(args)
        for h in demo:
            out[h.start : h.stop] = [f"{_DEMO_FLAG}={mode}"] if h.eq else [_DEMO_FLAG, mode]
        return out
    config = _merge(scan, cwd)
    config["cudagraph_mode"] = mode
    flag = [_LONG, json.dumps(config, separators=(",", ":"))]
    hits = [h for h in scan.hits if h.kind != "demo"]
    if not hits:
        return [*args, *flag]
    drop = {i for h in hits for i in range(h.start, h.stop)}
    out = []
    for i, arg in enumerate(args):
        if i == hits[0].start:
            out.extend(flag)
        if i not in drop:
            out.append(arg)
    return out


def cudagraph_mode_of(argv: Sequence[str], *, cwd: str | Path | None = None) -> str | None:
    """The cudagraph mode ``argv`` asks for (upper-cased, as vLLM reads it), or None when it names none.

    An optimization level (``-O1``) only implies a default and counts as none."""
    args = list(argv)
    scan = _scan(args)
    demo = [h for h in scan.hits if h.kind == "demo"]
    if demo:
        _refuse_mixed(scan, demo[0])
        return demo[-1].value
    value = _merge(scan, cwd).get("cudagraph_mode")
    if value is None:
        return None
    if not isinstance(value, str):
        raise CmdlineError(f"compilation config cudagraph_mode {value!r} is not a mode name")
    return value.upper()


def compilation_config_of(argv: Sequence[str], *, cwd: str | Path | None = None) -> dict[str, Any]:
    """The merged compilation config ``argv`` gives (``--config`` file included); {} when none."""
    return _merge(_scan(list(argv)), cwd)


# --- scanning ---------------------------------------------------------------------------------


def _refuse_mixed(scan: _Scan, demo: _Hit) -> None:
    if len(scan.hits) > sum(h.kind == "demo" for h in scan.hits) or scan.config_file is not None:
        raise CmdlineError(f"{demo.flag} (the demo's) together with a vLLM compilation config or --config: ambiguous")


def _compilation_name(name: str) -> bool:
    """``name`` (no value, no dotted keys) names vLLM's compilation config."""
    if name.startswith("--"):
        name = name.replace("_", "-")
        return len(name) >= _SHORTEST_ABBREV and _LONG.startswith(name)
    return name in ("-cc", "-O")


def _scan(args: list[str]) -> _Scan:
    hits: list[_Hit] = []
    config_file: str | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if config_file is not None:
                raise CmdlineError("more than one --config file: vLLM accepts one")
            if i + 1 >= len(args):
                raise CmdlineError("--config needs a file")
            config_file = args[i + 1]
            i += 2
            continue
        hit = _classify(args, i)
        if hit is None:
            i += 1
            continue
        hits.append(hit)
        i = hit.stop
    return _Scan(tuple(hits), config_file)


def _value_after(args: list[str], i: int, flag: str) -> str:
    if i + 1 >= len(args):
        raise CmdlineError(f"{flag} needs a value")
    return args[i + 1]


def _classify(args: list[str], i: int) -> _Hit | None:
    arg = args[i]
    if not arg.startswith("-") or arg == "--":
        return None
    if arg.startswith("-O") and not arg.startswith("-O."):
        return _classify_o(args, i)
    name, eq, value = arg.partition("=")
    base, dot, dotted = name.partition(".")
    if base == _DEMO_FLAG and not dot:
        value = value if eq else _value_after(args, i, base)
        return _Hit(i, i + (1 if eq else 2), base, "demo", value, eq=bool(eq))
    if not _compilation_name(base):
        return None
    stop = i + 1 if eq else i + 2
    if not eq:
        value = _value_after(args, i, name)
    if not dot:
        return _Hit(i, stop, name, "json", value, eq=bool(eq))
    append = dotted.endswith("+")
    keys = tuple((dotted[:-1] if append else dotted).split("."))
    if not all(keys):
        raise CmdlineError(f"{name}: empty key in a dotted compilation-config argument")
    return _Hit(i, stop, name, "dotted", value, keys=keys, append=append, eq=bool(eq))


def _classify_o(args: list[str], i: int) -> _Hit | None:
    """``-O``: an optimization level (left alone) unless its value is a JSON object (old alias of -cc)."""
    arg = args[i]
    if arg == "-O":
        if i + 1 < len(args) and args[i + 1] not in _OPT_LEVEL_WORDS and args[i + 1].lstrip().startswith("{"):
            return _Hit(i, i + 2, "-O", "json", args[i + 1])
        return None
    eq = arg.startswith("-O=")
    value = arg[3:] if eq else arg[2:]
    if value.lstrip().startswith("{"):
        return _Hit(i, i + 1, "-O", "json", value, eq=eq)
    return None


# --- merging ----------------------------------------------------------------------------------


def _merge(scan: _Scan, cwd: str | Path | None) -> dict[str, Any]:
    json_hits: list[_Hit] = []
    dotted_hits: list[_Hit] = []
    if scan.config_file is not None:
        file_json, file_dotted = _from_config_file(scan.config_file, cwd)
        json_hits += file_json
        dotted_hits += file_dotted
    json_hits += [h for h in scan.hits if h.kind == "json"]
    dotted_hits += [h for h in scan.hits if h.kind == "dotted"]
    merged: dict[str, Any] = {}
    for h in json_hits:
        _deep_update(merged, _parse_json(h))
    dotted: dict[str, Any] = {}
    for h in dotted_hits:
        _vllm_update(dotted, _nest(h.keys, _parse_dotted(h)))
    _deep_update(merged, dotted)
    return merged


def _parse_json(h: _Hit) -> dict[str, Any]:
    try:
        value = json.loads(h.value)
    except json.JSONDecodeError as exc:
        raise CmdlineError(f"{h.flag}: invalid JSON ({exc.msg} at column {exc.colno}): {_short(h.value)}") from None
    if not isinstance(value, dict):
        raise CmdlineError(f"{h.flag}: expected a JSON object, got {_short(h.value)}")
    return value


def _parse_dotted(h: _Hit) -> Any:
    """A dotted argument's value, as vLLM's parse_args reads it."""
    text = json.dumps(h.value.split(",")) if h.append else h.value
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    number = _human_readable_int(text)
    return text if number is None else number


def _human_readable_int(text: str) -> int | None:
    text = text.strip()
    match = _HUMAN_INT.fullmatch(text)
    if match:
        number, suffix = match.groups()
        if suffix in _DECIMAL:
            return int(float(number) * _DECIMAL[suffix])
        try:
            return int(number) * _BINARY[suffix]
        except ValueError:  # vLLM refuses decimals with binary suffixes; the value stays a string
            return None
    try:
        return int(text)
    except ValueError:
        return None


def _nest(keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    nested: Any = value
    for key in reversed(keys):
        nested = {key: nested}
    result: dict[str, Any] = nested
    return result


def _vllm_update(original: dict[str, Any], update: dict[str, Any]) -> None:
    """vLLM's merge of dotted args: nested dicts merge, two lists concatenate, else the later wins."""
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(original.get(k), dict):
            _vllm_update(original[k], v)
        elif isinstance(v, list) and isinstance(original.get(k), list):
            original[k] = original[k] + v
        else:
            original[k] = v


def _deep_update(original: dict[str, Any], update: dict[str, Any]) -> None:
    """Merge across sources: nested dicts merge, any other later value replaces."""
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(original.get(k), dict):
            _deep_update(original[k], v)
        else:
            original[k] = v


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


# --- the --config file ------------------------------------------------------------------------


def _from_config_file(file: str, cwd: str | Path | None) -> tuple[list[_Hit], list[_Hit]]:
    """The compilation-config entries of a vLLM ``--config`` YAML file, as the arguments vLLM makes of them."""
    if file.rsplit(".", 1)[-1] not in ("yaml", "yml"):
        raise CmdlineError(f"--config {file}: vLLM reads only .yaml/.yml config files")
    try:
        yaml: Any = importlib.import_module("yaml")
    except ImportError:
        raise CmdlineError(
            f"--config {file}: reading it needs PyYAML, which is not installed (pip install pyyaml)"
        ) from None
    path = Path(file) if cwd is None else Path(cwd) / file
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CmdlineError(f"--config {file}: cannot read it ({type(exc).__name__}: {exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise CmdlineError(f"--config {file}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise CmdlineError(f"--config {file}: expected a mapping of option names to values")
    json_hits: list[_Hit] = []
    dotted_hits: list[_Hit] = []
    for key, value in data.items():
        name = f"--{key}"
        base, dot, dotted = name.partition(".")
        if not _compilation_name(base):
            continue
        where = f"--config {file}: {key}"
        if isinstance(value, bool | list):
            raise CmdlineError(f"{where}: a {type(value).__name__} value is not a compilation config vLLM can read")
        text = json.dumps(value) if isinstance(value, dict) else str(value)
        if not dot:
            json_hits.append(_Hit(-1, -1, where, "json", text))
            continue
        append = dotted.endswith("+")
        keys = tuple((dotted[:-1] if append else dotted).split("."))
        if not all(keys):
            raise CmdlineError(f"{where}: empty key in a dotted compilation-config entry")
        dotted_hits.append(_Hit(-1, -1, where, "dotted", text, keys=keys, append=append))
    return json_hits, dotted_hits
