"""An OpenAI-compatible mock LLM server for tests, the demo and benchmarks.

Serves ``GET /v1/models`` and ``POST /v1/chat/completions`` on 127.0.0.1. Answers are deterministic
functions of the prompt and shaped like a real model's for each of the five tasks (prefix lines,
"- Question: ... Answer: ..." lines, bullets, passages, occasional markdown); any other prompt gets a
plain rewrite. Latency is ``latency + per_token_latency * completion_tokens`` (times a log-normal
factor with ``noise_sigma``); at most ``max_concurrency`` requests are served at once, the others
wait in a FIFO queue (or, with ``overflow="429"``, are refused at once). Faults are injected at
the given rates: 429 with ``Retry-After``, 500, and dropped connections; ``fail_marker`` makes
every request whose prompt contains it answer 400.

Start it from Python (``with MockLLMServer(...) as server: server.base_url``) or from the command
line (``nemocc-dask serve-mock --port 8000``).

One module because the mock is one test double: its server behaviours (latency models,
capacity and queue, 429s, noise, answers per task) share one request handler.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import threading
import time
from dataclasses import dataclass, field

from nemocc_dask.recipe import prompts

_TEMPLATES = {
    "wikipedia": prompts.WIKIPEDIA_REPHRASING_PROMPT_TEMPLATE,
    "diverse_qa": prompts.DIVERSE_QA_PROMPT_TEMPLATE,
    "distill": prompts.DISTILL_PROMPT_TEMPLATE,
    "extract_knowledge": prompts.EXTRACT_KNOWLEDGE_PROMPT_TEMPLATE,
    "knowledge_list": prompts.KNOWLEDGE_LIST_PROMPT_TEMPLATE,
}
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _split_template(template: str) -> tuple[str, str]:
    head, tail = template.split("{document}")
    return head, tail


def identify_task(user_content: str) -> tuple[str, str]:
    """(task, document) for a prompt built from one of the five templates, else ("custom", all)."""
    for task, template in _TEMPLATES.items():
        head, tail = _split_template(template)
        if user_content.startswith(head) and user_content.endswith(tail):
            return task, user_content[len(head):len(user_content) - len(tail)]
    return "custom", user_content


def _sentences(document: str) -> list[str]:
    text = " ".join(document.split())
    return [s for s in _SENTENCE.split(text) if s] or [text]


def _maybe_bold(sentence: str, rng: random.Random) -> str:
    words = sentence.split(" ")
    if len(words) > 3 and rng.random() < 0.2:
        i = rng.randrange(len(words))
        if words[i].isalpha():
            words[i] = f"**{words[i]}**"
    return " ".join(words)


def fake_answer(user_content: str) -> str:
    """A deterministic, task-shaped answer to a prompt."""
    task, document = identify_task(user_content)
    rng = random.Random(hashlib.sha256(user_content.encode()).hexdigest())
    sentences = [_maybe_bold(s, rng) for s in _sentences(document)]
    if task == "wikipedia":
        return "Here is a paraphrased version:\n" + " ".join(sentences)
    if task == "distill":
        return "Paraphrased Text:\n" + " ".join(sentences[: max(1, (len(sentences) + 1) // 2 + 1)])
    if task == "diverse_qa":
        lines = ["Here are the questions and answers based on the provided text:"]
        for i, sentence in enumerate(sentences[:8]):
            words = sentence.rstrip(".!?").split()
            topic = " ".join(words[: min(6, len(words))])
            lines.append(f"- Question: What does the text say about \"{topic}\"? "
                         f"Answer: {sentence}")
            if i == 0 and len(sentences) > 2:
                lines.append(f"- Question: Is the passage about {words[-1] if words else 'it'}? "
                             "Answer: Yes.")
        return "\n".join(lines)
    if task == "extract_knowledge":
        half = max(1, len(sentences) // 2)
        return (f"Passage 1:\n{' '.join(sentences[:half])}\n\n"
                f"Passage 2:\n{' '.join(sentences[half:] or sentences)}")
    if task == "knowledge_list":
        return "\n".join(f"- {s}" for s in sentences)
    return "Response: " + " ".join(reversed(sentences))


def count_fake_tokens(text: str) -> int:
    """Rough token count used for usage numbers and latency (about 4 characters a token)."""
    return max(1, len(text) // 4)


@dataclass
class MockStats:
    """What the server saw; read it after (or during) a run."""

    requests: int = 0
    completed: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    injected_429: int = 0
    injected_500: int = 0
    dropped: int = 0
    rejected_400: int = 0
    tokenize_requests: int = 0
    arrivals: list = field(default_factory=list)   # time.monotonic() of each chat request
    throttled: list = field(default_factory=list)  # time.monotonic() of each 429 answer
    in_flight_samples: list = field(default_factory=list)  # (time, in flight) with track_in_flight
    in_service: int = 0          # requests being served now (not waiting for a slot)
    busy_seconds: float = 0.0    # integral of in_service over time
    service_seconds: float = 0.0  # sum of the served requests' service times
    queue_wait_seconds: float = 0.0  # sum of their waits for a slot
    served: int = 0
    overflow_429: int = 0
    _busy_since: float = 0.0

    def serving(self, delta: int) -> None:
        """``delta`` requests start (+1) or end (-1) service now."""
        now = time.monotonic()
        self.busy_seconds += self.in_service * (now - self._busy_since)
        self.in_service += delta
        self._busy_since = now
    messages: list = field(default_factory=list)       # with record_messages
    authorization: list = field(default_factory=list)  # with record_messages
    headers: list = field(default_factory=list)        # with record_messages


class MockLLMServer:
    """The mock server, run on its own event loop thread. Use as a context manager."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", models: tuple[str, ...] = ("mock",),
                 latency: float = 0.0, per_token_latency: float = 0.0, max_concurrency: int = 2048,
                 rate_429: float = 0.0, rate_500: float = 0.0, rate_drop: float = 0.0,
                 retry_after: float = 0.05, fail_marker: str | None = None,
                 api_key: str | None = None, record_messages: bool = False,
                 track_in_flight: bool = False, seed: int = 0, max_model_len: int | None = None,
                 tokenizer: str | None = None, tokenize_route: bool = True,
                 capacity: int | None = None, knee: float | None = None, metrics: bool = True,
                 noise_sigma: float = 0.0, overflow: str = "queue"):
        """``max_model_len``: the served context, reported by ``GET /v1/models`` (as vLLM does);
        a request whose prompt plus ``max_tokens`` exceeds it is refused with HTTP 400, as a real
        server refuses it. Prompts are counted with ``tokenizer`` (the served model's: a
        ``tokenizer.json``, folder or ``.gguf``; its chat template when it has one), else with the
        mock's own ~4-characters-a-token rule. With a tokenizer and ``tokenize_route``, the mock
        also serves ``POST /tokenize`` in vLLM's shape (``{"model", "prompt"|"messages"}`` ->
        ``{"count", "tokens"}``) and llama.cpp's (``{"content"}`` -> ``{"tokens"}``), and
        llama.cpp's ``POST /apply-template``.

        ``capacity``: decode like a continuous-batching server (``mock_engine.DecodeEngine``: at
        most ``capacity`` sequences at once, the rest queued; each token takes
        ``per_token_latency * (1 + b / knee)`` with ``b`` decoding; ``knee`` defaults to
        ``capacity``) instead of a fixed latency per token. ``metrics``: serve ``GET /metrics``
        in vLLM's Prometheus format (``vllm:num_requests_running``,
        ``vllm:num_requests_waiting``). ``POST /mock/capacity {"capacity": N}`` changes the
        capacity while serving.

        ``noise_sigma``: every service time is multiplied by ``exp(N(0, sigma))``.
        ``overflow="429"``: a request that finds every slot (``max_concurrency``, or ``capacity``)
        taken is answered 429 at once, without ``Retry-After``, instead of waiting in the queue.
        ``GET /mock/stats`` reports the server's occupancy (``busy_seconds``) and queueing."""
        if overflow not in ("queue", "429"):
            raise ValueError(f"overflow must be 'queue' or '429', not {overflow!r}")
        self.noise_sigma, self.overflow = noise_sigma, overflow
        self.max_model_len = max_model_len
        self.capacity, self.knee, self.metrics = capacity, knee, metrics
        self._engine = None
        self._tokenizer = None
        if tokenizer is not None:
            from nemocc_dask.recipe.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(tokenizer)
        self.tokenize_route = tokenize_route and tokenizer is not None
        self.host, self.port = host, port
        self.models = tuple(models)
        self.latency, self.per_token_latency = latency, per_token_latency
        self.max_concurrency = max_concurrency
        self.rates = (rate_429, rate_500, rate_drop)
        self.retry_after = retry_after
        self.fail_marker = fail_marker
        self.api_key = api_key
        self.record_messages = record_messages
        self.track_in_flight = track_in_flight
        self._sampler = None
        self.stats = MockStats()
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # -- handlers -----------------------------------------------------------------------------
    def _authorized(self, request) -> bool:
        if self.record_messages:
            self.stats.authorization.append(request.headers.get("Authorization", ""))
            self.stats.headers.append(dict(request.headers))
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    @staticmethod
    def _error(status: int, message: str, headers: dict | None = None):
        from aiohttp import web

        return web.json_response({"error": {"message": message, "code": status}}, status=status,
                                 headers=headers)

    async def _models(self, request):
        from aiohttp import web

        if not self._authorized(request):
            return self._error(401, "invalid API key")
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "owned_by": "nemocc-mock",
             **({"max_model_len": self.max_model_len} if self.max_model_len else {})}
            for m in self.models]})

    async def _chat(self, request):
        from aiohttp import web

        stats = self.stats
        stats.requests += 1
        stats.arrivals.append(time.monotonic())
        if not self._authorized(request):
            return self._error(401, "invalid API key")
        body = await request.json()
        if body.get("model") not in self.models:
            return self._error(404, f"The model `{body.get('model')}` does not exist.")
        messages = body.get("messages") or []
        if self.record_messages:
            stats.messages.append(messages)
        user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        if self.fail_marker and self.fail_marker in user:
            stats.rejected_400 += 1
            return self._error(400, "this prompt is rejected by the mock server")
        if self.max_model_len:
            prompt = self._prompt_tokens(messages)
            if prompt + int(body.get("max_tokens") or 0) > self.max_model_len:
                stats.rejected_400 += 1
                return self._error(400, f"This model's maximum context length is "
                                        f"{self.max_model_len} tokens; the request has {prompt} "
                                        f"prompt tokens and max_tokens {body.get('max_tokens')}")
        draw = self._rng.random()
        rate_429, rate_500, rate_drop = self.rates
        if draw < rate_429:
            stats.injected_429 += 1
            stats.throttled.append(time.monotonic())
            return self._error(429, "rate limited", {"Retry-After": f"{self.retry_after:g}"})
        if draw < rate_429 + rate_500:
            stats.injected_500 += 1
            return self._error(500, "internal server error")
        if draw < rate_429 + rate_500 + rate_drop:
            stats.dropped += 1
            request.transport.close()
            raise ConnectionResetError("dropped by the mock server")
        answer = fake_answer(user)
        completion_tokens = count_fake_tokens(answer)
        finish = "stop"
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and completion_tokens > max_tokens:
            answer, completion_tokens, finish = answer[: max_tokens * 4], max_tokens, "length"
        noise = math.exp(self._rng.gauss(0.0, self.noise_sigma)) if self.noise_sigma else 1.0
        slots = self.capacity or self.max_concurrency
        if self.overflow == "429" and stats.in_flight >= slots:
            stats.overflow_429 += 1
            stats.throttled.append(time.monotonic())
            return self._error(429, "all slots are busy")
        if self._engine is not None:
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            try:
                if self.latency:
                    await asyncio.sleep(self.latency * noise)
                await self._engine.decode(completion_tokens)
            finally:
                stats.in_flight -= 1
        else:
            queued_at = time.monotonic()
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            try:
                async with self._semaphore:
                    started = time.monotonic()
                    stats.queue_wait_seconds += started - queued_at
                    stats.serving(+1)
                    try:
                        delay = (self.latency + self.per_token_latency * completion_tokens) * noise
                        if delay:
                            await asyncio.sleep(delay)
                    finally:
                        stats.serving(-1)
                        stats.service_seconds += time.monotonic() - started
                        stats.served += 1
            finally:
                stats.in_flight -= 1
        stats.completed += 1
        prompt_tokens = self._prompt_tokens(messages)
        n = int(body.get("n") or 1)
        return web.json_response({
            "id": f"mock-{stats.requests}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": i, "message": {"role": "assistant", "content": answer},
                         "finish_reason": finish} for i in range(n)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    def _prompt_tokens(self, messages: list[dict]) -> int:
        tok = self._tokenizer
        if tok is None:
            return sum(count_fake_tokens(m.get("content") or "") for m in messages)
        if getattr(tok, "chat_template", None):
            return len(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                               return_dict=False))
        return len(tok.encode("\n".join(m.get("content") or "" for m in messages)))

    async def _tokenize(self, request):
        """vLLM's or llama.cpp's ``/tokenize``, by the shape of the body."""
        from aiohttp import web

        self.stats.tokenize_requests += 1
        if not self._authorized(request):
            return self._error(401, "invalid API key")
        body, tok = await request.json(), self._tokenizer
        if "content" in body:
            return web.json_response({"tokens": tok.encode(
                body["content"], add_special_tokens=bool(body.get("add_special", False)))})
        if body.get("model") not in self.models:
            return self._error(404, f"The model `{body.get('model')}` does not exist.")
        if "messages" in body:
            ids = tok.apply_chat_template(
                body["messages"], tokenize=True, return_dict=False,
                add_generation_prompt=body.get("add_generation_prompt", True))
        else:
            ids = tok.encode(body.get("prompt", ""),
                             add_special_tokens=body.get("add_special_tokens", True))
        return web.json_response({"count": len(ids), "tokens": list(ids),
                                  "max_model_len": self.max_model_len})

    async def _apply_template(self, request):
        """llama.cpp's ``/apply-template``: the chat template applied, as text."""
        from aiohttp import web

        body = await request.json()
        return web.json_response({"prompt": self._tokenizer.apply_chat_template(
            body["messages"], tokenize=False, add_generation_prompt=True)})

    async def _stats(self, request):
        """What the server saw so far, for benchmarks that run it in another process."""
        from aiohttp import web

        stats, engine = self.stats, self._engine
        answer = {"requests": stats.requests, "completed": stats.completed,
                  "in_flight": stats.in_flight, "max_in_flight": stats.max_in_flight,
                  "injected_429": stats.injected_429, "rejected_400": stats.rejected_400,
                  "overflow_429": stats.overflow_429, "time": time.monotonic()}
        if engine is None:
            stats.serving(0)
            answer.update(slots=self.max_concurrency, busy_seconds=stats.busy_seconds,
                          served=stats.served, service_seconds=stats.service_seconds,
                          queue_wait_seconds=stats.queue_wait_seconds)
        if engine is not None:
            answer.update(capacity=engine.capacity, admitted=engine.admitted,
                          queue_wait_total=engine.total_queue_wait,
                          slots=engine.capacity, busy_seconds=engine.busy_seconds,
                          service_seconds=engine.total_service,
                          queue_wait_seconds=engine.total_queue_wait, served=engine.admitted,
                          decoded_tokens=engine.decoded_tokens,
                          max_tokens_per_second=engine.max_tokens_per_second())
        if request.query.get("log"):
            answer.update(arrivals=stats.arrivals, throttled=stats.throttled)
        return web.json_response(answer)

    def _running_waiting(self) -> tuple[int, int]:
        if self._engine is not None:
            return len(self._engine.running), len(self._engine.queue)
        return self.stats.in_service, max(0, self.stats.in_flight - self.stats.in_service)

    async def _metrics(self, request):
        """vLLM's scheduler gauges, in Prometheus text format."""
        from aiohttp import web

        running, waiting = self._running_waiting()
        lines = []
        for name, value, text in (("num_requests_running", running, "Requests decoding"),
                                  ("num_requests_waiting", waiting, "Requests queued")):
            lines += [f"# HELP vllm:{name} {text}.", f"# TYPE vllm:{name} gauge"]
            lines += [f'vllm:{name}{{model_name="{m}"}} {float(value)}' for m in self.models[:1]]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _set_capacity(self, request):
        from aiohttp import web

        body = await request.json()
        if self._engine is None:
            return self._error(400, "this mock was started without --capacity")
        self._engine.set_capacity(int(body["capacity"]))
        return web.json_response({"capacity": self._engine.capacity})

    async def _sample_in_flight(self):
        while True:
            self.stats.in_flight_samples.append((time.monotonic(), self.stats.in_flight))
            await asyncio.sleep(0.01)

    # -- lifecycle ----------------------------------------------------------------------------
    async def _start(self) -> None:
        from aiohttp import web

        self._semaphore = asyncio.Semaphore(self.max_concurrency)
        if self.capacity:
            from nemocc_dask.testing.mock_engine import DecodeEngine

            self._engine = DecodeEngine(self.capacity, self.per_token_latency, self.knee)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/mock/stats", self._stats)
        app.router.add_post("/mock/capacity", self._set_capacity)
        if self.metrics:
            app.router.add_get("/metrics", self._metrics)
        if self.tokenize_route:
            app.router.add_post("/tokenize", self._tokenize)
            app.router.add_post("/apply-template", self._apply_template)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=4096, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        if self.track_in_flight:
            self._sampler = asyncio.ensure_future(self._sample_in_flight())

    def start(self) -> "MockLLMServer":
        """Start serving on a background thread; returns once the port is open."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nemocc-mock",
                                        daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def stop(self) -> None:
        """Stop serving: open connections are closed and new ones refused."""
        if self._loop is None:
            return

        async def shutdown():
            if self._sampler is not None:
                self._sampler.cancel()
            if self._engine is not None:
                self._engine.close()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = None

    def __enter__(self) -> "MockLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(**options) -> None:
    """Run a mock server in the foreground until interrupted (used by ``nemocc-dask serve-mock``)."""
    server = MockLLMServer(**options).start()
    print(json.dumps({"base_url": server.base_url, "models": list(server.models)}), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
