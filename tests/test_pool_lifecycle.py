"""The pool's lifecycle: a consumer that stops cancels what is not sent, a closed pool never hangs
and leaves the registry, a raising client factory leaks nothing, sync clients get a full window,
the failure budget, and connection errors that name their address."""

import asyncio
import threading
import time

import pytest

from nemocc_dask.llm.client import OpenAIHTTPClient, RetryableError
from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.llm.pool import EndpointsBroken, PoolClosed, Request, WorkerPool
from nemocc_dask.llm.pools import _factories, get_pool, new_pool
from nemocc_dask.recipe.presets import PRESETS
from nemocc_dask.testing.mock import MockLLMServer


def _requests(n, tag=""):
    preset, settings = PRESETS["knowledge_list"], {"model": "mock", "max_tokens": 600}
    return [Request(f"k{i}{tag}", preset.messages(f"Fact {i}{tag}."), settings) for i in range(n)]


def _wait_until_stable(read, seconds=0.6):
    """The value of ``read()`` once it stopped changing for ``seconds``."""
    last, since = read(), time.monotonic()
    while time.monotonic() - since < seconds:
        time.sleep(0.05)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_consumer_that_stops_cancels_unsent_requests():
    with MockLLMServer(latency=0.2) as server:
        pool = new_pool(LLMConfig(base_url=server.base_url, model="mock"), 4)
        stream = pool.stream(_requests(200))
        first = [next(stream) for _ in range(3)]
        stream.close()  # what a `for` loop does when its body raises (disk full, Ctrl-C)
        settled = _wait_until_stable(lambda: server.stats.requests)
        pool.close()
    assert all(r.completion is not None for r in first)
    assert settled <= 3 + 4 + 4  # answered + at most two windows on the wire; never all 200
    assert sum(e.in_flight for e in pool.endpoints) == 0


def test_exception_in_consumer_body_cancels_too():
    with MockLLMServer(latency=0.2) as server:
        pool = new_pool(LLMConfig(base_url=server.base_url, model="mock"), 4)
        with pytest.raises(OSError):
            for _ in pool.stream(_requests(100)):
                raise OSError("No space left on device")
        settled = _wait_until_stable(lambda: server.stats.requests)
        pool.close()
    assert settled <= 12


def test_closed_pool_never_hangs_and_leaves_the_registry():
    with MockLLMServer(latency=0.5) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock", max_in_flight=2)
        pool = get_pool(llm)
        assert get_pool(llm) is pool
        errors = []

        def consume():
            try:
                list(pool.stream(_requests(20)))
            except PoolClosed as exc:
                errors.append(exc)

        consumer = threading.Thread(target=consume)
        consumer.start()
        time.sleep(0.2)
        pool.close()
        consumer.join(timeout=10)
        assert not consumer.is_alive() and errors
        with pytest.raises(PoolClosed):
            list(pool.stream(_requests(1)))
        fresh = get_pool(llm)
        assert fresh is not pool
        assert [r.error for r in fresh.stream(_requests(1, tag="x"))] == [None]
        fresh.close()


def _raising_factory():
    raise RuntimeError("cannot build the client")


def test_raising_client_factory_leaks_no_thread():
    llm = LLMConfig(client_factory=_raising_factory)
    before = threading.active_count()
    for _ in range(5):
        with pytest.raises(RuntimeError, match="cannot build"):
            new_pool(llm, 8)
    assert threading.active_count() == before


class SlowSyncClient:
    """A sync client that takes 0.2 s a call and records how many calls run at once."""

    def __init__(self):
        self.lock, self.running, self.peak = threading.Lock(), 0, 0

    def complete_sync(self, messages, settings):
        from nemocc_dask.llm.client import Completion

        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(0.2)
        with self.lock:
            self.running -= 1
        return Completion(text="ok", finish_reason="stop")


def test_sync_client_runs_a_full_window_at_once():
    client = SlowSyncClient()
    pool = new_pool(LLMConfig(client_factory=lambda: client, max_in_flight=64), 64)
    results = list(pool.stream(_requests(128)))
    pool.close()
    assert len(results) == 128 and all(r.error is None for r in results)
    assert client.peak == 64


class FlakyClient:
    """Fails every call with a (non-retryable) error of the user's code."""

    def complete_sync(self, messages, settings):
        raise KeyError("choices")


def test_failure_budget_stops_dispatching_and_raises():
    calls = []

    def factory():
        client = FlakyClient()
        original = client.complete_sync
        client.complete_sync = lambda m, s: (calls.append(1), original(m, s))[1]
        return client

    pool = new_pool(LLMConfig(client_factory=factory, failure_min_requests=10), 2)
    received = []
    with pytest.raises(EndpointsBroken, match=r"client_error: KeyError: 'choices'"):
        for result in pool.stream(_requests(100)):
            received.append(result)
    pool.close()
    assert 10 <= len(calls) <= 12  # stopped once 10 had failed, plus what was in flight
    assert sum(r.aborted for r in received) == 100 - len(calls)


def test_failure_budget_takes_out_one_broken_endpoint_of_two():
    with MockLLMServer() as good, MockLLMServer(rate_500=1.0) as bad:
        llm = LLMConfig(base_url=[good.base_url, bad.base_url], model="mock", max_retries=0,
                        failure_min_requests=5)
        pool = new_pool(llm, 4)
        results = list(pool.stream(_requests(200)))
        pool.close()
    assert pool.endpoints[1].broken and not pool.endpoints[0].broken
    assert bad.stats.requests <= 5 + 4
    assert sum(r.error is None for r in results) >= 200 - bad.stats.requests


def test_connection_error_names_the_address():
    client = OpenAIHTTPClient("http://127.0.0.1:9/v1", None, 5.0, 4)

    async def call():
        try:
            await client.complete([{"role": "user", "content": "hi"}], {"model": "m"})
        finally:
            await client.aclose()

    with pytest.raises(RetryableError) as info:
        asyncio.run(call())
    assert info.value.error_class == "connection"
    assert "http://127.0.0.1:9/v1/chat/completions" in str(info.value)
    assert "Cannot connect" in str(info.value) or "Connect" in str(info.value)


class _StallingLink:
    """A coordinator that answers once (cap 4, a short lease) and then never again, like a
    scheduler the worker cannot reach while its process or event loop is stalled."""

    report_seconds = idle_report_seconds = 0.05

    def __init__(self, lease: float):
        self.lease = lease
        self.answered = 0
        self.resume = threading.Event()

    def on_worker_loop(self) -> bool:
        return False

    async def exchange(self, reports):
        if self.answered and not self.resume.is_set():
            while not self.resume.is_set():
                await asyncio.sleep(0.01)
        self.answered += 1
        return {"lease": self.lease,
                "endpoints": {name: {"cap": 4, "epoch": 0, "window": 4} for name in reports}}


def test_a_pool_whose_lease_lapses_sends_nothing_until_it_is_renewed():
    with MockLLMServer(latency=0.05) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock")
        link = _StallingLink(lease=0.5)
        pool = WorkerPool(_factories(llm, 4), 4, 0, 0.01, 0.1, 1.0, budget=link)
        results, started = [], time.monotonic()
        consumer = threading.Thread(target=lambda: results.extend(pool.stream(
            _requests(200))))
        consumer.start()
        time.sleep(1.5)
        sent_while_fenced = [t - started for t in server.stats.arrivals
                             if t - started > 0.5 + 0.1]
        link.resume.set()
        consumer.join(timeout=60)
        pool.close()
    assert not sent_while_fenced, sent_while_fenced  # 0.1 s: a request already on its way
    assert len(results) == 200 and all(r.error is None for r in results)
    assert server.stats.max_in_flight <= 4


class _SlowFirstLink:
    """A coordinator whose first answer takes 0.3 s (a scheduler RPC) and that grants what is
    asked; an idle pool would next report only after a minute."""

    report_seconds, idle_report_seconds = 0.05, 60.0

    def __init__(self):
        self.demands = []

    def on_worker_loop(self) -> bool:
        return False

    async def exchange(self, reports):
        if not self.demands:
            await asyncio.sleep(0.3)
        self.demands.append(sum(r["demand"] for r in reports.values()))
        return {"lease": 30.0, "endpoints": {
            name: {"cap": 4 if r["demand"] else 0, "epoch": 0, "window": 4}
            for name, r in reports.items()}}


def test_work_that_arrives_during_the_pools_first_report_is_sent_at_once():
    """The pool's first report went out idle; requests that came meanwhile are reported at once,
    not after the idle period (they waited 2 s in every worker's first partition)."""
    with MockLLMServer(latency=0.01) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock")
        link = _SlowFirstLink()
        pool = WorkerPool(_factories(llm, 4), 4, 0, 0.01, 0.1, 1.0, budget=link)
        time.sleep(0.1)  # the first report is on its way
        started = time.monotonic()
        results = list(pool.stream(_requests(8)))
        took = time.monotonic() - started
        pool.close()
    assert len(results) == 8 and all(r.error is None for r in results)
    assert link.demands[0] == 0 and link.demands[1] > 0
    assert took < 10, took  # not the idle minute
