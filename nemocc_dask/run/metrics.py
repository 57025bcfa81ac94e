"""Live metrics of a run in the Prometheus text format (``--metrics-port``): what the progress line
shows, for Grafana. Served by ``prometheus_client`` from the driver, on 127.0.0.1 unless told
otherwise; every figure is read from the run's ``Progress`` when scraped (nothing is pushed).

Metrics (all prefixed ``nemocc_``): ``partitions`` and ``partitions_done`` (this run's), ``answers``,
``errors`` and ``completion_tokens`` (answers received so far, from the journals and finished
partitions), ``elapsed_seconds``, ``eta_seconds`` (NaN until a partition has finished), and per
endpoint (label ``endpoint``): ``endpoint_window``, ``endpoint_in_flight``, ``endpoint_queue``
(the server's waiting requests, where it exposes them), ``endpoint_answers`` and
``endpoint_errors`` (of the pools reporting now). By class (label ``class``): ``errors_by_class``
(rows that failed, as report.json's ``failed_by_class``: also the rows not sent, such as
``prompt_too_long``) and ``retries_by_class`` (with the total ``retries``). Latency of the answers
read from the journals while the run goes (every answer of a partition that takes longer than the
progress scan, 0.5 s): the histogram ``answer_latency_seconds`` (buckets ``LATENCY_BUCKETS``) and
``answer_latency_quantile_seconds`` (label ``quantile``: 0.5, 0.95, 0.99; within one log bin,
about 12%).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator

from nemocc_dask.llm.telemetry import BIN_EDGES, histogram_quantile

if TYPE_CHECKING:
    from nemocc_dask.run.progress import Progress


LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUANTILES = (0.5, 0.95, 0.99)


def _latency_families(histogram: dict[int, int]) -> Iterator:
    """The latency histogram (a ``latency_bin`` histogram regrouped into ``LATENCY_BUCKETS``)
    and its quantiles."""
    from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

    def upper(index: int) -> float:
        return BIN_EDGES[min(index, len(BIN_EDGES) - 1)]

    buckets = [(str(le), sum(n for i, n in histogram.items() if upper(i) <= le))
               for le in LATENCY_BUCKETS]
    buckets.append(("+Inf", sum(histogram.values())))
    yield HistogramMetricFamily("nemocc_answer_latency_seconds",
                                "latency of the answers read so far (upper bin edges)",
                                buckets=buckets,
                                sum_value=sum(upper(i) * n for i, n in histogram.items()))
    family = GaugeMetricFamily("nemocc_answer_latency_quantile_seconds",
                               "latency quantiles of the answers read so far",
                               labels=["quantile"])
    for q in QUANTILES:
        value = histogram_quantile(histogram, q)
        if value is not None:
            family.add_metric([str(q)], value)
    yield family


class RunCollector:
    """A ``prometheus_client`` collector over a run's ``Progress``."""

    def __init__(self, progress: "Progress"):
        self.progress = progress

    def collect(self) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily

        now = self.progress.snapshot()
        for name, value, text in (
                ("partitions", now["partitions"], "partitions this run processes"),
                ("partitions_done", now["partitions_done"], "partitions this run finished"),
                ("answers", now["answers"], "answers received so far"),
                ("errors", now["errors"], "requests that failed after retries so far"),
                ("retries", sum(now["retries_by_class"].values()), "retries so far"),
                ("completion_tokens", now["completion_tokens"], "completion tokens so far"),
                ("elapsed_seconds", now["elapsed_seconds"], "seconds since the run started"),
                ("eta_seconds", math.nan if now["eta_seconds"] is None else now["eta_seconds"],
                 "seconds left at the pace of the partitions finished so far")):
            yield GaugeMetricFamily(f"nemocc_{name}", text, value=value)
        for field, text in (("window", "the endpoint's window (requests in flight allowed)"),
                            ("in_flight", "requests on the wire"),
                            ("queue", "requests waiting in the server's queue"),
                            ("answers", "answers of the pools reporting now"),
                            ("errors", "failed requests of the pools reporting now")):
            family = GaugeMetricFamily(f"nemocc_endpoint_{field}", text, labels=["endpoint"])
            for endpoint, figures in sorted(now["endpoints"].items()):
                if figures.get(field) is not None:
                    family.add_metric([endpoint], figures[field])
            yield family
        for name, counts, text in (
                ("errors_by_class", now["errors_by_class"], "rows that failed, by class"),
                ("retries_by_class", now["retries_by_class"], "retries, by the class of the "
                                                              "error retried")):
            family = GaugeMetricFamily(f"nemocc_{name}", text, labels=["class"])
            for label, value in sorted(counts.items()):
                family.add_metric([label], value)
            yield family
        yield from _latency_families(now["latency"])


def serve_metrics(progress: "Progress", port: int, host: str = "127.0.0.1"):
    """Serve ``progress``'s figures at ``http://host:port/metrics``; returns the server (call
    ``shutdown()`` on it to stop)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(RunCollector(progress))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server
