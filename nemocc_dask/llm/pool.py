"""The per-worker client pool: one event loop thread, warm clients, one sliding window.

Every Dask task on a worker process that needs completions calls ``get_pool(llm).stream(requests)``
and iterates over results as they finish. All partitions running on the worker share one window per
endpoint: a slot is handed to the next waiting request the moment one frees up (no waves). Requests
waiting out a backoff hold no slot. A ``Retry-After`` pauses the whole endpoint. An endpoint whose
connections keep failing is taken out for a cool-down; its requests go to the others.

The cap of each endpoint comes from a coordinator (``budget``): on a Dask worker the scheduler's,
which learns one window per endpoint for the whole cluster (``max_in_flight="auto"``,
``concurrency.WindowController``) or holds a fixed ``max_in_flight`` (halved by 429/503), and
divides it among the workers by demand, under leases; with ``max_in_flight_per_worker``, or
outside a Dask worker, a coordinator of the pool's own. The pool reports what it sent and saw
(``Endpoint.take_report``), tags each request with the epoch it was sent in, and polls the
server's ``/metrics`` queue every ``nemocc.endpoint.metrics-poll-seconds`` when the coordinator
makes it the poller.

Failure budget: an endpoint whose finished requests fail more than ``max_failed_fraction`` of the
time (after ``failure_min_requests`` of them) is clearly broken and gets no more requests; when
every endpoint is broken the pool stops dispatching, the requests not yet answered come back as
``aborted`` (never journaled, so a rerun sends them) and ``stream`` raises ``EndpointsBroken``.

Lifecycle: clients are built before the loop thread starts (a raising factory leaks nothing);
a stream whose consumer stops (an exception, ``close()``) cancels its requests that are not on the
wire yet; waits are bounded by a liveness check of the loop thread; ``close()`` removes the pool
from the registry. On a Dask worker the pools belong to ``PoolsPlugin`` and are closed with the
worker; elsewhere at interpreter exit (``pools``: the registry of a process's pools).
Synchronous clients run on an executor of ``window`` threads.

One module because the pool is one object on one event loop: dispatch, leases, queue polling,
retries and shutdown all read and change the same state.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from nemocc_dask.config import setting
from nemocc_dask.errors import Preempted, RunError
from nemocc_dask.io.unicode import without_lone_surrogates
from nemocc_dask.llm.client import Completion, LLMRequestError, RetryableError, read_at_most
from nemocc_dask.llm.coordinator import LocalLink
from nemocc_dask.llm.endpoint import Endpoint
from nemocc_dask.llm.telemetry import parse_queue_metrics
from nemocc_dask.llm.timeouts import AdaptiveTimeout

LIVENESS_CHECK_SECONDS = 1.0
METRICS_FAILURES_BEFORE_LATENCY = 3
METRICS_MAX_BYTES = 32 << 20  # a vLLM page is well under 1 MiB; more is not a metrics page

logger = logging.getLogger(__name__)


class EndpointsBroken(RunError):
    """Every endpoint of a pool failed more than its failure budget allows."""


class PoolClosed(RunError):
    """The pool was closed (or its loop thread died) while requests were outstanding."""


@dataclass
class Request:
    """One chat completion to run; ``key`` identifies it in results and journals."""

    key: str
    messages: list[dict]
    settings: dict


@dataclass
class Result:
    """The outcome of one request after retries: a completion or an error message.

    ``aborted``: never answered because the pool stopped dispatching (not to be journaled).
    ``retried``: the error class of each attempt that was retried."""

    key: str
    completion: Completion | None = None
    error: str | None = None
    error_class: str | None = None
    attempts: int = 0
    endpoint: str | None = None
    latency: float = 0.0
    failed_endpoints: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    aborted: bool = False


def _backoff(attempt: int, base: float, cap: float, retry_after: float | None) -> float:
    delay = min(cap, base * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


class WorkerPool:
    """Runs requests on a private event loop thread through endpoint clients and one window."""

    def __init__(self, endpoints: list[tuple[str, Callable[[], Any]]], window: int,
                 max_retries: int, backoff_base: float, backoff_max: float, cooldown: float,
                 secret: str | None = None, max_failed_fraction: float = 0.5,
                 failure_min_requests: int = 50, budget=None, auto: bool = False,
                 metrics_urls: dict[str, str] | None = None, metrics_headers: dict | None = None,
                 adaptive_timeout: bool = False):
        """``window``: the most each endpoint may have in flight (``max_in_flight``); with
        ``auto`` the window is learned below that (``concurrency.WindowController``), from the
        server's queue at ``metrics_urls[name]`` where it answers, else from latency. ``budget``:
        where the caps come from (a ``budget.BudgetLink`` to the scheduler, shared by the
        cluster; by default a ``budget.LocalLink`` of this pool's own). ``adaptive_timeout``:
        each request's time limit follows its endpoint's latency (``timeouts``)."""
        clients = [(name, factory()) for name, factory in endpoints]  # may raise: nothing to undo
        self._max_retries = max_retries
        self._backoff = (backoff_base, backoff_max)
        self._cooldown = cooldown
        self._secret = secret
        self._failure_budget = (max_failed_fraction, failure_min_requests)
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._wake_at: float | None = None
        self._budget = budget if budget is not None else LocalLink()
        self._budget_wake: asyncio.Event | None = None
        self._lease_lapsed = False
        self.endpoints = [Endpoint(name, client, window, auto,
                                   AdaptiveTimeout() if adaptive_timeout else None)
                          for name, client in clients]
        for endpoint in self.endpoints:
            if auto:
                endpoint.poll_url = (metrics_urls or {}).get(endpoint.name)
        self._metrics_headers = metrics_headers or {}
        self._pollers: dict[str, asyncio.Task] = {}
        self.broken: str | None = None
        self._stop_error: type[RunError] = EndpointsBroken
        self.closed = False
        self.registry_key: str | None = None
        self.on_close: Callable[[WorkerPool], None] | None = None  # set by the registry
        self._executor = None
        if any(not hasattr(client, "complete") for _, client in clients):
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=window, thread_name_prefix="nemocc-sync-client")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="nemocc-llm-pool",
                                        daemon=True)
        self._thread.start()
        self.loop.call_soon_threadsafe(self._start_budget)

    # -- the coordinator: caps, epoch tags, leases ----------------------------------------------
    def _start_budget(self) -> None:
        self._budget_wake = asyncio.Event()
        self.loop.create_task(self._budget_loop())

    def _reports(self, closing: bool = False) -> dict[str, dict]:
        waiting = 0 if closing else sum(not w.done() for w in self._waiters)
        return {e.name: e.take_report(waiting, closing) for e in self.endpoints}

    async def _budget_loop(self) -> None:
        """Report to the coordinator and apply the caps it grants, until the pool closes."""
        answered = False
        link = self._budget
        while not self.closed:
            reports = self._reports()
            sent_at = time.monotonic()
            try:
                answer = await link.exchange(reports)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not answered:  # never reached: nothing may be sent without a share
                    self._stop_dispatching(
                        "the cluster-wide in-flight budget is not reachable on the scheduler "
                        f"({type(exc).__name__}: {exc}); install nemocc_dask where the scheduler "
                        "runs, or give each worker a fixed share with --max-in-flight-per-worker")
                    return
                self._check_lease()  # a hiccup: the caps hold until the lease ends
                await asyncio.sleep(link.report_seconds)
                continue
            answered = True
            woken = self._budget_wake.is_set()  # work arrived while the report was on its way
            lease_until = sent_at + float(answer.get("lease", 0.0))
            if self._lease_lapsed:
                logger.warning("the scheduler renewed this pool's share: sending again")
                self._lease_lapsed = False
            for endpoint in self.endpoints:
                endpoint.apply_grant(answer["endpoints"].get(endpoint.name, {}), lease_until)
                self._start_polling(endpoint)
            self._dispatch()
            busy = any(r["demand"] or r["cap"] for r in reports.values())
            self._budget_wake.clear()
            if woken and not busy:
                continue  # the report said idle: say now what is waiting, not in idle seconds
            every = float(answer.get("report_seconds", link.report_seconds))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._budget_wake.wait(),
                                       every if busy else max(every, link.idle_report_seconds))

    def _check_lease(self) -> None:
        """Say once when the lease has lapsed (the pool sends nothing until it is renewed)."""
        now = time.monotonic()
        if not self._lease_lapsed and any(e.cap and now >= e.lease_until
                                          for e in self.endpoints):
            self._lease_lapsed = True
            logger.warning("this pool's share of the in-flight budget lapsed (no answer from the "
                           "scheduler): not sending until it is renewed")

    # -- the server's queue gauges --------------------------------------------------------------
    def _start_polling(self, endpoint: Endpoint) -> None:
        if endpoint.poll and endpoint.name not in self._pollers:
            self._pollers[endpoint.name] = self.loop.create_task(self._poll_metrics(endpoint))

    async def _poll_metrics(self, endpoint: Endpoint) -> None:
        """Read the server's queue from its /metrics while this pool is the endpoint's poller
        and has work; after repeated failures, say so (the window is learned from latency)."""
        import aiohttp

        failures = 0
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout, headers=self._metrics_headers) as http:
            while (not self.closed and endpoint.poll
                   and failures < METRICS_FAILURES_BEFORE_LATENCY):
                await asyncio.sleep(setting("endpoint.metrics-poll-seconds"))
                if not endpoint.in_flight and not self._waiters:
                    continue
                try:
                    async with http.get(endpoint.poll_url) as resp:
                        body = await read_at_most(resp, METRICS_MAX_BYTES, endpoint.poll_url)
                        queue_now = parse_queue_metrics(body.decode()) if resp.status == 200 \
                            else None
                except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError,
                        LLMRequestError):  # unreachable, slow, not text, or larger than a page
                    queue_now = None
                if queue_now is None:
                    failures += 1
                    continue
                failures = 0
                endpoint.queue, endpoint.queue_fresh = queue_now, True
        self._pollers.pop(endpoint.name, None)
        if failures:
            endpoint.metrics_failed = True
            logger.info("endpoint %s: no queue gauges at %s; learning its window from latency",
                        endpoint.name, endpoint.poll_url)

    # -- window -------------------------------------------------------------------------------
    def _pick(self, now: float) -> Endpoint | None:
        ready = [e for e in self.endpoints if e.has_slot(now)]
        if not ready:
            return None
        return min(ready, key=lambda e: (e.in_flight / e.cap, e.in_flight))

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
        if not self._waiters:
            return
        if self._budget_wake is not None and not any(
                e.cap and now < e.lease_until for e in self.endpoints):
            self._check_lease()
            self._budget_wake.set()  # waiting with no share (or no lease): ask now
        wake = min((e.cooldown_until for e in self.endpoints if e.cooldown_until > now),
                   default=None)
        if wake is not None and (self._wake_at is None or wake < self._wake_at
                                 or self._wake_at <= now):
            self._wake_at = wake
            self.loop.call_at(self.loop.time() + (wake - now) + 0.001, self._dispatch)

    async def _acquire(self) -> Endpoint:
        if self.broken:
            raise self._stop_error(self.broken)
        waiter = self.loop.create_future()
        self._waiters.append(waiter)
        self._dispatch()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # a slot was handed over: give it back
                self._release(waiter.result())
            raise

    def _release(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1
        self._dispatch()

    # -- failure budget -----------------------------------------------------------------------
    def _count_outcome(self, endpoint: Endpoint, failure: str | None) -> None:
        if not endpoint.count_outcome(failure, *self._failure_budget):
            return
        if all(e.broken for e in self.endpoints):
            self._stop_dispatching(
                f"stopped sending: more than {self._failure_budget[0]:.0%} of requests failed at "
                "every endpoint (" + "; ".join(e.describe_failures() for e in self.endpoints)
                + "). The answers received are kept: fix the cause, then rerun the same command "
                "with --retry-failed (retry_failed=True) to resend only the failed requests")

    def _stop_dispatching(self, reason: str, error: type[RunError] = EndpointsBroken) -> None:
        """Send nothing more: waiting requests (and retries) come back aborted, requests on the
        wire finish, and ``stream`` raises ``error`` with ``reason``."""
        if self.broken:
            return
        self._stop_error = error
        self.broken = self._redact(reason)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error(self.broken))
        self._waiters.clear()

    def drain(self, reason: str) -> None:
        """Stop dispatching (from any thread): what is on the wire finishes and is returned,
        the rest comes back aborted, and ``stream`` raises Preempted."""
        if not self.closed and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop_dispatching, reason, Preempted)

    # -- one request --------------------------------------------------------------------------
    def _redact(self, message: str) -> str:
        return message.replace(self._secret, "***") if self._secret else message

    def _writable_completion(self, completion: Completion) -> Completion:
        """The answer as parts and journals may hold it: the API key redacted (a hostile or
        broken server that echoes it), lone surrogates as U+FFFD (no UTF-8 file can hold them;
        a ``"\\ud800"`` in the server's JSON, or a custom client's string)."""
        texts = [completion.text or "", *completion.choices]
        written = [self._redact(without_lone_surrogates(text)) for text in texts]
        if written == texts:
            return completion
        return dataclasses.replace(completion, text=completion.text and written[0],
                                   choices=written[1:])

    async def _call(self, endpoint: Endpoint, request: Request) -> Completion:
        client = endpoint.client
        if hasattr(client, "complete"):
            call = client.complete(request.messages, request.settings)
        else:
            call = self.loop.run_in_executor(self._executor, client.complete_sync,
                                             request.messages, request.settings)
        if endpoint.timeout is None:
            return await call
        limit = endpoint.timeout.limit(request.settings.get("max_tokens"))
        try:
            return await asyncio.wait_for(call, limit)
        except asyncio.TimeoutError:
            raise RetryableError("timeout", f"{endpoint.name}: no answer within {limit:.0f} s "
                                            f"(the automatic limit, "
                                            f"{setting('request-timeout.margin'):g}x the "
                                            "full-length latency its recent answers predict; "
                                            "pass --timeout SECONDS for a fixed one)") from None

    def timeouts(self) -> dict[str, float]:
        """Each endpoint's latest automatic request timeout, where it has one."""
        return {e.name: round(e.timeout.last, 1) for e in self.endpoints
                if e.timeout is not None and e.timeout.last is not None}

    async def _attempt(self, endpoint: Endpoint, request: Request) -> tuple[Completion, int]:
        """One call on ``endpoint``, holding its slot until the call ends (or is cancelled);
        returns the completion and the request's epoch tag. A failed call counts as lost (a
        429/503 or a timeout as overload)."""
        tag = endpoint.sent()
        try:
            return await self._call(endpoint, request), tag
        except asyncio.CancelledError:
            endpoint.on_lost(tag, overload=False)
            raise
        except BaseException as exc:
            overload = isinstance(exc, RetryableError) and (exc.overload
                                                              or exc.error_class == "timeout")
            endpoint.on_lost(tag, overload)
            raise
        finally:
            self._release(endpoint)

    async def _run(self, request: Request) -> Result:
        result = Result(key=request.key)
        while True:
            try:
                endpoint = await self._acquire()
            except (EndpointsBroken, Preempted):
                result.aborted = True
                return self._failed(result, "aborted", f"aborted: {self.broken}")
            result.attempts += 1
            started = time.monotonic()
            try:
                completion, tag = await self._attempt(endpoint, request)
            except RetryableError as exc:
                now = time.monotonic()
                result.failed_endpoints.append(endpoint.name)
                if exc.overload and exc.retry_after:
                    self._pause(endpoint, now, exc.retry_after)
                if exc.connection and endpoint.on_connection_failure(now, self._cooldown):
                    self._dispatch()
                if result.attempts > self._max_retries:
                    return self._final_failure(endpoint, result, exc.error_class, str(exc))
                result.retried.append(exc.error_class)
                await asyncio.sleep(_backoff(result.attempts, *self._backoff, exc.retry_after))
                continue
            except LLMRequestError as exc:
                result.failed_endpoints.append(endpoint.name)
                return self._final_failure(endpoint, result, exc.error_class, str(exc))
            except Exception as exc:  # a custom client's own failure: the row fails, not the run
                result.failed_endpoints.append(endpoint.name)
                return self._final_failure(endpoint, result, "client_error",
                                           f"client_error: {type(exc).__name__}: {exc}")
            result.latency = time.monotonic() - started
            endpoint.on_success(tag, result.latency, completion.completion_tokens)
            completion = self._writable_completion(completion)
            self._count_outcome(endpoint, None)
            result.endpoint = endpoint.name
            result.completion = completion
            return result

    def _pause(self, endpoint: Endpoint, now: float, seconds: float) -> None:
        """Retry-After: no request goes to ``endpoint`` for ``seconds`` (not only this one)."""
        seconds = min(seconds, self._backoff[1])
        if now + seconds > endpoint.cooldown_until:
            endpoint.cooldown_until = now + seconds
            logger.info("endpoint %s: paused %.1f s (Retry-After)", endpoint.name, seconds)
            self._dispatch()

    def _final_failure(self, endpoint: Endpoint, result: Result, error_class: str,
                       message: str) -> Result:
        self._failed(result, error_class, message)
        self._count_outcome(endpoint, result.error)
        return result

    def _failed(self, result: Result, error_class: str, message: str) -> Result:
        result.error_class = error_class
        result.error = self._redact(message)
        return result

    async def _run_into(self, request: Request, out: queue.SimpleQueue) -> None:
        try:
            out.put(await self._run(request))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # never leave the caller waiting for a result
            out.put(self._failed(Result(key=request.key), "internal",
                                 f"internal: {type(exc).__name__}: {exc}"))

    def stream(self, requests: list[Request]) -> Iterator[Result]:
        """Yield one Result per request, in completion order (call from any thread but the loop).

        Raises EndpointsBroken after the last result when the pool is over its failure budget,
        PoolClosed when the pool is closed or its thread dies. When the consumer stops early
        (an exception in its loop body, ``close()`` on this generator), requests not yet on the
        wire are cancelled and never sent."""
        if self.closed:
            raise PoolClosed("this client pool is closed")
        out: queue.SimpleQueue = queue.SimpleQueue()
        tasks: list[asyncio.Task] = []

        def start() -> None:
            tasks.extend(self.loop.create_task(self._run_into(r, out)) for r in requests)

        def cancel() -> None:
            for task in tasks:
                task.cancel()

        self.loop.call_soon_threadsafe(start)
        received = 0
        try:
            while received < len(requests):
                try:
                    result = out.get(timeout=LIVENESS_CHECK_SECONDS)
                except queue.Empty:
                    if self.closed or not self._thread.is_alive():
                        raise PoolClosed(f"the client pool stopped with {len(requests) - received}"
                                         " request(s) unanswered") from None
                    continue
                received += 1
                yield result
        finally:
            if received < len(requests) and self._thread.is_alive():
                self.loop.call_soon_threadsafe(cancel)
        if self.broken:
            raise self._stop_error(self.broken)

    def close_when_idle(self, timeout: float = 600.0) -> None:
        """Close once no request is on the wire (at most ``timeout`` seconds from now)."""
        deadline = time.monotonic() + timeout
        while (any(e.in_flight for e in self.endpoints) and time.monotonic() < deadline
               and not self.closed):
            time.sleep(0.1)
        self.close()

    def close(self) -> None:
        """Cancel outstanding requests, close every client, stop the loop thread and leave the
        registry. Safe to call twice."""
        if self.on_close is not None:
            self.on_close(self)
        if self.closed:
            return
        self.closed = True
        # From the worker's own event loop (worker teardown) the scheduler cannot be asked; the
        # allocator frees a leaving worker's room by itself.
        give_back = not self._budget.on_worker_loop()

        async def shutdown():
            current = asyncio.current_task()
            for task in asyncio.all_tasks():
                if task is not current:
                    task.cancel()
            if give_back:  # give the room back now rather than when the lease ends
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._budget.exchange(self._reports(True)), 2)
            for endpoint in self.endpoints:
                aclose = getattr(endpoint.client, "aclose", None)
                if aclose is not None:
                    await aclose()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
