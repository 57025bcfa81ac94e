"""max_in_flight="auto" in a real pool against the mock's continuous-batching model (a real HTTP
server on 127.0.0.1): the learned window lands near the capacity from the /metrics queue and from
latency alone, Retry-After pauses the whole endpoint, and a faster endpoint gets more work."""

from __future__ import annotations

import bisect
import logging
import re

import pytest

from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.llm.pool import Request
from nemocc_dask.llm.pools import new_pool
from nemocc_dask.recipe.presets import PRESETS
from nemocc_dask.testing.mock import MockLLMServer


def _requests(n: int, tag: str = ""):
    preset = PRESETS["knowledge_list"]
    settings = {"model": "mock", "max_tokens": 600}
    return [Request(f"{tag}{i}", preset.messages(
        f"Fact {i}{tag}. " + "The delta feeds the towns. " * (1 + i % 5)), settings)
        for i in range(n)]


def _learned_window(server, n: int) -> tuple[int, list[int]]:
    llm = LLMConfig(base_url=server.base_url, model="mock")
    pool = new_pool(llm, llm.in_flight_total)
    try:
        list(pool.stream(_requests(n)))
        endpoint = pool.endpoints[0]
        windows = [b["window"] for _, b in sorted(endpoint.series.buckets.items())]
        return endpoint.window, windows
    finally:
        pool.close()


@pytest.mark.slow
@pytest.mark.parametrize("metrics", [True, False])
def test_the_learned_window_lands_near_the_capacity(metrics, caplog):
    with MockLLMServer(capacity=32, per_token_latency=0.002, metrics=metrics) as server, \
            caplog.at_level(logging.INFO, logger="nemocc_dask"):
        window, _ = _learned_window(server, 1500)
    assert 0.75 * 32 <= window <= 1.5 * 32, caplog.text  # the benchmark measures it closely
    changes = [r.message for r in caplog.records if " -> " in r.message]
    assert changes and all("(" in m for m in changes)  # each change says why
    assert any("wait in the server's queue" in m for m in changes) == metrics


@pytest.mark.slow
def test_retry_after_pauses_the_whole_endpoint(caplog):
    with MockLLMServer(rate_429=0.03, retry_after=1.0, latency=0.01, seed=3) as server, \
            caplog.at_level(logging.INFO, logger="nemocc_dask"):
        llm = LLMConfig(base_url=server.base_url, model="mock", max_retries=10,
                        backoff_base=0.01, backoff_max=5)
        pool = new_pool(llm, llm.in_flight_total)
        results = list(pool.stream(_requests(150)))
        pool.close()
    assert all(r.error is None for r in results) and server.stats.throttled
    arrivals = sorted(server.stats.arrivals)
    for t in server.stats.throttled:  # nothing arrives during the pause (bar requests sent
        lo = bisect.bisect_right(arrivals, t + 0.1)  # before the 429 was read)
        hi = bisect.bisect_left(arrivals, t + 0.9)
        assert lo == hi, f"{hi - lo} requests arrived during the Retry-After pause"
    assert "paused 1.0 s (Retry-After)" in caplog.text


@pytest.mark.slow
def test_a_twice_as_fast_endpoint_serves_about_twice_the_requests():
    with MockLLMServer(capacity=16, per_token_latency=0.002) as fast, \
            MockLLMServer(capacity=16, per_token_latency=0.004) as slow:
        llm = LLMConfig(base_url=[fast.base_url, slow.base_url], model="mock")
        pool = new_pool(llm, llm.in_flight_total)
        list(pool.stream(_requests(1500)))
        windows = [e.window for e in pool.endpoints]
        pool.close()
    ratio = fast.stats.completed / slow.stats.completed
    assert 1.5 <= ratio <= 2.6, (ratio, windows)
    assert all(0.75 * 16 <= w <= 1.6 * 16 for w in windows), windows  # each its own, near 16


@pytest.mark.slow
def test_a_run_shows_each_endpoint_live_and_reports_its_series(tmp_path, cluster_client, capfd):
    from conftest import make_docs

    from nemocc_dask import run_to_parquet

    path = tmp_path / "docs.parquet"
    make_docs(60).to_parquet(path)
    with MockLLMServer(capacity=8, per_token_latency=0.003) as server:
        report = run_to_parquet(path, tmp_path / "out", "knowledge_list",
                                LLMConfig(base_url=server.base_url, model="mock"))
    err = capfd.readouterr().err
    short = server.base_url.split("://")[1][: -len("/v1")]
    # the endpoint's own segment after "||" (pools of earlier tests' endpoints may show too)
    assert re.search(rf"\|\|( [^|]+ \|)* {re.escape(short)} ", err) and " err 0.0%" in err, err
    series = report["endpoint_series"][server.base_url]
    assert report["max_in_flight"] == "auto" and series
    assert sum(round(i["req_per_s"] * 5) for i in series) == server.stats.completed
    assert all(i["window"] >= 1 and i["latency_p95"] >= i["latency_p50"] > 0
               for i in series if i["req_per_s"])
