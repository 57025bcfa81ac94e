"""Servers we do not control (issue 24, servers): a real HTTP server on 127.0.0.1 that answers
with an endless body, a gzip bomb, JSON nested past the parser's depth, a non-text content, half
a surrogate pair, content as a list of parts, a malformed finish_reason or usage, the caller's
API key, an endless /metrics page, or a /models list that is trickled or is not a list. Every
answer is bounded in bytes and time, a non-text answer is a failed request (so --retry-failed
resends it), and the key never reaches the output."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import zlib

import pytest
from aiohttp import web
from conftest import make_docs

from nemocc_dask import LLMConfig
from nemocc_dask.llm.pool import Request
from nemocc_dask.llm.pools import new_pool
from nemocc_dask.recipe.presets import PRESETS
from nemocc_dask.run.generate import generate_partition

KEY = "sk-test-0123456789abcdef"


def _gzip_bomb(megabytes: int) -> bytes:
    """A JSON answer of ``megabytes`` MiB of text, gzip-compressed to about a thousandth."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [packer.compress(b'{"choices": [{"message": {"content": "')]
    parts += [packer.compress(b"a" * (1 << 20)) for _ in range(megabytes)]
    return b"".join(parts + [packer.compress(b'"}}]}'), packer.flush()])


ODD_BODIES = {  # hostile modes answered with a fixed body
    "nested": b"[" * 200_000,  # parses only by recursing past Python's limit
    "bomb": _gzip_bomb(1024),
    "parts": json.dumps({"choices": [{"message": {"content": [
        {"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "Para one. "},
        {"type": "text", "text": "Para two."}]}, "finish_reason": "stop"}]}).encode(),
    "surrogate": json.dumps({"choices": [{"message": {  # half an emoji, as a cut string has
        "content": "A fine answer \ud83d about the delta. " * 20}, "finish_reason": "stop"}]}
    ).encode(),
    "odd_envelope": json.dumps({"choices": [{"message": {"content": "An answer."},
                                             "finish_reason": 5}],
                                "usage": {"prompt_tokens": "many",
                                          "completion_tokens": -3}}).encode(),
}


class HostileServer:
    """chat/completions answers as ``mode`` says; GET /v1/models trickles with ``trickle``."""

    def __init__(self, mode: str, trickle: bool = False, delay: float = 0.0,
                 models: bytes | None = None, endless_metrics: bool = False):
        """``models``: the body of GET /v1/models (default: a list holding model "m");
        ``endless_metrics``: GET /metrics streams 400 MB of gauges unless the client hangs up."""
        self.mode, self.trickle, self.delay, self.models = mode, trickle, delay, models
        self.endless_metrics, self.metrics_bytes = endless_metrics, 0
        self.sent_bytes = 0
        self.calls = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _chat(self, request):
        body = await request.json()
        if self.mode == "endless":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            chunk = b'{"choices": [{"message": {"content": "' + b"x" * (1 << 20)
            try:
                for _ in range(300):  # 300 MB unless the client hangs up
                    await response.write(chunk)
                    self.sent_bytes += len(chunk)
                    chunk = b"x" * (1 << 20)
            except (ConnectionResetError, RuntimeError):
                pass
            return response
        if self.mode in ODD_BODIES:
            return await self._odd(request, ODD_BODIES[self.mode])
        self.calls += 1
        if self.mode == "stall" and self.calls == 25:  # one request is never answered
            self.released = asyncio.Event()
            await self.released.wait()  # (until the server closes)
        await asyncio.sleep(self.delay)
        content = 7 if self.mode == "int" else f"Here is the key {KEY} and the answer."
        user = body["messages"][-1]["content"]
        return web.json_response({"choices": [{"message": {"content": content if
                                                           self.mode != "echo" else
                                                           content + user[:20]},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 5, "completion_tokens": 9}})

    async def _odd(self, request, body: bytes):
        """``body`` gzip-compressed and chunked (no Content-Length) where it is the bomb."""
        if self.mode != "bomb":
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json",
                                               "Content-Encoding": "gzip"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for i in range(0, len(body), 1 << 15):
                await response.write(body[i:i + (1 << 15)])
                self.sent_bytes += min(1 << 15, len(body) - i)
        except (ConnectionResetError, RuntimeError):
            pass
        return response

    async def _models(self, request):
        text = self.models or json.dumps({"data": [{"id": "m"}]}).encode()
        if not self.trickle:
            return web.Response(body=text, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for byte in text:
            await response.write(bytes([byte]))
            await asyncio.sleep(1.0)
        return response

    async def _metrics(self, request):
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        chunk = b"vllm:num_requests_running 1\nvllm:num_requests_waiting 0\n" * 20000
        try:
            while self.endless_metrics and self.metrics_bytes < 1200 << 20:
                await response.write(chunk)
                self.metrics_bytes += len(chunk)
        except (ConnectionResetError, RuntimeError):
            pass
        return response

    async def _start(self):
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    def __enter__(self):
        self.thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc):
        if getattr(self, "released", None) is not None:
            self.loop.call_soon_threadsafe(self.released.set)
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _one(llm, max_tokens=50):
    pool = new_pool(llm, 2)
    try:
        return list(pool.stream([Request("k", [{"role": "user", "content": "hi"}],
                                         {"model": "m", "max_tokens": max_tokens})]))[0]
    finally:
        pool.close()


def test_an_endless_answer_is_cut_at_what_max_tokens_allows():
    with HostileServer("endless") as server:
        started = time.monotonic()
        result = _one(LLMConfig(base_url=server.base_url, model="m", max_retries=0))
        elapsed = time.monotonic() - started
        time.sleep(0.5)
    assert result.error_class == "response_too_large" and "max_tokens" in result.error
    assert elapsed < 10  # not the 120-s timeout
    assert server.sent_bytes < 64 << 20  # the client hung up long before 300 MB


def test_a_non_text_answer_is_a_failed_request_not_an_answer():
    with HostileServer("int") as server:
        result = _one(LLMConfig(base_url=server.base_url, model="m", max_retries=0))
    assert result.completion is None and result.error_class == "bad_response"
    assert "is a int, not text" in result.error


def test_a_compression_bomb_is_cut_at_what_max_tokens_allows_decompressed():
    """1 GiB of answer sent as 1 MiB of gzip without a length: refused once the decompressed
    text passes the bound, long before the worker holds it."""
    import resource

    with HostileServer("bomb") as server:
        result = _one(LLMConfig(base_url=server.base_url, model="m", max_retries=0))
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert result.error_class == "response_too_large"
    assert peak_mib < 1024  # the test process never held the GiB


def test_an_answer_nested_past_the_parsers_depth_is_a_bad_response_not_a_crash():
    with HostileServer("nested") as server:
        result = _one(LLMConfig(base_url=server.base_url, model="m", max_retries=1))
    assert result.completion is None and result.error_class == "bad_response"
    assert result.retried == ["bad_response"]  # resent once, as any unparsable answer
    assert "not JSON (it begins b'[[[[" in result.error  # what came instead, for the user


def test_content_sent_as_a_list_of_parts_is_read_as_its_text_parts():
    with HostileServer("parts") as server:
        result = _one(LLMConfig(base_url=server.base_url, model="m", max_retries=0))
    assert result.completion.text == "Para one. Para two."


def test_a_malformed_finish_reason_or_usage_reads_as_absent_and_the_partition_is_written(
        tmp_path):
    """A finish_reason that is not text and usage counts that are not counts would otherwise
    reach the part's typed columns (or the token ledger) as they are."""
    import pyarrow.parquet as pq

    from nemocc_dask.io.files import atomic_write_parquet

    with HostileServer("odd_envelope") as server:
        llm = LLMConfig(base_url=server.base_url, model="m", max_retries=0)
        out, stats = generate_partition(make_docs(3), PRESETS["distill"], llm,
                                        journal_path=str(tmp_path / "j.jsonl"),
                                        return_stats=True)
    assert list(out["distill"]) == ["An answer."] * len(out)
    assert out["llm_finish_reason"].isna().all()
    assert (out["llm_completion_tokens"] == 0).all()
    atomic_write_parquet(out, tmp_path / "part.parquet")
    assert pq.read_table(tmp_path / "part.parquet").num_rows == len(out)


def test_an_answer_with_half_a_surrogate_pair_is_kept_with_a_replacement_character(tmp_path):
    """JSON may spell a lone surrogate (\\ud83d); Python decodes it into a string that UTF-8
    cannot encode, so the journal write failed and took the partition (and each rerun) down."""
    import pyarrow.parquet as pq

    from nemocc_dask.io.files import atomic_write_parquet

    with HostileServer("surrogate") as server:
        llm = LLMConfig(base_url=server.base_url, model="m", max_retries=0)
        out, _ = generate_partition(make_docs(3), PRESETS["distill"], llm,
                                    journal_path=str(tmp_path / "j.jsonl"), return_stats=True)
    assert len(out) and all("A fine answer \ufffd about" in text for text in out["distill"])
    assert "\ufffd".encode() in (tmp_path / "j.jsonl").read_bytes()
    atomic_write_parquet(out, tmp_path / "part.parquet")
    assert pq.read_table(tmp_path / "part.parquet").num_rows == len(out)


def test_an_answer_that_echoes_the_api_key_never_carries_it_into_the_output(tmp_path):
    with HostileServer("echo") as server:
        llm = LLMConfig(base_url=server.base_url, model="m", api_key=KEY)
        out, _ = generate_partition(make_docs(3), PRESETS["distill"], llm,
                                    journal_path=str(tmp_path / "j.jsonl"), return_stats=True)
    assert all("***" in text and KEY not in text for text in out["distill"])
    assert KEY.encode() not in (tmp_path / "j.jsonl").read_bytes()


def test_a_trickled_model_list_cannot_hold_the_start_check():
    from nemocc_dask.llm.preflight import PreflightError, preflight

    with HostileServer("echo", trickle=True) as server:
        started = time.monotonic()
        with pytest.raises(PreflightError, match="did not answer GET /models within 6 s"):
            preflight(LLMConfig(base_url=server.base_url, model="m"), timeouts=(2.0, 4.0))
        assert time.monotonic() - started < 6 + 2 * 1.5  # each wait ends within a byte's gap


@pytest.mark.parametrize("body", [b"null", b"[]", b'{"data": {"id": "m"}}', b"[" * 200_000])
def test_a_model_list_that_is_not_one_is_a_clear_refusal(body):
    from nemocc_dask.llm.preflight import PreflightError, preflight

    with HostileServer("echo", models=body) as server:
        with pytest.raises(PreflightError, match="GET /models with JSON"):
            preflight(LLMConfig(base_url=server.base_url, model="m"))


def test_an_endless_metrics_page_is_cut_and_the_window_learned_from_latency():
    """A /metrics that never ends (a proxy, a misrouted stream) is read up to a bound, counted as
    a failed poll, and after a few the endpoint's window is learned from latency instead; the
    requests are all answered meanwhile."""
    from nemocc_dask.llm.pool import METRICS_FAILURES_BEFORE_LATENCY, METRICS_MAX_BYTES

    with HostileServer("echo", delay=0.2, endless_metrics=True) as server:
        llm = LLMConfig(base_url=server.base_url, model="m", max_retries=0)
        pool = new_pool(llm, 4)
        try:
            results = list(pool.stream([Request(f"k{i}", [{"role": "user", "content": f"q{i}"}],
                                                {"model": "m", "max_tokens": 20})
                                        for i in range(60)]))
            failed = [e.metrics_failed for e in pool.endpoints]
        finally:
            pool.close()
    assert all(r.error is None for r in results)
    assert failed == [True]
    bound = METRICS_FAILURES_BEFORE_LATENCY * (METRICS_MAX_BYTES + (8 << 20))  # + socket buffers
    assert 0 < server.metrics_bytes <= bound


def _many(llm, n: int, max_tokens: int = 600):
    pool = new_pool(llm, 4)
    try:
        started = time.monotonic()
        results = list(pool.stream([Request(f"k{i}", [{"role": "user", "content": f"q{i}"}],
                                            {"model": "m", "max_tokens": max_tokens})
                                    for i in range(n)]))
        return results, time.monotonic() - started, pool.timeouts()
    finally:
        pool.close()


def test_the_automatic_timeout_gives_up_on_a_stalled_request_at_the_servers_pace():
    """Issue 28 item 3: a request the server never answers is given up on after a limit that
    follows the endpoint's answers (here 0.05 s each: the floor), then resent and answered,
    instead of waiting out a fixed timeout."""
    import dask

    with dask.config.set({"nemocc.request-timeout.floor-seconds": 1.0}), \
            HostileServer("stall", delay=0.05) as server:
        results, elapsed, limits = _many(LLMConfig(base_url=server.base_url, model="m",
                                                   max_retries=2), 40, max_tokens=20)
    assert all(r.error is None for r in results)
    assert sum(r.retried.count("timeout") for r in results) == 1
    assert elapsed < 20 and limits[server.base_url] == 1.0


def test_the_automatic_timeout_grows_with_a_slow_server_where_a_fixed_one_cuts():
    """A slow (CPU-like) server: answers of 9 tokens in 0.6 s predict a 600-token answer in
    40 s, so the automatic limit is minutes while a fixed --timeout 0.4 fails every request."""
    import dask

    with dask.config.set({"nemocc.request-timeout.min-answers": 4}), \
            HostileServer("slow", delay=0.6) as server:
        auto, _, limits = _many(LLMConfig(base_url=server.base_url, model="m", max_retries=0), 12)
        fixed, _, none = _many(LLMConfig(base_url=server.base_url, model="m", max_retries=0,
                                         timeout=0.4), 4)
    assert all(r.error is None for r in auto)
    assert 3 * 0.6 * 600 / 9 <= limits[server.base_url] <= 1800  # the packaged ceiling
    assert all(r.error_class == "timeout" for r in fixed) and none == {}
