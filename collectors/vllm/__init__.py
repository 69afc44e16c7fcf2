"""vLLM general plugin: every EngineCore and worker process of a vLLM server writes its ledger.

Registered under the ``vllm.general_plugins`` entry point group (so installing this project into
a vLLM image is enough, and ``VLLM_PLUGINS`` can filter it out). vLLM calls ``register()`` in the
API server, in EngineCore and in every worker before the worker is built. It does nothing unless
``WATCHDOG_LEDGER_DIR`` is set; then it wraps the hook targets present in this vLLM
(``collectors.vllm.targets.TARGETS``). Ledgers are opened lazily, in the first hook that fires in a
process. No prompt text, token ids or request ids are recorded: shapes and counts only.
"""

from __future__ import annotations

import logging

from collectors.vllm.state import ENV_LEDGER_DIR, ledger_dir

log = logging.getLogger("watchdog.vllm")

__all__ = ["ENV_LEDGER_DIR", "register"]


def register() -> None:
    """The entry point vLLM's ``load_general_plugins()`` calls. Never raises."""
    if ledger_dir() is None:
        return
    try:
        from collectors.vllm.install import install

        installed = install()
        log.info("watchdog: %d vLLM hooks installed, ledgers in %s", len(installed.hooks), ledger_dir())
    except Exception as exc:  # a broken plugin must never stop vLLM
        log.warning("watchdog: vLLM plugin disabled: %r", exc)
