"""Settings: defaults < TOML file < WATCHDOG_* environment < command line; bad values are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from watchdog.cli import EXIT_ERROR, main, openapi_schema
from watchdog.errors import WatchdogError
from watchdog.settings import FIELDS, HELP, Settings, load, markdown_table, parse_ranks

ROOT = Path(__file__).resolve().parent.parent


def test_precedence_file_then_env_then_cli(tmp_path: Path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text('port = 9000\ntp_group = "from-file"\nnative_stacks = false\nranks = "0-1"\nstall_floor_s = 2\n')
    s = load(cfg, env={}, cli={})
    assert (s.port, s.tp_group, s.native_stacks, s.owned_ranks(), s.stall_floor_s) == (
        9000,
        "from-file",
        False,
        frozenset({0, 1}),
        2.0,
    )
    env = {"WATCHDOG_PORT": "9100", "WATCHDOG_TP_GROUP": "from-env", "WATCHDOG_NATIVE_STACKS": "yes"}
    s = load(cfg, env=env, cli={})
    assert (s.port, s.tp_group, s.native_stacks) == (9100, "from-env", True)
    s = load(cfg, env=env, cli={"port": 9200, "tp_group": None})
    assert (s.port, s.tp_group) == (9200, "from-env")  # None on the CLI means "not given"
    assert load(env={"WATCHDOG_CONFIG": str(cfg)}).port == 9000
    assert load(env={}) == Settings()


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("port = 'x'", {}, r"port = 'x' is not a valid int"),
        ("colour = 1", {}, r"unknown setting 'colour'"),
        ("port = [", {}, r"not valid TOML"),
        ("", {"WATCHDOG_NATIVE_STACKS": "maybe"}, r"environment WATCHDOG_NATIVE_STACKS: native_stacks = 'maybe'"),
        ("", {"WATCHDOG_RANKS": "0-x"}, r"ranks '0-x'"),
        ("port = 70000", {}, r"port 70000: must be 1-65535"),
        ("poll_interval_s = 0", {}, r"poll_interval_s = 0.0: must be positive"),
        ("on_deadlock = 'reboot'", {}, r"on_deadlock 'reboot': choose 'report' or 'evict'"),
        ("on_deadlock = 'evict'", {"WATCHDOG_POD_NAME": "p"}, r"need pod_name and pod_namespace"),
        ("upstream = 'localhost:8000'", {}, r"upstream 'localhost:8000': give the server's base URL"),
    ],
)
def test_bad_settings_are_one_line(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text(text)
    with pytest.raises(WatchdogError, match=message) as info:
        load(cfg, env=env)
    assert "\n" not in str(info.value)


def test_cli_bad_setting_exits_1_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "--ledger-dir", str(tmp_path), "--config", str(tmp_path / "none.toml")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("watchdog: config ") and err.count("\n") == 1
    assert main(["coordinator", "--incidents-dir", str(tmp_path)]) == EXIT_ERROR
    assert "agents: give the member agents' base URLs" in capsys.readouterr().err


def test_ranks_spec() -> None:
    assert parse_ranks("") is None
    assert parse_ranks("0-3") == frozenset(range(4))
    assert parse_ranks("4,5, 7-8") == frozenset({4, 5, 7, 8})


def test_every_setting_is_documented_and_in_the_readme() -> None:
    assert set(HELP) == set(FIELDS)
    assert markdown_table() in (ROOT / "README.md").read_text(), "regenerate: markdown_table()"


def test_committed_openapi_schema_is_current() -> None:
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert committed == openapi_schema(), "regenerate with: watchdog openapi > docs/openapi.json"
