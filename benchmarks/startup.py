"""How soon a fresh worker sends: on a fresh LocalCluster (2 workers), each worker's pool is
created by its first batch of requests, which must first get a share of the cluster-wide budget
from the scheduler. Measured per worker: the time to the first answer of that first batch (cold)
and of a second batch on the same pool (warm: the share is held), against the server's own
answer time (ideal), for several kinds of server. Goal: the first worker's extra time under one
report period, 0.25 s (the second one waits, by design, until the first has reported its smaller
share, a few report periods). Before the fix in ``llm.pool._budget_loop`` and
``llm.coordinator``, a pool's first requests waited up to ``nemocc.budget.idle-report-seconds``
(2 s) for their share."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from benchmarks.plan import SERVERS, _cluster
from benchmarks.suites import _table
from nemocc_dask import LLMConfig
from nemocc_dask.testing.mock import MockLLMServer

BATCH = 16


def _first_answers(llm: LLMConfig) -> tuple[float, float]:
    """On a worker: seconds to the first answer of a first batch (the pool starts) and of a
    second one."""
    from nemocc_dask.llm.pool import Request
    from nemocc_dask.llm.pools import get_pool
    from nemocc_dask.recipe.presets import PRESETS

    preset = PRESETS["knowledge_list"]
    settings = {"model": llm.model, "max_tokens": 200}
    seconds = []
    for batch in range(2):
        requests = [Request(f"{batch}-{i}-{time.time_ns()}", preset.messages(f"Fact {i}."),
                            settings) for i in range(BATCH)]
        started = time.perf_counter()
        stream = get_pool(llm).stream(requests)
        next(stream)
        seconds.append(time.perf_counter() - started)
        for _ in stream:
            pass
    return seconds[0], seconds[1]


def _ideal(server: MockLLMServer) -> float:
    """The server's own answer time for one request of the batch (a single request sent
    directly)."""
    import json
    import urllib.request

    body = json.dumps({"model": "mock", "max_tokens": 200,
                       "messages": [{"role": "user", "content": "Fact 1."}]}).encode()
    started = time.perf_counter()
    request = urllib.request.Request(f"{server.base_url}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        answer.read()
    return time.perf_counter() - started


def startup(out: Path, quick: bool = False) -> dict:
    """Cold and warm first-answer times per server kind, over the server's answer time."""
    servers = dict(list(SERVERS.items())[:2]) if quick else SERVERS
    rows = []
    for label, options in servers.items():
        with MockLLMServer(**options) as server:
            ideal = statistics.median(_ideal(server) for _ in range(5))
            cluster, client = _cluster()
            try:
                llm = LLMConfig(base_url=server.base_url, model="mock")
                workers = list(client.scheduler_info()["workers"])
                times = client.gather([client.submit(_first_answers, llm, workers=[w],
                                                     pure=False) for w in workers])
            finally:
                client.close()
                cluster.close()
        first, second = sorted(t[0] for t in times)
        warm = max(t[1] for t in times)
        rows.append({"server": label, "ideal_s": round(ideal, 3),
                     "first_worker_cold_s": round(first, 3),
                     "second_worker_cold_s": round(second, 3), "warm_s": round(warm, 3),
                     "first_cold_over_ideal": round(first / ideal, 2),
                     "first_cold_extra_s": round(first - ideal, 3),
                     "second_cold_over_ideal": round(second / ideal, 2),
                     "warm_over_ideal": round(warm / ideal, 2)})
        print(rows[-1], flush=True)
    return {"rows": rows, "table": _table(rows, list(rows[0])) + (
        f"\n\nA batch of {BATCH} requests per worker on a fresh LocalCluster (2 workers x 1 "
        "thread, `max_in_flight` auto, the budget on the scheduler): each worker's time to its "
        "first answer with a new pool (cold; the worker whose pool asked first, and the other, "
        "which gets room once the first has reported its smaller share) and with the same pool "
        "again (warm), over the server's answer time for one request sent alone (ideal), "
        "measured in one run per server kind; goal: the first worker's extra time under one "
        "budget report period (0.25 s; it was over 2 s).")}
