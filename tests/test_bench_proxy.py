"""``watchdog bench proxy``: figures only (a speed target is not a unit test), that it measured what it
says it measured: both ways, every stream whole, the proxy's own CPU."""

from __future__ import annotations

import json

import pytest

from watchdog.cli import EXIT_OK, EXIT_USAGE, main


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_proxy_prints_its_figures(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "proxy", "--requests", "5", "--tokens", "4", "--concurrency", "8", "--stream-tokens", "4",
            "--seconds", "1", "--repeats", "1", "--open-streams", "8", "--json"]  # fmt: skip
    assert main(argv) == EXIT_OK
    fig = json.loads(capsys.readouterr().out)
    assert fig["concurrency"] == 8 and fig["open_streams"] == 8
    assert fig["request_ms_direct"] > 0 and fig["request_ms_proxy"] > 0
    assert fig["token_us_direct"] > 0 and fig["token_us_proxy"] > 0
    assert fig["streams_per_s_direct"] > 0 and fig["streams_per_s_proxy"] > 0
    # a second of streams through the proxy keeps it busy for a measurable share of that second
    assert fig["proxy_cpu_ms_per_stream_at_concurrency"] > 0
    assert fig["proxy_cpu_ms_per_request"] >= 0 and fig["proxy_cpu_us_per_token"] >= 0
    assert main(["bench", "proxy", "--requests", "0"]) == EXIT_USAGE
