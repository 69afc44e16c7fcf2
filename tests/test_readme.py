"""The README's two commands are the contract with a new user: CI must run the test one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick)


def test_quick_start_has_exactly_two_commands() -> None:
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    assert "watchdog demo" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_every_fault_is_documented() -> None:
    from watchdog.demo.faults import FAULTS

    text = (ROOT / "README.md").read_text()
    for fault in FAULTS:
        assert f"`{fault}`" in text, fault
