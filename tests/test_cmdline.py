"""watchdog.supervisor.cmdline: one merged --compilation-config with the new cudagraph mode, all else kept."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watchdog.supervisor.cmdline import (
    CUDAGRAPH_MODES,
    CmdlineError,
    compilation_config_of,
    cudagraph_mode_of,
    with_cudagraph_mode,
)

SERVE = ["vllm", "serve", "meta-llama/Llama-3.1-8B", "-tp", "2"]
OPS = '{"custom_ops":["+rms_norm"],"cudagraph_mode":"FULL_AND_PIECEWISE"}'


def cc(config: dict[str, Any]) -> list[str]:
    return ["--compilation-config", json.dumps(config, separators=(",", ":"))]


def flag_value(argv: list[str]) -> dict[str, Any]:
    """The one emitted --compilation-config value, parsed."""
    at = [i for i, a in enumerate(argv) if a == "--compilation-config"]
    assert len(at) == 1, argv
    value: dict[str, Any] = json.loads(argv[at[0] + 1])
    return value


# --- where the compilation config can be, and what comes out -------------------------------------

REWRITES: list[tuple[str, list[str], list[str]]] = [
    ("none given: appended at the end", [*SERVE, "--port", "8000"], [*SERVE, "--port", "8000", *cc({})]),
    (
        "long, separate value",
        [*SERVE, "--compilation-config", OPS, "--port", "1"],
        [*SERVE, *cc({"custom_ops": ["+rms_norm"]}), "--port", "1"],
    ),
    ("long, = value", [*SERVE, f"--compilation-config={OPS}"], [*SERVE, *cc({"custom_ops": ["+rms_norm"]})]),
    ("long, underscores", [*SERVE, "--compilation_config", OPS], [*SERVE, *cc({"custom_ops": ["+rms_norm"]})]),
    ("argparse abbreviation", [*SERVE, "--compilation", OPS], [*SERVE, *cc({"custom_ops": ["+rms_norm"]})]),
    ("-cc, separate value", [*SERVE, "-cc", OPS], [*SERVE, *cc({"custom_ops": ["+rms_norm"]})]),
    ("-cc, = value", [*SERVE, f"-cc={OPS}"], [*SERVE, *cc({"custom_ops": ["+rms_norm"]})]),
    ("-O JSON (old alias)", [*SERVE, "-O", OPS], [*SERVE, *cc({"custom_ops": ["+rms_norm"]})]),
    ("-O{JSON} attached", [*SERVE, f"-O{OPS}"], [*SERVE, *cc({"custom_ops": ["+rms_norm"]})]),
    ("-O={JSON}", [*SERVE, f"-O={OPS}"], [*SERVE, *cc({"custom_ops": ["+rms_norm"]})]),
    ("-O3 is an optimization level", [*SERVE, "-O3"], [*SERVE, "-O3", *cc({})]),
    ("-O 3 is an optimization level", [*SERVE, "-O", "3", "-cc", "{}"], [*SERVE, "-O", "3", *cc({})]),
    ("-O=2 and -Odecode kept", [*SERVE, "-O=2", "-Odecode"], [*SERVE, "-O=2", "-Odecode", *cc({})]),
    ("dotted, separate value", [*SERVE, "--compilation-config.cudagraph_mode", "FULL"], [*SERVE, *cc({})]),
    ("dotted, = value", [*SERVE, "--compilation-config.mode=3"], [*SERVE, *cc({"mode": 3})]),
    (
        "dotted -cc, nested",
        [*SERVE, "-cc.pass_config.enable_sp", "true"],
        [*SERVE, *cc({"pass_config": {"enable_sp": True}})],
    ),
    ("dotted -O. (deprecated alias)", [*SERVE, "-O.cudagraph_mode=FULL", "-O3"], [*SERVE, *cc({}), "-O3"]),
    ("dotted underscores in name", [*SERVE, "--compilation_config.mode", "2"], [*SERVE, *cc({"mode": 2})]),
    (
        "several: replaced where the first stood",
        ["vllm", "serve", "m", "-cc.mode", "3", "--port", "1", "-cc", OPS, "--enforce-eager"],
        ["vllm", "serve", "m", *cc({"custom_ops": ["+rms_norm"], "mode": 3}), "--port", "1", "--enforce-eager"],
    ),
    (
        "--config-format is not --config",
        [*SERVE, "--config-format", "hf", "-cc", "{}"],
        [*SERVE, "--config-format", "hf", *cc({})],
    ),
    (
        "other JSON-valued flags untouched",
        [*SERVE, "--speculative-config", '{"method":"mtp","cudagraph_mode":"FULL"}', '--hf-overrides={"a":1}'],
        [*SERVE, "--speculative-config", '{"method":"mtp","cudagraph_mode":"FULL"}', '--hf-overrides={"a":1}', *cc({})],
    ),
    (
        "-- separators kept; flags after them found",
        [
            "torchrun",
            "--nproc-per-node",
            "1",
            "--",
            "python",
            "-m",
            "vllm.entrypoints.openai.api_server",
            "-cc",
            OPS,
            "--",
            "x",
        ],
        [
            "torchrun",
            "--nproc-per-node",
            "1",
            "--",
            "python",
            "-m",
            "vllm.entrypoints.openai.api_server",
            *cc({"custom_ops": ["+rms_norm"]}),
            "--",
            "x",
        ],
    ),
    (
        "--config=FILE is not read by vLLM: left alone",
        [*SERVE, "--config=nowhere.yaml"],
        [*SERVE, "--config=nowhere.yaml", *cc({})],
    ),
]


@pytest.mark.parametrize("mode", ["FULL_DECODE_ONLY", "NONE"])
@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in REWRITES], ids=[c[0] for c in REWRITES])
def test_rewrites(argv: list[str], expected: list[str], mode: str) -> None:
    out = with_cudagraph_mode(argv, mode)
    at = expected.index("--compilation-config")
    assert out[: at + 1] == expected[: at + 1] and out[at + 2 :] == expected[at + 2 :]
    assert json.loads(out[at + 1]) == {**json.loads(expected[at + 1]), "cudagraph_mode": mode}
    assert out[at + 1] == json.dumps(json.loads(out[at + 1]), separators=(",", ":"))  # compact
    assert cudagraph_mode_of(out) == mode
    assert with_cudagraph_mode(out, mode) == out


MERGES: list[tuple[str, list[str], dict[str, Any]]] = [
    (
        "later JSON wins per key",
        ["-cc", '{"mode":1,"custom_ops":["+a"]}', "-cc", '{"mode":3}'],
        {"mode": 3, "custom_ops": ["+a"]},
    ),
    (
        "nested dicts merge",
        ["-cc", '{"pass_config":{"enable_sp":true,"x":1}}', '--compilation-config={"pass_config":{"x":2}}'],
        {"pass_config": {"enable_sp": True, "x": 2}},
    ),
    (
        "dotted beats JSON even when written first",
        ["-cc.mode", "1", "-cc", '{"mode":3,"level":0}'],
        {"mode": 1, "level": 0},
    ),
    ("dotted: later wins", ["-cc.mode=1", "--compilation-config.mode=2"], {"mode": 2}),
    (
        "dotted values parse like vLLM's",
        [
            "-cc.a",
            "7",
            "-cc.b=1.5",
            "-cc.c",
            "false",
            "-cc.d",
            "PIECEWISE",
            "-cc.e",
            "null",
            "-cc.f",
            "[1,2]",
            "-cc.g",
            '{"h":1}',
            "-cc.i",
            "80g",
            "-cc.j",
            "1K",
            "-cc.k",
            "2.5K",
            "-cc.l",
            "a,b",
            "-cc.m",
            '"7"',
        ],
        {
            "a": 7,
            "b": 1.5,
            "c": False,
            "d": "PIECEWISE",
            "e": None,
            "f": [1, 2],
            "g": {"h": 1},
            "i": 80 * 10**9,
            "j": 1024,
            "k": "2.5K",
            "l": "a,b",
            "m": "7",
        },
    ),
    (
        "dotted +: comma-split list, lists from dotted args concatenate",
        ["-cc.custom_ops+", "+rms_norm,-silu", "-cc.custom_ops+=+quant"],
        {"custom_ops": ["+rms_norm", "-silu", "+quant"]},
    ),
    (
        "dotted list replaces a JSON list",
        ["-cc", '{"custom_ops":["+a"]}', "-cc.custom_ops+", "+b"],
        {"custom_ops": ["+b"]},
    ),
    ("a . in the JSON value is not a dotted key", ['--compilation-config={"a.b":1.5}'], {"a.b": 1.5}),
]


@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in MERGES], ids=[c[0] for c in MERGES])
def test_merge_precedence(args: list[str], expected: dict[str, Any]) -> None:
    argv = [*SERVE, *args]
    assert compilation_config_of(argv) == expected
    assert flag_value(with_cudagraph_mode(argv, "NONE")) == {**expected, "cudagraph_mode": "NONE"}


def test_custom_ops_and_other_keys_kept() -> None:
    config = {"custom_ops": ["none", "+rms_norm"], "pass_config": {"fuse_allreduce_rms": True}, "splitting_ops": []}
    out = with_cudagraph_mode([*SERVE, "-cc", json.dumps({**config, "cudagraph_mode": "FULL"})], "NONE")
    assert flag_value(out) == {**config, "cudagraph_mode": "NONE"}


def test_mode_of() -> None:
    assert cudagraph_mode_of(SERVE) is None
    assert cudagraph_mode_of([*SERVE, "-O1"]) is None  # a level implies a default; it names no mode
    assert cudagraph_mode_of([*SERVE, "-cc", '{"cudagraph_mode":"full_decode_only"}']) == "FULL_DECODE_ONLY"
    assert cudagraph_mode_of([*SERVE, "-cc", '{"cudagraph_mode":null}']) is None
    assert (
        cudagraph_mode_of([*SERVE, "-cc", '{"cudagraph_mode":"NONE"}', "-cc.cudagraph_mode", "PIECEWISE"])
        == "PIECEWISE"
    )
    with pytest.raises(CmdlineError, match="not a mode name"):
        cudagraph_mode_of([*SERVE, "-cc", '{"cudagraph_mode":[2,0]}'])


def test_input_not_modified() -> None:
    argv = [*SERVE, "-cc", OPS]
    before = list(argv)
    with_cudagraph_mode(argv, "NONE")
    assert argv == before
    assert isinstance(with_cudagraph_mode(tuple(argv), "NONE"), list)


# --- the demo's own flag -------------------------------------------------------------------------

DEMO = [sys.executable, "-m", "watchdog.cli", "demo", "--no-watch", "--tp", "2"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            [*DEMO, "--cudagraph-mode", "FULL_AND_PIECEWISE", "--fault", "x"],
            [*DEMO, "--cudagraph-mode", "NONE", "--fault", "x"],
        ),
        ([*DEMO, "--cudagraph-mode=FULL_AND_PIECEWISE"], [*DEMO, "--cudagraph-mode=NONE"]),
        (
            [*DEMO, "--cudagraph-mode", "FULL", "--cudagraph-mode=PIECEWISE"],
            [*DEMO, "--cudagraph-mode", "NONE", "--cudagraph-mode=NONE"],
        ),
    ],
)
def test_demo_flag(argv: list[str], expected: list[str]) -> None:
    out = with_cudagraph_mode(argv, "NONE")
    assert out == expected
    assert cudagraph_mode_of(out) == "NONE"
    assert "--compilation-config" not in out


def test_demo_flag_mode_of() -> None:
    assert cudagraph_mode_of([*DEMO, "--cudagraph-mode", "FULL_DECODE_ONLY"]) == "FULL_DECODE_ONLY"
    assert cudagraph_mode_of([*DEMO, "--cudagraph-mode", "FULL", "--cudagraph-mode=NONE"]) == "NONE"


# --- the --config YAML file ----------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_config_file_mapping_merged_not_edited(tmp_path: Path) -> None:
    text = (
        "port: 8000\n"
        "compilation-config:\n"
        "  custom_ops: ['+rms_norm']\n"
        "  cudagraph_mode: FULL_AND_PIECEWISE\n"
        "  pass_config: {enable_sp: true, x: 1}\n"
    )
    cfg = write(tmp_path / "c.yaml", text)
    argv = [*SERVE, "--config", str(cfg), "--port", "9"]
    assert cudagraph_mode_of(argv) == "FULL_AND_PIECEWISE"
    out = with_cudagraph_mode(argv, "FULL_DECODE_ONLY")
    assert out == [
        *argv,
        *cc(
            {
                "custom_ops": ["+rms_norm"],
                "cudagraph_mode": "FULL_DECODE_ONLY",
                "pass_config": {"enable_sp": True, "x": 1},
            }
        ),
    ]
    assert cfg.read_text(encoding="utf-8") == text
    assert with_cudagraph_mode(out, "FULL_DECODE_ONLY") == out


def test_config_file_json_string_and_cli_override(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yml", 'compilation_config: \'{"mode": 3, "custom_ops": ["+a"]}\'\n')
    argv = [*SERVE, "-cc", '{"mode": 1}', "--config", str(cfg)]
    out = with_cudagraph_mode(argv, "NONE")
    assert out == [*SERVE, *cc({"mode": 1, "custom_ops": ["+a"], "cudagraph_mode": "NONE"}), "--config", str(cfg)]


def test_config_file_dotted_keys(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "compilation_config.cudagraph_mode: PIECEWISE\ncompilation-config.mode: '3'\n")
    argv = [*SERVE, "--config", "c.yaml", "-cc", '{"mode": 1, "cudagraph_mode": "FULL"}']
    # dotted entries (even the file's) are appended after every plain JSON value: they win
    assert compilation_config_of(argv, cwd=tmp_path) == {"mode": 3, "cudagraph_mode": "PIECEWISE"}
    assert cudagraph_mode_of(argv, cwd=tmp_path) == "PIECEWISE"
    assert cudagraph_mode_of([*argv, "-cc.cudagraph_mode", "NONE"], cwd=cfg.parent) == "NONE"


def test_config_file_without_compilation_config(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "port: 8000\nspeculative-config: {method: mtp}\n")
    argv = [*SERVE, "--config", str(cfg)]
    assert with_cudagraph_mode(argv, "NONE") == [*argv, *cc({"cudagraph_mode": "NONE"})]


CONFIG_ERRORS = [
    ("compilation-config: [1, 2]\n", "list value"),
    ("compilation_config.use_cudagraph: false\n", "bool value"),
    ("compilation-config: '{bad'\n", "invalid JSON"),
    ("compilation-config: 3\n", "expected a JSON object"),
    ("- a\n- b\n", "expected a mapping"),
    ("", "expected a mapping"),
    ("a: [\n", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "message"), CONFIG_ERRORS)
def test_config_file_errors(tmp_path: Path, text: str, message: str) -> None:
    cfg = write(tmp_path / "c.yaml", text)
    with pytest.raises(CmdlineError, match=message) as info:
        with_cudagraph_mode([*SERVE, "--config", str(cfg)], "NONE")
    assert "\n" not in str(info.value)


def test_config_file_unreadable_or_foreign(tmp_path: Path) -> None:
    with pytest.raises(CmdlineError, match="cannot read"):
        with_cudagraph_mode([*SERVE, "--config", str(tmp_path / "missing.yaml")], "NONE")
    with pytest.raises(CmdlineError, match=r"only \.yaml/\.yml"):
        with_cudagraph_mode([*SERVE, "--config", str(write(tmp_path / "c.json", "{}"))], "NONE")
    with pytest.raises(CmdlineError, match="more than one --config"):
        with_cudagraph_mode([*SERVE, "--config", "a.yaml", "--config", "b.yaml"], "NONE")


def test_pyyaml_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` raise ImportError
    assert with_cudagraph_mode([*SERVE, "-cc", "{}"], "NONE") == [*SERVE, *cc({"cudagraph_mode": "NONE"})]
    cfg = write(tmp_path / "c.yaml", "port: 1\n")
    with pytest.raises(CmdlineError, match="needs PyYAML"):
        with_cudagraph_mode([*SERVE, "--config", str(cfg)], "NONE")


# --- refused input -------------------------------------------------------------------------------

ERRORS: list[tuple[list[str], str, str]] = [
    ([*SERVE, "-cc"], "NONE", "-cc needs a value"),
    ([*SERVE, "--compilation-config.mode"], "NONE", r"--compilation-config\.mode needs a value"),
    ([*SERVE, "--config"], "NONE", "--config needs a file"),
    ([*SERVE, "-cc", "{'mode': 3}"], "NONE", "^-cc: invalid JSON"),
    ([*SERVE, '--compilation-config={"mode":}'], "NONE", "^--compilation-config: invalid JSON"),
    ([*SERVE, "--compilation_config", "{"], "NONE", "^--compilation_config: invalid JSON"),
    ([*SERVE, "-O", "{nope}"], "NONE", "^-O: invalid JSON"),
    ([*SERVE, "--compilation-config", "3"], "NONE", "expected a JSON object"),
    ([*SERVE, "-cc", "[]"], "NONE", "expected a JSON object"),
    ([*SERVE, "-cc.", "1"], "NONE", "empty key"),
    ([*SERVE, "-cc.a..b", "1"], "NONE", "empty key"),
    ([*DEMO, "--cudagraph-mode", "NONE", "-cc", "{}"], "NONE", "ambiguous"),
    ([*DEMO, "--cudagraph-mode"], "NONE", "--cudagraph-mode needs a value"),
    (SERVE, "full", "cudagraph mode 'full'"),
    (SERVE, "FULL_AND_DECODE", "choose one of NONE, PIECEWISE, FULL, FULL_DECODE_ONLY, FULL_AND_PIECEWISE"),
]


@pytest.mark.parametrize(("argv", "mode", "message"), ERRORS)
def test_refused(argv: list[str], mode: str, message: str) -> None:
    with pytest.raises(CmdlineError, match=message) as info:
        with_cudagraph_mode(argv, mode)
    assert "\n" not in str(info.value)


def test_error_is_a_watchdog_error() -> None:
    from watchdog.errors import WatchdogError

    assert issubclass(CmdlineError, WatchdogError)


# --- properties ----------------------------------------------------------------------------------

WORD = st.from_regex(r"[A-Za-z0-9/_.:]{1,12}", fullmatch=True)
SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=False, allow_infinity=False), WORD
)
JSONISH = st.recursive(
    SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(WORD, inner, max_size=3)), max_leaves=6
)
KEY = st.sampled_from(["custom_ops", "pass_config", "mode", "cudagraph_mode", "splitting_ops", "x_y"])
CONFIG = st.dictionaries(KEY, JSONISH, max_size=4)

UNRELATED = st.one_of(
    st.tuples(st.just("--port"), st.integers(1024, 65535).map(str)).map(list),
    st.tuples(st.sampled_from(["-tp", "--served-model-name", "--config-format", "--compile-cache"]), WORD).map(list),
    st.sampled_from([["--enforce-eager"], ["--"], ["-O3"], ["-O", "2"], ["-O=1"], ["--no-enable-prefix-caching"]]),
    st.builds(lambda d: ["--speculative-config", json.dumps(d)], CONFIG),
    st.builds(lambda d: [f"--hf-overrides={json.dumps(d)}"], CONFIG),
    WORD.map(lambda w: [w]),
)


def _dotted(keys: list[str], value: str, eq: bool, name: str, plus: bool) -> list[str]:
    flag = f"{name}.{'.'.join(keys)}{'+' if plus else ''}"
    return [f"{flag}={value}"] if eq else [flag, value]


DOTTED_VALUE = st.one_of(SCALAR.map(json.dumps), WORD, st.sampled_from(["80g", "1K", "+rms_norm,-silu", "FULL"]))
COMPILATION = st.one_of(
    st.builds(
        lambda flag, d, eq: [f"{flag}={json.dumps(d)}"] if eq else [flag, json.dumps(d)],
        st.sampled_from(["--compilation-config", "--compilation_config", "-cc", "-O"]),
        CONFIG,
        st.booleans(),
    ),
    st.builds(lambda d: [f"-O{json.dumps(d)}"], CONFIG),
    st.builds(
        _dotted,
        st.lists(KEY, min_size=1, max_size=3),
        DOTTED_VALUE,
        st.booleans(),
        st.sampled_from(["--compilation-config", "-cc", "-O", "--compilation_config"]),
        st.booleans(),
    ),
)


@st.composite
def commands(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    """(argv, the unrelated arguments in order)."""
    argv = ["vllm", "serve", draw(WORD)]
    unrelated = list(argv)
    for _ in range(draw(st.integers(0, 10))):
        if draw(st.booleans()):
            seg = draw(COMPILATION)
        else:
            seg = draw(UNRELATED)
            unrelated += seg
        argv += seg
    return argv, unrelated


MODE = st.sampled_from(CUDAGRAPH_MODES)


@settings(max_examples=300, deadline=None)
@given(commands(), MODE)
def test_property_round_trip_one_flag_rest_kept(cmd: tuple[list[str], list[str]], mode: str) -> None:
    argv, unrelated = cmd
    out = with_cudagraph_mode(argv, mode)
    assert cudagraph_mode_of(out) == mode
    # exactly one compilation flag, the long one; removing it leaves the unrelated arguments, in order
    at = [i for i, a in enumerate(out) if a == "--compilation-config"]
    assert len(at) == 1
    assert out[: at[0]] + out[at[0] + 2 :] == unrelated
    assert not any(
        a.startswith(("-cc", "--compilation", "-O{", "-O.", "-O={")) for a in out[: at[0]] + out[at[0] + 2 :]
    )
    # every key kept; only the mode changed
    assert compilation_config_of(out) == {**compilation_config_of(argv), "cudagraph_mode": mode}


@settings(max_examples=200, deadline=None)
@given(commands(), MODE, MODE)
def test_property_idempotent_and_last_mode_wins(cmd: tuple[list[str], list[str]], first: str, second: str) -> None:
    argv, _ = cmd
    once = with_cudagraph_mode(argv, second)
    assert with_cudagraph_mode(once, second) == once
    assert with_cudagraph_mode(with_cudagraph_mode(argv, first), second) == once


@settings(max_examples=100, deadline=None)
@given(st.lists(UNRELATED, max_size=6), st.lists(UNRELATED, max_size=6), MODE, MODE, st.booleans())
def test_property_demo_flag(before: list[list[str]], after: list[list[str]], old: str, new: str, eq: bool) -> None:
    head = [a for seg in before for a in seg]
    tail = [a for seg in after for a in seg]
    flag = [f"--cudagraph-mode={old}"] if eq else ["--cudagraph-mode", old]
    out = with_cudagraph_mode([*DEMO, *head, *flag, *tail], new)
    assert out == [*DEMO, *head, *([f"--cudagraph-mode={new}"] if eq else ["--cudagraph-mode", new]), *tail]
    assert cudagraph_mode_of(out) == new


# --- vLLM's own parser (real vLLM 0.20.1 and 0.33.0, in the environments tests/vllm_envs.py builds) ---


@pytest.mark.timeout(900)
@pytest.mark.parametrize("version", ["0.20.1", "0.33.0"])
def test_vllm_parses_the_emitted_flag(version: str) -> None:
    """One merged --compilation-config: vLLM's parser sees the new mode and keeps the other keys."""
    sys.path.insert(0, str(Path(__file__).parent))
    from vllm_envs import run_child

    got = run_child(version, "cmdline_vllm_child.py", "FULL_DECODE_ONLY", "NONE", timeout=300)
    for mode in ("FULL_DECODE_ONLY", "NONE"):
        assert got[mode] == {"cudagraph_mode": mode, "custom_ops": ["+rms_norm"], "mode": 3}, (version, got)
