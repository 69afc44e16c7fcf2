"""The CLI behaves like the tools on-call engineers know: --version, per-command grouped help with
defaults and environment names, exit 2 for every usage error, help printed as written, no
temporary directories left behind, and an agent that makes its ledger directory."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from watchdog.cli import EXIT_OK, EXIT_USAGE, main
from watchdog.settings import FIELDS, GROUP, Settings, commands_of, fields_of

ROOT = Path(__file__).resolve().parent.parent


def help_of(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    assert main([*command, "--help"]) == EXIT_OK
    return capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"watchdog {version('tp-deadlock-watchdog')}"


@pytest.mark.parametrize("command", ["agent", "coordinator", "run"])
def test_each_command_lists_only_its_own_settings_grouped_with_defaults(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_of(capsys, command)
    flat = " ".join(text.split())  # the help wraps lines
    own = set(fields_of(command))
    defaults = Settings()
    for name in FIELDS:
        flag = f"--{name.replace('_', '-')} "
        listed = flag in text or f"--{name.replace('_', '-')} /" in text
        assert listed == (name in own), (command, name)
        if name in own:
            assert f"env: WATCHDOG_{name.upper()}]" in flat, name
            assert f"{GROUP[name]}:\n" in text  # its group's heading
    assert f"[default: {defaults.host}; env: WATCHDOG_HOST]" in flat
    assert f"[default: {defaults.port}; env: WATCHDOG_PORT]" in flat
    assert "<bool>" not in text


def test_every_setting_is_read_by_some_command() -> None:
    assert set(GROUP) == set(FIELDS) == set(Settings.model_fields)
    assert all(commands_of(n) for n in FIELDS)


def test_choices_are_listed_and_checked_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--on-give-up <stop|up>" in help_of(capsys, "run")
    assert "--on-deadlock <report|evict>" in help_of(capsys, "coordinator")
    assert main(["run", "--on-give-up", "later", "--", "true"]) == EXIT_USAGE
    assert "'later' is not one of 'stop', 'up'" in capsys.readouterr().err


def test_help_is_printed_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(help_of(capsys, "demo").split())
    assert "Lengths drawn from [ratio*len, len], as SGLang's." in text
    assert "--keep" in text and "start-up included" in text


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--fault", "nope"],
        ["demo", "--cudagraph-mode", "FULL"],
        ["demo", "--tp", "0"],
        ["demo", "--tp", "2", "--fault", "host-hang", "--fault-rank", "5"],
        ["demo", "--range-ratio", "2"],
        ["agent", "--no-such-option"],
        ["agent", "--port", "x"],
        ["agent", "--log-format", "yaml"],
        ["diagnose"],
        ["nonsense"],
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("watchdog: ") or "Usage:" in err, err
    assert "Traceback" not in err


def test_no_args_is_help_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_USAGE


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_removes_its_temporary_directory_unless_kept(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    argv = [sys.executable, "-m", "watchdog.cli", "demo", "--tp", "1", "--requests", "4", "--output-len", "4",
            "--no-fallback", "--timeout", "200"]  # fmt: skip
    cp = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=220, cwd=ROOT)
    assert cp.returncode == 0, cp.stderr
    assert "Warning" not in cp.stderr, cp.stderr
    assert not list(tmp_path.glob("watchdog-demo-*")), (list(tmp_path.iterdir()), cp.stderr)
    cp = subprocess.run([*argv, "--keep"], env=env, capture_output=True, text=True, timeout=220, cwd=ROOT)
    assert cp.returncode == 0, cp.stderr
    kept = [p.name for p in tmp_path.glob("watchdog-demo-*")]
    assert len(kept) == 1 and kept[0].startswith("watchdog-demo-"), kept
    assert not list((tmp_path / kept[0]).glob("pg-store-*"))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_agent_prints_the_agents_cost(capsys: pytest.CaptureFixture[str]) -> None:
    # Figures only (a speed target is not a unit test): that it measured what it says it measured.
    import json

    assert main(["bench", "agent", "--tp", "2", "--seconds", "3", "--warmup", "3", "--json"]) == EXIT_OK
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert run["tp"] == 2 and run["ranks_seen"] == 2 and run["incidents"] == 0
    assert run["steps_per_s_written"] > 10 and run["agent_rss_mib"] > 10
    assert 0 < run["agent_cpu_share_of_one_core_pct"] < 100
    assert main(["bench", "agent", "--rate", "0"]) == EXIT_USAGE


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ctrl_c_of_the_demo_exits_130_without_tracebacks(tmp_path: Path) -> None:
    import signal
    import time

    log = tmp_path / "demo.log"
    argv = [sys.executable, "-m", "watchdog.cli", "demo", "--no-fallback", "--tp", "2", "--requests", "100000",
            "--workdir", str(tmp_path / "w"), "--timeout", "200"]  # fmt: skip
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 200
        while "bench client:" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        assert proc.wait(60) == 130
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = log.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert text.rstrip().endswith("watchdog: interrupted")
