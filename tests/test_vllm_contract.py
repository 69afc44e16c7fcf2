"""Contract tests against real vLLM 0.20.1 and 0.33.0 (CPU): every hook target exists with the
parameters the plugin relies on, and the plugin loads through vLLM's own ``load_general_plugins()``.

The environments are built on first use (tests/vllm_envs.py). Without network they skip, except in
CI (``WATCHDOG_CI=1``), where they fail. The checks run in the environment's python, in a subprocess:
this test process never imports vLLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from vllm_envs import VERSIONS, EnvUnavailable, env_python

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).parent / "vllm_contract_child.py"


def _python(version: str) -> Path:
    try:
        return env_python(version)
    except EnvUnavailable as exc:
        if os.environ.get("WATCHDOG_CI") == "1":
            pytest.fail(f"vLLM {version} environment could not be built: {exc}")
        pytest.skip(f"vLLM {version} environment could not be built (no network?): {exc}")


def _run(version: str, mode: str, **env: str) -> dict[str, object]:
    python = _python(version)
    full = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_LOGGING_LEVEL": "ERROR", **env}
    res = subprocess.run(
        [str(python), str(CHILD), mode], capture_output=True, text=True, timeout=240, env=full, cwd=ROOT
    )
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, f"child failed (exit {res.returncode}): {res.stderr[-2000:]}"
    return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("version", VERSIONS)
def test_every_hook_target_exists_with_its_signature(version: str) -> None:
    out = _run(version, "targets")
    assert out["vllm"] == version
    assert out["missing"] == {}, f"vLLM {version}: hook targets gone: {out['missing']}"
    assert out["bad_signature"] == {}, f"vLLM {version}: hook targets changed: {out['bad_signature']}"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("version", VERSIONS)
def test_plugin_loads_through_load_general_plugins(version: str, tmp_path: Path) -> None:
    out = _run(version, "plugins", WATCHDOG_LEDGER_DIR=str(tmp_path))
    assert "watchdog=collectors.vllm:register" in out["entry_points"], (
        "entry point vllm.general_plugins 'watchdog = collectors.vllm:register' is not installed: "
        "add it to pyproject.toml and reinstall the project (pip install -e .)"
    )
    assert "vllm.distributed.parallel_state:GroupCoordinator._all_reduce_out_place" in out["wrapped"]
    assert len(out["wrapped"]) >= 10  # type: ignore[arg-type]
    # filtered out by VLLM_PLUGINS, or no ledger directory: nothing is wrapped
    assert _run(version, "plugins", WATCHDOG_LEDGER_DIR=str(tmp_path), VLLM_PLUGINS="other")["wrapped"] == []
    assert _run(version, "plugins", WATCHDOG_LEDGER_DIR="")["wrapped"] == []
