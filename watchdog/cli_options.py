"""The command line's option machinery: grouped plain help, --version, and one option per setting.

Kept apart from ``watchdog.cli`` (the commands) so that each stays readable in one sitting.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Concatenate, Literal, ParamSpec, TypeVar, get_origin, get_type_hints

import typer

if TYPE_CHECKING:
    from watchdog.settings import CommandSettings

S = TypeVar("S", bound="CommandSettings")
P = ParamSpec("P")

# Exit codes, shared by every command (the table is in watchdog/cli.py's docstring).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DEADLOCK, EXIT_INCONCLUSIVE = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def err(msg: str) -> None:
    """A message for the user: stderr, one line, flushed (data goes to stdout)."""
    print(msg, file=sys.stderr, flush=True)


class GroupedCommand(typer.core.TyperCommand):
    """Plain click help (help text printed as written: rich markup would eat "[ratio*len, len]"),
    with the options listed under their ``rich_help_panel`` group."""

    def format_options(self, ctx: Any, formatter: Any) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            section = "Arguments" if param.param_type_name == "argument" else "Options"
            groups.setdefault(getattr(param, "rich_help_panel", None) or section, []).append(record)
        for section, rows in groups.items():
            with formatter.section(section):
                formatter.write_dl(rows)


def version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"watchdog {version('tp-deadlock-watchdog')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            print("watchdog (not installed)")
        raise typer.Exit(EXIT_OK)


def with_settings(model: type[S]) -> Callable[[Callable[Concatenate[S, P], int]], Callable[..., int]]:
    """Make ``func(settings, *own)`` a command with one ``--<name>`` option per field of ``model``
    (see watchdog/settings.py), grouped, each defaulting to None so that the file and the
    environment fill what the command line leaves out; the help shows the real default and the
    environment variable. The command receives the loaded, validated ``model``.

    typer reads a command's options from its signature, so the signature is built here from the
    model's fields (their own types: a ``Literal`` becomes a choice) instead of written out three
    times."""
    from watchdog.settings import FIELDS, GROUP, env_name, load

    def shown(name: str) -> str:
        value = FIELDS[name].default
        if value is None or value == "":
            return "none"
        return str(value).lower() if isinstance(value, bool) else str(value)

    def option(name: str) -> inspect.Parameter:
        kind = FIELDS[name].annotation
        assert kind is not None  # every field is annotated
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else []  # --no-x undoes a file or environment value
        text = f"{FIELDS[name].description}  [default: {shown(name)}; env: {env_name(name)}]"
        choice = get_origin(kind) is Literal
        info = typer.Option(
            *decls, help=text, show_default=False, rich_help_panel=GROUP[name], case_sensitive=not choice
        )
        return inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, info]
        )

    def wrap(func: Callable[Concatenate[S, P], int]) -> Callable[..., int]:
        hints = get_type_hints(func, include_extras=True)
        own = [
            p.replace(annotation=hints[p.name])
            for p in list(inspect.signature(func).parameters.values())[1:]  # the first one takes the settings
        ]
        config = inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Path | None, typer.Option(help="TOML settings file.  [env: WATCHDOG_CONFIG]", show_default=False)
            ],
        )
        params = [*own, config, *(option(name) for name in FIELDS if name in model.model_fields)]

        def command(**given: Any) -> int:
            args = {p.name: given.pop(p.name) for p in own}
            call: Callable[..., int] = func  # its own arguments come by keyword, as typer passes them
            return call(load(given.pop("config"), cli=given, model=model), **args)

        command.__name__, command.__qualname__, command.__doc__ = func.__name__, func.__qualname__, func.__doc__
        command.__signature__ = inspect.Signature(params, return_annotation=int)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params} | {"return": int}
        return command

    return wrap
