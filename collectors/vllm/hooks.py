"""The plugin's hooks into vLLM, one module per part; this module names what the rest of the
project uses (the plugin's ``register``, the contract and dispatch tests, ``watchdog bench plugin``).

- ``collectors.vllm.targets``: every hook target, named once, with the parameters the wrappers rely on;
- ``collectors.vllm.wrap``: the wrapper every hook is made with and each hook's on/off switch;
- ``collectors.vllm.worker``: the worker-side wrappers (graph keys, capture, step boundaries, collectives);
- ``collectors.vllm.engine``: the engine-side wrappers (the referee ledger, the shm rings);
- ``collectors.vllm.install``: wrapping each target present in this vLLM with its maker.
"""

from __future__ import annotations

from collectors.vllm.install import INSTALLED, Installed, install
from collectors.vllm.state import STATE
from collectors.vllm.targets import COLLECTIVE_OPS, TARGETS, WRAPPED, Target, resolve
from collectors.vllm.wrap import Hook, wrap

__all__ = [
    "COLLECTIVE_OPS",
    "INSTALLED",
    "STATE",
    "TARGETS",
    "WRAPPED",
    "Hook",
    "Installed",
    "Target",
    "install",
    "resolve",
    "wrap",
]
