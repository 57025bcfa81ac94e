"""The per-worker pool against the real mock server: retries, backoff, window sharing."""

import time

import pytest

from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.llm.pool import Request
from nemocc_dask.llm.pools import new_pool
from nemocc_dask.recipe.presets import PRESETS
from nemocc_dask.testing.mock import MockLLMServer


def _requests(n, preset=PRESETS["knowledge_list"], tag=""):
    settings = {"model": "mock", "max_tokens": 600}
    return [Request(f"k{i}", preset.messages(f"Fact {i}{tag}. Another fact about {i}."), settings)
            for i in range(n)]


@pytest.mark.parametrize("status_rate, status", [("rate_500", 500), ("rate_429", 429)])
def test_exactly_max_retries_plus_one_attempts(status_rate, status):
    with MockLLMServer(**{status_rate: 1.0}, retry_after=0.01) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock", max_retries=3,
                        backoff_base=0.01, backoff_max=0.05)
        pool = new_pool(llm, 4)
        [result] = list(pool.stream(_requests(1)))
        pool.close()
    assert result.attempts == 4 and server.stats.requests == 4
    assert result.error_class == f"http_{status}" and result.completion is None


def test_400_is_not_retried():
    with MockLLMServer(fail_marker="Fact 0") as server:
        llm = LLMConfig(base_url=server.base_url, model="mock", max_retries=5)
        pool = new_pool(llm, 4)
        results = {r.key: r for r in pool.stream(_requests(3))}
        pool.close()
    assert results["k0"].attempts == 1 and results["k0"].error_class == "http_400"
    assert results["k1"].completion.text and results["k2"].error is None


def test_backoff_honours_retry_after():
    with MockLLMServer(rate_429=1.0, retry_after=0.3) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock", max_retries=2,
                        backoff_base=0.001, backoff_max=5)
        pool = new_pool(llm, 2)
        started = time.monotonic()
        list(pool.stream(_requests(1)))
        pool.close()
    assert time.monotonic() - started >= 0.6  # two waits of at least Retry-After


def test_overload_shrinks_window_and_success_regrows_it():
    with MockLLMServer(rate_429=1.0, retry_after=0.0, latency=0.02) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock", max_retries=0, max_in_flight=16)
        pool = new_pool(llm, 16)
        list(pool.stream(_requests(8)))
        time.sleep(0.3)  # the next report carries the 429s to the pool's coordinator
        shrunk = pool.endpoints[0].window
        server.rates = (0.0, 0.0, 0.0)
        list(pool.stream(_requests(40, tag="b")))
        time.sleep(0.3)
        assert pool.endpoints[0].window < 16  # back by one slot per round trip, not per answer
        list(pool.stream(_requests(600, tag="c")))
        time.sleep(0.3)
        pool.close()
    assert shrunk == 8
    assert pool.endpoints[0].window == 16


def test_window_is_filled_and_slides():
    with MockLLMServer(latency=0.05, per_token_latency=0.001, track_in_flight=True) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock")
        pool = new_pool(llm, 8)
        list(pool.stream(_requests(120)))
        pool.close()
    assert server.stats.max_in_flight == 8
    busy = [n for _, n in server.stats.in_flight_samples if n > 0]
    # while work remains the window stays (nearly) full: no waves that drain to zero
    assert sum(n >= 6 for n in busy) / len(busy) > 0.8


def _client_for(url: str, key: str = "k"):
    return (url, key)


def test_pool_identity_covers_what_builds_clients_or_changes_answers():
    import functools

    a = LLMConfig(client_factory=functools.partial(_client_for, "http://a/v1"))
    b = LLMConfig(client_factory=functools.partial(_client_for, "http://b/v1"))
    again = LLMConfig(client_factory=functools.partial(_client_for, "http://a/v1"))
    assert a.pool_key() != b.pool_key() and a.endpoints != b.endpoints
    assert a.pool_key() == again.pool_key()  # the same factory, rebuilt (as on each worker)
    assert a.endpoints[0].startswith("custom:_client_for#")

    def closure_over(url):
        return lambda: _client_for(url)

    assert (LLMConfig(client_factory=closure_over("http://a/v1")).pool_key()
            != LLMConfig(client_factory=closure_over("http://b/v1")).pool_key())
    plain = LLMConfig(base_url="http://a/v1", model="m")
    assert plain.pool_key() != LLMConfig(base_url="http://a/v1", model="m",
                                         return_all_choices=True).pool_key()
