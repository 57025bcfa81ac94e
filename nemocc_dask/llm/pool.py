"""The per-worker client pool: one event loop thread, warm clients, one sliding window.

Every Dask task on a worker process that needs completions calls ``get_pool(...).stream(requests)``
and iterates over results as they finish. All partitions running on the worker share one window per
endpoint: a slot is handed to the next waiting request the moment one frees up (no waves). Requests
waiting out a backoff hold no slot. 429/503 halve an endpoint's window (at most once per mean
latency); each success grows it back by one, up to its configured size. An endpoint whose
connections keep failing is taken out for a cool-down; its requests go to the others.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from nemocc_dask.llm.client import Completion, LLMRequestError, OpenAIHTTPClient, RetryableError
from nemocc_dask.llm.config import LLMConfig

CONNECTION_FAILURES_BEFORE_COOLDOWN = 3


@dataclass
class Request:
    """One chat completion to run; ``key`` identifies it in results and journals."""

    key: str
    messages: list[dict]
    settings: dict


@dataclass
class Result:
    """The outcome of one request after retries: a completion or an error message."""

    key: str
    completion: Completion | None = None
    error: str | None = None
    error_class: str | None = None
    attempts: int = 0
    endpoint: str | None = None
    latency: float = 0.0
    failed_endpoints: list[str] = field(default_factory=list)


class Endpoint:
    """One endpoint's client, adaptive window and health."""

    def __init__(self, name: str, client: Any, window: int):
        self.name = name
        self.client = client
        self.max_window = window
        self.window = float(window)
        self.in_flight = 0
        self.consecutive_connection_failures = 0
        self.cooldown_until = 0.0
        self.last_decrease = 0.0
        self.mean_latency = 1.0

    def has_slot(self, now: float) -> bool:
        return now >= self.cooldown_until and self.in_flight < int(self.window)

    def on_success(self, latency: float) -> None:
        self.consecutive_connection_failures = 0
        self.mean_latency = 0.9 * self.mean_latency + 0.1 * latency
        self.window = min(self.max_window, self.window + 1)

    def on_overload(self, now: float) -> None:
        if now - self.last_decrease >= self.mean_latency:
            self.window = max(1.0, self.window / 2)
            self.last_decrease = now

    def on_connection_failure(self, now: float, cooldown: float) -> bool:
        """Count a failed connection; True when the endpoint goes into cool-down."""
        self.consecutive_connection_failures += 1
        if self.consecutive_connection_failures >= CONNECTION_FAILURES_BEFORE_COOLDOWN:
            self.cooldown_until = now + cooldown
            self.consecutive_connection_failures = 0
            return True
        return False


def _backoff(attempt: int, base: float, cap: float, retry_after: float | None) -> float:
    delay = min(cap, base * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


class WorkerPool:
    """Runs requests on a private event loop thread through endpoint clients and one window."""

    def __init__(self, endpoints: list[tuple[str, Callable[[], Any]]], window: int,
                 max_retries: int, backoff_base: float, backoff_max: float, cooldown: float,
                 secret: str | None = None):
        self._max_retries = max_retries
        self._backoff = (backoff_base, backoff_max)
        self._cooldown = cooldown
        self._secret = secret
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._wake_at: float | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="nemocc-llm-pool",
                                        daemon=True)
        self._thread.start()
        self.endpoints = [Endpoint(name, factory(), window) for name, factory in endpoints]

    # -- window -------------------------------------------------------------------------------
    def _pick(self, now: float) -> Endpoint | None:
        ready = [e for e in self.endpoints if e.has_slot(now)]
        if not ready:
            return None
        return min(ready, key=lambda e: (e.in_flight / e.window, e.in_flight))

    def _dispatch(self) -> None:
        now = time.monotonic()
        while self._waiters:
            endpoint = self._pick(now)
            if endpoint is None:
                break
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            endpoint.in_flight += 1
            waiter.set_result(endpoint)
        if self._waiters:
            wake = min((e.cooldown_until for e in self.endpoints if e.cooldown_until > now),
                       default=None)
            if wake is not None and (self._wake_at is None or wake < self._wake_at
                                     or self._wake_at <= now):
                self._wake_at = wake
                self.loop.call_at(self.loop.time() + (wake - now) + 0.001, self._dispatch)

    async def _acquire(self) -> Endpoint:
        waiter = self.loop.create_future()
        self._waiters.append(waiter)
        self._dispatch()
        return await waiter

    def _release(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1
        self._dispatch()

    # -- one request --------------------------------------------------------------------------
    def _redact(self, message: str) -> str:
        return message.replace(self._secret, "***") if self._secret else message

    async def _call(self, endpoint: Endpoint, request: Request) -> Completion:
        client = endpoint.client
        if hasattr(client, "complete"):
            return await client.complete(request.messages, request.settings)
        return await self.loop.run_in_executor(None, client.complete_sync, request.messages,
                                               request.settings)

    async def _run(self, request: Request) -> Result:
        result = Result(key=request.key)
        while True:
            endpoint = await self._acquire()
            result.attempts += 1
            started = time.monotonic()
            try:
                completion = await self._call(endpoint, request)
            except RetryableError as exc:
                self._release(endpoint)
                now = time.monotonic()
                result.failed_endpoints.append(endpoint.name)
                if exc.overload:
                    endpoint.on_overload(now)
                if exc.connection and endpoint.on_connection_failure(now, self._cooldown):
                    self._dispatch()
                if result.attempts > self._max_retries:
                    return self._failed(result, exc.error_class, str(exc))
                await asyncio.sleep(_backoff(result.attempts, *self._backoff, exc.retry_after))
                continue
            except LLMRequestError as exc:
                self._release(endpoint)
                result.failed_endpoints.append(endpoint.name)
                return self._failed(result, exc.error_class, str(exc))
            except Exception as exc:  # a custom client's own failure: the row fails, not the run
                self._release(endpoint)
                result.failed_endpoints.append(endpoint.name)
                return self._failed(result, "client_error",
                                    f"client_error: {type(exc).__name__}: {exc}")
            result.latency = time.monotonic() - started
            endpoint.on_success(result.latency)
            self._release(endpoint)
            result.endpoint = endpoint.name
            result.completion = completion
            return result

    def _failed(self, result: Result, error_class: str, message: str) -> Result:
        result.error_class = error_class
        result.error = self._redact(message)
        return result

    async def _run_into(self, request: Request, out: queue.SimpleQueue) -> None:
        try:
            out.put(await self._run(request))
        except BaseException as exc:  # never leave the caller waiting for a result
            out.put(self._failed(Result(key=request.key), "internal",
                                 f"internal: {type(exc).__name__}: {exc}"))

    def stream(self, requests: list[Request]) -> Iterator[Result]:
        """Yield one Result per request, in completion order (call from any thread but the loop)."""
        out: queue.SimpleQueue = queue.SimpleQueue()

        def start() -> None:
            for request in requests:
                self.loop.create_task(self._run_into(request, out))

        self.loop.call_soon_threadsafe(start)
        for _ in range(len(requests)):
            yield out.get()

    def close(self) -> None:
        """Close every client's connections and stop the loop thread."""
        async def close_clients():
            for endpoint in self.endpoints:
                aclose = getattr(endpoint.client, "aclose", None)
                if aclose is not None:
                    await aclose()

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(close_clients(), self.loop).result(timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)


_POOLS: dict[str, WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


@atexit.register
def close_pools() -> None:
    """Close this process's pools (runs at interpreter exit)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        try:
            pool.close()
        except Exception:  # best effort at exit
            pass


def _factories(llm: LLMConfig, window: int) -> list[tuple[str, Callable[[], Any]]]:
    if llm.client_factory is not None:
        return [(llm.endpoints[0], llm.client_factory)]
    return [(url, lambda url=url: OpenAIHTTPClient(url, llm.api_key, llm.timeout, window,
                                                   llm.return_all_choices))
            for url in llm.base_url]


def new_pool(llm: LLMConfig, window: int) -> WorkerPool:
    """A fresh pool for ``llm`` with ``window`` slots per endpoint (the caller closes it)."""
    return WorkerPool(_factories(llm, window), window, llm.max_retries, llm.backoff_base,
                      llm.backoff_max, llm.endpoint_cooldown, llm.api_key)


def get_pool(llm: LLMConfig, window: int) -> WorkerPool:
    """This process's pool for ``llm`` with ``window`` slots per endpoint (created on first use)."""
    key = llm.pool_key(window)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = new_pool(llm, window)
            _POOLS[key] = pool
        return pool

