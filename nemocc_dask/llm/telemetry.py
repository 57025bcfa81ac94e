"""What an endpoint tells us about its load, and what we record about it.

* ``parse_queue_metrics``: requests running and waiting from a server's Prometheus ``/metrics``
  (vLLM ``vllm:num_requests_running`` / ``vllm:num_requests_waiting``, SGLang
  ``sglang:num_running_reqs`` / ``sglang:num_queue_reqs``, TGI ``tgi_batch_current_size`` /
  ``tgi_queue_size``, llama.cpp ``llamacpp:requests_processing`` / ``llamacpp:requests_deferred``
  with ``--metrics``), summed over label sets.
* ``EndpointSeries``: per ``INTERVAL_SECONDS`` of wall-clock time, the window, answers, answer
  tokens, errors and a log-scale latency histogram; series of several workers merge exactly
  (histograms add), so the report's p50/p95 are within one bin (about 12%) of the true ones.
"""

from __future__ import annotations

import bisect
import math
import re
import time

from nemocc_dask.llm.config import server_root

INTERVAL_SECONDS = 5.0
QUEUE_GAUGES = (("vllm:num_requests_running", "vllm:num_requests_waiting"),
                ("sglang:num_running_reqs", "sglang:num_queue_reqs"),
                ("tgi_batch_current_size", "tgi_queue_size"),
                ("llamacpp:requests_processing", "llamacpp:requests_deferred"))
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")
_BINS_PER_DECADE = 20
BIN_EDGES = [10 ** (k / _BINS_PER_DECADE) for k in range(-3 * _BINS_PER_DECADE,
                                                            4 * _BINS_PER_DECADE + 1)]


def parse_queue_metrics(text: str) -> tuple[int, int] | None:
    """(running, waiting) from Prometheus text, or None when no known gauge pair is there."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            try:
                with_value = float(match.group(3))
            except ValueError:  # "e", "--": not a number after all
                continue
            if math.isfinite(with_value):
                values[match.group(1)] = values.get(match.group(1), 0.0) + with_value
    for running, waiting in QUEUE_GAUGES:
        if running in values and waiting in values:
            return max(0, int(values[running])), max(0, int(values[waiting]))
    return None


def latency_bin(seconds: float) -> int:
    """The log-scale histogram bin of a latency (``BIN_EDGES[bin]`` is its upper edge)."""
    return bisect.bisect_left(BIN_EDGES, max(seconds, 1e-6))


def histogram_quantile(histogram: dict[int, int], q: float) -> float | None:
    """The ``q`` quantile (upper bin edge, seconds) of a ``latency_bin`` histogram."""
    total = sum(histogram.values())
    if not total:
        return None
    seen = 0
    for index in sorted(histogram):
        seen += histogram[index]
        if seen >= q * total:
            return BIN_EDGES[min(index, len(BIN_EDGES) - 1)]
    return None


class EndpointSeries:
    """One endpoint's per-interval record in one pool (see the module docstring)."""

    def __init__(self):
        self.buckets: dict[int, dict] = {}

    def _bucket(self, now: float) -> dict:
        key = int(now // INTERVAL_SECONDS)
        return self.buckets.setdefault(key, {"window": 0, "answers": 0, "tokens": 0,
                                             "errors": 0, "latency": {}})

    def answer(self, seconds: float, tokens: int, window: int, now: float | None = None) -> None:
        bucket = self._bucket(time.time() if now is None else now)
        bucket["answers"] += 1
        bucket["tokens"] += tokens
        bucket["window"] = max(bucket["window"], window)
        index = latency_bin(seconds)
        bucket["latency"][index] = bucket["latency"].get(index, 0) + 1

    def error(self, window: int, now: float | None = None) -> None:
        bucket = self._bucket(time.time() if now is None else now)
        bucket["errors"] += 1
        bucket["window"] = max(bucket["window"], window)


def merge_series(series: list[dict[int, dict]]) -> list[dict]:
    """Per interval over all pools: window (sum of the pools' windows), req/s, tokens/s,
    errors, latency p50/p95 (s), oldest first; ``t`` is the interval's start (epoch seconds)."""
    merged: dict[int, dict] = {}
    for buckets in series:
        for key, bucket in buckets.items():
            into = merged.setdefault(int(key), {"window": 0, "answers": 0, "tokens": 0,
                                                "errors": 0, "latency": {}})
            for name in ("window", "answers", "tokens", "errors"):
                into[name] += bucket[name]
            for index, count in bucket["latency"].items():
                into["latency"][int(index)] = into["latency"].get(int(index), 0) + count
    return [{"t": key * INTERVAL_SECONDS, "window": b["window"],
             "req_per_s": round(b["answers"] / INTERVAL_SECONDS, 3),
             "tokens_per_s": round(b["tokens"] / INTERVAL_SECONDS, 1), "errors": b["errors"],
             "latency_p50": histogram_quantile(b["latency"], 0.5),
             "latency_p95": histogram_quantile(b["latency"], 0.95)}
            for key, b in sorted(merged.items())]


def summarise_endpoints(statuses: dict[str, list[dict]]) -> dict[str, dict]:
    """Per endpoint, from every pool's status: ``window`` (the cluster's, or the sum of the
    workers' own), ``in_flight``, ``answers``, ``errors``, ``queue`` (the server's waiting
    requests, None where it does not say), ``load`` (latency per token over the unloaded, None
    when unknown) and ``paused`` (a Retry-After pause is on)."""
    out = {}
    for name, holders in sorted(statuses.items()):
        if not holders:
            continue
        shared = [h["window"] for h in holders if h.get("shared")]  # the cluster's window
        waiting = [h["waiting"] for h in holders if h.get("waiting") is not None]
        loads = [h["per_token"] / h["unloaded"] for h in holders
                 if h.get("per_token") and h.get("unloaded")]
        out[name] = {"window": max(shared) if shared else sum(h["window"] for h in holders),
                     "in_flight": sum(h["in_flight"] for h in holders),
                     "answers": sum(h["answers"] for h in holders),
                     "errors": sum(h["errors"] for h in holders),
                     "queue": max(waiting) if waiting else None,
                     "load": sum(loads) / len(loads) if loads else None,
                     "paused": any(h.get("paused") for h in holders)}
    return out


def describe_endpoints(statuses: dict[str, list[dict]]) -> str:
    """One progress-line segment per endpoint (``summarise_endpoints``): in flight / window, the
    server's queue or latency per token over the unloaded, error rate, a Retry-After pause."""
    parts = []
    for name, e in summarise_endpoints(statuses).items():
        text = f"{server_root(name).split('://', 1)[-1]} {e['in_flight']}/{e['window']}"
        if e["queue"] is not None:
            text += f" queue {e['queue']}"
        elif e["load"] is not None:
            text += f" latency x{e['load']:.1f}"
        text += f" err {e['errors'] / max(1, e['answers'] + e['errors']):.1%}"
        if e["paused"]:
            text += " paused"
        parts.append(text)
    return " | ".join(parts)
