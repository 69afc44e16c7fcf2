"""The command line's option machinery: grouped plain help, --version, and one option per setting.

Kept apart from ``watchdog.cli`` (the commands) so that each stays readable in one sitting.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

EXIT_OK = 0


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


def with_settings(command: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Give a command one ``--<name>`` option per setting it reads (see watchdog/settings.py), grouped,
    each defaulting to None so that the file and the environment fill what the command line leaves out;
    the help shows the real default and the environment variable."""
    from watchdog.settings import FIELDS, HELP, SCOPE, Settings, env_name, fields_of

    kinds: dict[str, Any] = {"bool": bool, "int": int, "float": float, "str": str, "Path": Path, "Path | None": Path}
    defaults = Settings()

    def shown(name: str) -> str:
        value = getattr(defaults, name)
        if value is None or value == "":
            return "none"
        return str(value).lower() if isinstance(value, bool) else str(value)

    def wrap(func: Callable[..., int]) -> Callable[..., int]:
        own = [
            p.replace(
                annotation=Annotated[
                    list[str], typer.Argument(help="The server command, after --.", show_default=False)
                ]
            )
            for p in inspect.signature(func).parameters.values()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        ]
        params = [
            *own,
            inspect.Parameter(
                "config",
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[
                    Path | None, typer.Option(help="TOML settings file.  [env: WATCHDOG_CONFIG]", show_default=False)
                ],
            ),
        ]
        for name in fields_of(command):
            kind = kinds[str(FIELDS[name].type)]
            text = f"{HELP[name]}  [default: {shown(name)}; env: {env_name(name)}]"
            option = typer.Option(help=text, show_default=False, rich_help_panel=SCOPE[name][0])
            if kind is bool:  # --x / --no-x, so a command line can undo a file or environment value
                option = typer.Option(
                    f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}",
                    help=text,
                    show_default=False,
                    rich_help_panel=SCOPE[name][0],
                )
            params.append(
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
                )
            )
        func.__signature__ = inspect.Signature(params, return_annotation=int)  # type: ignore[attr-defined]
        func.__annotations__ = {p.name: p.annotation for p in params} | {"return": int}
        return func

    return wrap
