"""Live metrics of a run in the Prometheus text format (``--metrics-port``): what the progress line
shows, for Grafana. Served by ``prometheus_client`` from the driver, on 127.0.0.1 unless told
otherwise; every figure is read from the run's ``Progress`` when scraped (nothing is pushed).

Metrics (all prefixed ``nemocc_``): ``partitions`` and ``partitions_done`` (this run's), ``answers``,
``errors`` and ``completion_tokens`` (answers received so far, from the journals and finished
partitions), ``elapsed_seconds``, ``eta_seconds`` (NaN until a partition has finished), and per
endpoint (label ``endpoint``): ``endpoint_window``, ``endpoint_in_flight``, ``endpoint_queue``
(the server's waiting requests, where it exposes them), ``endpoint_answers`` and
``endpoint_errors`` (of the pools reporting now).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from nemocc_dask.run.progress import Progress


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


def serve_metrics(progress: "Progress", port: int, host: str = "127.0.0.1"):
    """Serve ``progress``'s figures at ``http://host:port/metrics``; returns the server (call
    ``shutdown()`` on it to stop)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(RunCollector(progress))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server
