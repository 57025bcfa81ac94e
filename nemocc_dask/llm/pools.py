"""The registry of a process's client pools: one ``WorkerPool`` per endpoint configuration
(``LLMConfig.pool_key``), built on first use (``get_pool``) with the client of each endpoint,
owned on a Dask worker by ``PoolsPlugin`` (closed with the worker) and elsewhere closed at
interpreter exit; drained all at once when a run stops (``drain_pools``)."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import threading
from typing import Any, Callable

from nemocc_dask.llm.client import OpenAIHTTPClient
from nemocc_dask.llm.config import LLMConfig, server_root
from nemocc_dask.llm.pool import WorkerPool
from nemocc_dask.llm.telemetry import INTERVAL_SECONDS

_POOLS: dict[str, WorkerPool] = {}
_POOLS_LOCK = threading.Lock()
PLUGIN_NAME = "nemocc-pools"


_DRAINING: str | None = None  # set on a worker whose run is stopping: new pools start drained


def drain_pools(reason: str | None) -> int:
    """Drain this process's pools and the ones it creates from now on (``None``: create normal
    pools again). Run on every worker by the driver when it stops on SIGTERM or Ctrl-C. Returns
    the number of requests in flight at that moment."""
    global _DRAINING
    _DRAINING = reason
    if reason is None:
        return 0
    for pool in _pools_here():
        pool.drain(reason)
    return requests_in_flight()


def requests_in_flight() -> int:
    """Requests on the wire in this process's pools now."""
    return sum(e.in_flight for pool in _pools_here() for e in pool.endpoints)


def _pools_here() -> list[WorkerPool]:
    with _POOLS_LOCK:
        return list(_POOLS.values())


def endpoint_series(since: float = 0.0) -> dict[str, list[dict]]:
    """This process's per-endpoint series (``telemetry.EndpointSeries`` buckets, one dict per
    pool) from ``since`` (epoch seconds) on. Run on every worker at the end of a run."""
    out: dict[str, list[dict]] = {}
    for pool in _pools_here():
        for endpoint in pool.endpoints:
            buckets = endpoint.series.buckets.copy()
            out.setdefault(endpoint.name, []).append(
                {key: {**bucket, "latency": bucket["latency"].copy()}
                 for key, bucket in buckets.items()
                 if (key + 1) * INTERVAL_SECONDS > since})
    return out


def endpoint_statuses_here() -> dict[str, list[dict]]:
    """This process's endpoint statuses (``Endpoint.status``), one per pool."""
    out: dict[str, list[dict]] = {}
    for pool in _pools_here():
        for endpoint in pool.endpoints:
            out.setdefault(endpoint.name, []).append(endpoint.status())
    return out


def _forget(pool: WorkerPool) -> None:
    with _POOLS_LOCK:
        if pool.registry_key is not None and _POOLS.get(pool.registry_key) is pool:
            del _POOLS[pool.registry_key]


def close_pools() -> None:
    """Close this process's pools."""
    for pool in _pools_here():
        with contextlib.suppress(Exception):
            pool.close()


atexit.register(close_pools)  # for pools outside Dask workers (threaded or sync scheduler)


def _current_worker():
    """This process's Dask worker, or None outside one (``pool_plugin`` is the Dask side)."""
    try:
        from nemocc_dask.llm.pool_plugin import current_worker
    except ImportError:  # no distributed
        return None
    return current_worker()


def _attach_to_worker(worker) -> None:
    """Make sure ``worker`` closes this process's pools when it closes."""
    from nemocc_dask.llm.pool_plugin import PoolsPlugin

    worker.plugins.setdefault(PLUGIN_NAME, PoolsPlugin())


def _factories(llm: LLMConfig, window: int) -> list[tuple[str, Callable[[], Any]]]:
    """(endpoint name, client factory) per endpoint; ``window`` bounds each client's connections."""
    if llm.client_factory is not None:
        return [(llm.endpoints[0], lambda: _adapt(llm.client_factory(), llm))]
    return [(url, lambda url=url: OpenAIHTTPClient(url, llm.api_key, llm.client_timeout, window,
                                                   llm.return_all_choices,
                                                   llm.max_response_bytes))
            for url in llm.base_url]


def _adapt(client, llm: LLMConfig):
    """A client from ``llm.client_factory``: ours as it is, an openai SDK client wrapped."""
    from nemocc_dask.llm.openai_sdk import OpenAISDKClient, is_openai_sdk_client

    if is_openai_sdk_client(client):
        return OpenAISDKClient(client, llm.client_timeout, llm.return_all_choices)
    return client


def new_pool(llm: LLMConfig, window: int, budget=None) -> WorkerPool:
    """A fresh pool for ``llm`` with at most ``window`` in flight per endpoint (learned below
    that with ``max_in_flight="auto"``), its caps from ``budget`` (a ``budget.BudgetLink`` to the
    scheduler) or from a coordinator of its own (the caller closes it)."""
    auto = llm.auto_window and llm.max_in_flight_per_worker is None
    urls = ({url: server_root(url) + "/metrics" for url in llm.base_url}  # vLLM, SGLang, TGI
            if llm.client_factory is None else {})
    headers = {"Authorization": f"Bearer {llm.api_key}"} if llm.api_key else {}
    return WorkerPool(_factories(llm, window), window, llm.max_retries, llm.backoff_base,
                      llm.backoff_max, llm.endpoint_cooldown, llm.api_key,
                      llm.max_failed_fraction, llm.failure_min_requests, budget, auto=auto,
                      metrics_urls=urls, metrics_headers=headers,
                      adaptive_timeout=llm.adaptive_timeout)


def _new_pool_here(llm: LLMConfig, worker) -> WorkerPool:
    """A pool as ``llm`` asks for it in this process: a fixed ``max_in_flight_per_worker``; on a
    Dask worker, a share of the cluster-wide ``max_in_flight``; elsewhere all of it."""
    if llm.max_in_flight_per_worker:
        return new_pool(llm, llm.max_in_flight_per_worker)
    if worker is None:
        return new_pool(llm, llm.in_flight_total)
    from nemocc_dask.llm.budget import BudgetLink

    return new_pool(llm, llm.in_flight_total, BudgetLink(worker))


_served_urls: Callable[[], list[str]] | None = None  # the servers next to this worker, if any


def use_served_urls(provider: Callable[[], list[str]]) -> None:
    """Send a served model's requests to ``provider()``'s URLs (set by the serving layer on a
    worker that runs servers; ``llm`` does not import that layer)."""
    global _served_urls
    _served_urls = provider


def get_pool(llm: LLMConfig) -> WorkerPool:
    """This process's pool for ``llm`` (created on first use; a closed or broken pool is
    replaced, the broken one closed once its requests on the wire are answered; while the
    worker drains, the drained pool is kept so that nothing more is sent). With a served model,
    a worker that runs servers sends to those only."""
    if llm.serve is not None and _served_urls is not None:
        mine = _served_urls()
        if mine:
            llm = dataclasses.replace(llm, base_url=tuple(mine))
    key = llm.pool_key()
    worker = _current_worker()
    if worker is not None:
        _attach_to_worker(worker)
    with _POOLS_LOCK:
        pool = old = _POOLS.get(key)
        if pool is None or pool.closed or (pool.broken and not _DRAINING):
            pool = _new_pool_here(llm, worker)
            pool.registry_key, pool.on_close = key, _forget
            _POOLS[key] = pool
            if _DRAINING:
                pool.drain(_DRAINING)
    if old is not None and old is not pool:  # its requests on the wire still finish
        threading.Thread(target=old.close_when_idle, daemon=True,
                         name="nemocc-pool-retire").start()
    return pool
