"""Settings: defaults < TOML file < WATCHDOG_* environment < command line; bad values are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from watchdog.cli import EXIT_ERROR, main, openapi_schema
from watchdog.errors import ConfigError
from watchdog.settings import (
    FIELDS,
    AgentSettings,
    CoordinatorSettings,
    RunSettings,
    Settings,
    commands_of,
    load,
    markdown_table,
    parse_ranks,
)

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


def test_each_command_gets_its_own_model_from_one_shared_file(tmp_path: Path) -> None:
    # One file for every command: a command ignores the settings it does not read.
    cfg = tmp_path / "w.toml"
    cfg.write_text('agents = "http://a:1, http://b:2/"\nladder = "NONE"\nranks = "2-3"\nport = 9001\n')
    agent = load(cfg, env={}, model=AgentSettings)
    run = load(cfg, env={"WATCHDOG_AGENTS": "not read by run"}, model=RunSettings)
    coord = load(cfg, env={}, model=CoordinatorSettings)
    assert (type(agent), agent.port, agent.owned_ranks()) == (AgentSettings, 9001, frozenset({2, 3}))
    assert (run.port, run.ladder_modes(), run.state_file()) == (9001, ("NONE",), run.incidents_dir / "ladder.json")
    assert (coord.port, coord.agent_urls()) == (9001, ["http://a:1", "http://b:2"])
    assert not hasattr(run, "agents") and not hasattr(coord, "ladder") and not hasattr(agent, "upstream")
    assert set(AgentSettings.model_fields) | set(RunSettings.model_fields) | set(CoordinatorSettings.model_fields) == (
        set(FIELDS)
    )


def test_values_are_typed_and_choices_are_literals() -> None:
    s = load(env={"WATCHDOG_LOG_LEVEL": "WARNING", "WATCHDOG_API_TOKEN_FILE": "", "WATCHDOG_PROC_ROOT": "/host/proc"})
    assert (s.log_level, s.api_token_file, s.proc_root) == ("warning", None, Path("/host/proc"))
    with pytest.raises(Exception, match="frozen"):
        s.port = 1  # type: ignore[misc]
    assert load(env={}, cli={"native_stacks": False, "stall_floor_s": "2.5"}).stall_floor_s == 2.5


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("port = 'x'", {}, r"config .*w\.toml: port = 'x' is not a valid int$"),
        ("colour = 1", {}, r"unknown setting 'colour'"),
        ("port = [", {}, r"not valid TOML"),
        ("", {"WATCHDOG_NATIVE_STACKS": "maybe"}, r"^environment WATCHDOG_NATIVE_STACKS: native_stacks = 'maybe'"),
        ("", {"WATCHDOG_RANKS": "0-x"}, r"ranks = '0-x': expected e\.g\. '0-3'"),
        ("port = 70000", {}, r"port = 70000: must be 1-65535"),
        ("poll_interval_s = 0", {}, r"poll_interval_s = 0: must be positive"),
        ("max_restarts = -1", {}, r"max_restarts = -1: must be >= 0"),
        ("on_deadlock = 'reboot'", {}, r"on_deadlock = 'reboot': choose 'report' or 'evict'"),
        ("log_level = 'loud'", {}, r"log_level = 'loud': choose 'debug', 'info', 'warning' or 'error'"),
        ("on_deadlock = 'evict'", {"WATCHDOG_POD_NAME": "p"}, r"need pod_name and pod_namespace"),
        ("upstream = 'localhost:8000'", {}, r"upstream = 'localhost:8000': give the server's base URL"),
        ("port = 9000", {"WATCHDOG_PORT": "0"}, r"^environment WATCHDOG_PORT: port = '0': must be 1-65535"),
    ],
)
def test_bad_settings_are_one_line_naming_where(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load(cfg, env=env)
    assert "\n" not in str(info.value)


def test_a_bad_command_line_value_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--proxy-port: proxy_port = 70000: must be 0-65535$"):
        load(env={}, cli={"proxy_port": 70000}, model=RunSettings)


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
    with pytest.raises(ConfigError, match=r"ranks '3-x'"):
        parse_ranks("3-x")


def test_every_setting_is_documented_and_in_the_readme() -> None:
    assert all(f.description and commands_of(name) for name, f in FIELDS.items())
    assert markdown_table() in (ROOT / "README.md").read_text(), "regenerate: markdown_table()"


def test_committed_openapi_schema_is_current() -> None:
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert committed == openapi_schema(), "regenerate with: watchdog openapi > docs/openapi.json"
