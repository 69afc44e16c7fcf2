"""Run in a real vLLM environment (tests/vllm_envs.py): parse what `with_cudagraph_mode` emits with
vLLM's own CLI parser. Prints ``RESULT {json}``: per mode, the parsed cudagraph_mode and custom_ops.

This machine has no GPU and the wheels were installed with --no-deps, so vLLM cannot infer its
platform; it is told: the CPU platform (vLLM's own class).
"""

from __future__ import annotations

import importlib
import json
import sys
import warnings

import vllm.platforms as platforms

from watchdog.supervisor.cmdline import with_cudagraph_mode

warnings.simplefilter("ignore")
if not getattr(platforms, "_current_platform", None):
    platforms._current_platform = importlib.import_module("vllm.platforms.cpu").CpuPlatform()
try:
    parser_cls = importlib.import_module("vllm.utils.argparse_utils").FlexibleArgumentParser
except (ImportError, AttributeError):  # older vLLM kept it in vllm.utils
    parser_cls = importlib.import_module("vllm.utils").FlexibleArgumentParser
engine_args = importlib.import_module("vllm.engine.arg_utils").EngineArgs

out = {}
for mode in sys.argv[1:]:
    parser = engine_args.add_cli_args(parser_cls())
    argv = ["--model", "facebook/opt-125m", "-cc", '{"custom_ops":["+rms_norm"]}', "-cc.mode", "3"]
    config = parser.parse_args(with_cudagraph_mode(argv, mode)).compilation_config
    got = config["cudagraph_mode"] if isinstance(config, dict) else config.cudagraph_mode
    ops = config["custom_ops"] if isinstance(config, dict) else config.custom_ops
    level = config.get("mode") if isinstance(config, dict) else getattr(config, "mode", None)
    out[mode] = {
        "cudagraph_mode": getattr(got, "name", str(got).upper()),
        "custom_ops": list(ops),
        "mode": int(level) if level is not None else None,
    }
print("RESULT " + json.dumps(out))
