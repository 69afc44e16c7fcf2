"""Contract tests against real vLLM 0.20.1 and 0.33.0 (CPU): every hook target exists with the
parameters the plugin relies on, and the plugin loads through vLLM's own ``load_general_plugins()``.

The environments are built on first use (tests/vllm_envs.py). Without network they skip, except in
CI (``WATCHDOG_CI=1``), where they fail. The checks run in the environment's python, in a subprocess:
this test process never imports vLLM.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from vllm_envs import VERSIONS, run_child

# Real vLLM code (environments built once by tests/vllm_envs.py); one worker runs the module (--dist
# loadgroup), so each version's child runs once.
pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm-contract")]


_BOTH: dict[str, dict[str, Any]] = {}


def _both(version: str, ledger_dir: Path) -> dict[str, Any]:
    """Targets checked and plugins loaded in one child per version (one vLLM import: CI time; the
    tests of a version share an xdist group, so one worker runs that child once)."""
    if version not in _BOTH:
        _BOTH[version] = run_child(version, "vllm_contract_child.py", WATCHDOG_LEDGER_DIR=str(ledger_dir))
    return _BOTH[version]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("version", VERSIONS)
def test_every_hook_target_exists_with_its_signature(version: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    out = _both(version, tmp_path_factory.mktemp(f"ledgers-{version}"))
    assert out["vllm"] == version
    targets = out["targets"]
    assert targets["checked"] >= 10
    assert targets["missing"] == {}, f"vLLM {version}: hook targets gone: {targets['missing']}"
    assert targets["bad_signature"] == {}, f"vLLM {version}: hook targets changed: {targets['bad_signature']}"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("version", VERSIONS)
def test_plugin_loads_through_load_general_plugins(version: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    both = _both(version, tmp_path_factory.mktemp(f"ledgers-{version}"))
    out = both["plugins"]
    assert "watchdog=collectors.vllm:register" in out["entry_points"], (
        "entry point vllm.general_plugins 'watchdog = collectors.vllm:register' is not installed: "
        "add it to pyproject.toml and reinstall the project (pip install -e .)"
    )
    assert "vllm.distributed.parallel_state:GroupCoordinator._all_reduce_out_place" in out["wrapped"]
    assert len(out["wrapped"]) >= 10
    # filtered out by VLLM_PLUGINS, or no ledger directory: nothing is wrapped (loaded before, in the
    # same process)
    assert both["filtered"]["wrapped"] == [] and both["no_ledger_dir"]["wrapped"] == [], both
    assert "watchdog=collectors.vllm:register" in both["filtered"]["entry_points"]


def test_a_half_extracted_environment_is_not_used(tmp_path: Path) -> None:
    """A cached environment whose vLLM files are not all there (an interrupted or raced build) is rebuilt,
    not used: it imports as an empty namespace package and every vLLM test would fail on it."""
    import vllm_envs

    version = VERSIONS[0]
    env = tmp_path / f"vllm-{version}"
    site = env / "lib" / "python3.11" / "site-packages"
    (site / f"vllm-{version}.dist-info").mkdir(parents=True)
    (site / "vllm" / "plugins").mkdir(parents=True)
    (env / "bin").mkdir()
    (env / "bin" / "python").touch()
    (env / "pyvenv.cfg").write_text("include-system-site-packages = false\n")
    (env / "watchdog-stamp").write_text(vllm_envs._stamp(version))
    files = ["vllm/__init__.py", "vllm/plugins/__init__.py"]
    record = [f"{f},sha256=x,1" for f in files] + [f"vllm-{version}.dist-info/RECORD,,"]
    (site / f"vllm-{version}.dist-info" / "RECORD").write_text("\n".join(record) + "\n")
    (site / files[1]).touch()
    assert not vllm_envs._usable(env, version)  # vllm/__init__.py missing
    (site / files[0]).touch()
    assert vllm_envs._usable(env, version)
    (env / "watchdog-stamp").write_text("another build")
    assert not vllm_envs._usable(env, version)
