"""The live progress line of a run (partitions, answers, req/s, tok/s, each endpoint's window,
queue and errors) and the per-endpoint series gathered from every worker at the end."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nemocc_dask.config import setting
from nemocc_dask.io.storage import is_remote
from nemocc_dask.llm.telemetry import (describe_endpoints, latency_bin, merge_series,
                                       summarise_endpoints)
from nemocc_dask.run.execution import distributed_client
from nemocc_dask.run.partition_job import journal_path

logger = logging.getLogger(__name__)


MAX_SAMPLES = 2000    # endpoint samples kept for report.html (thinned to every other beyond)


@dataclass
class PartitionCounts:
    """Answers of one partition: received, failed, completion tokens, failures and retries by
    class."""

    answers: int = 0
    errors: int = 0
    tokens: int = 0
    errors_by_class: Counter = field(default_factory=Counter)
    retries_by_class: Counter = field(default_factory=Counter)

    @classmethod
    def of_stats(cls, stats: dict) -> "PartitionCounts":
        """A finished partition's tally, from its stats."""
        return cls(stats["requests"], stats["failed_requests"], stats["completion_tokens"],
                   Counter(stats.get("failed_by_class", {})),
                   Counter(stats.get("retries_by_class", {})))

    def add(self, record: dict) -> None:
        """Count one journal record."""
        self.answers += 1
        if record.get("error"):
            self.errors += 1
            self.errors_by_class[record.get("error_class") or "error"] += 1
        self.tokens += record.get("completion_tokens") or 0
        retried = record.get("retried")
        if isinstance(retried, dict):
            self.retries_by_class.update(retried)


class Progress:
    """A live status line: partitions done, answers received, req/s, tokens/s, errors.

    Answers of running partitions are read from their journals (so it works whatever the
    cluster); a finished partition counts what its stats say (its journal may be gone)."""

    def __init__(self, out_dirs: list[Path], total_parts: int, enabled: bool = True,
                 endpoint_statuses=None, metrics_port: int | None = None,
                 metrics_host: str = "127.0.0.1", every=None):
        """``endpoint_statuses``: a callable returning every pool's endpoint statuses (see
        ``telemetry.describe_endpoints``), asked every ``nemocc.progress-status-seconds``.
        ``enabled``: print the line; ``metrics_port``: also serve the figures for Prometheus
        (``run.metrics``; 0 picks a free port, see ``metrics_url``); ``every``: (seconds,
        callable) called with this Progress that often while the run goes (the live
        report.html). ``samples``: each endpoint's summary over time, one per status asked."""
        self.samples: list[dict] = []
        self._every = every
        self.out_dirs, self.total = out_dirs, total_parts
        self._statuses = endpoint_statuses
        self._endpoints = ""
        self._summary: dict[str, dict] = {}
        self._metrics = (metrics_host, metrics_port) if metrics_port is not None else None
        self._metrics_server = None
        self.metrics_url: str | None = None
        self.done = 0
        self.enabled = enabled
        self._live: dict[Path, list] = {}  # journal -> [offset read, PartitionCounts]
        self._finished: dict[Path, PartitionCounts] = {}
        self.latency: Counter = Counter()  # latency_bin -> answers, of the journals read
        self._stop = threading.Event()
        self._started = time.time()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _scan(self) -> None:
        for out in self.out_dirs:
            if is_remote(out):  # journals there are chunks; finished partitions still count
                continue
            for path in sorted((out / "journal").glob("*.jsonl")):
                if path not in self._finished:
                    self._read_journal(path)

    def _read_journal(self, path: Path) -> None:
        live = self._live.setdefault(path, [0, PartitionCounts()])
        try:
            with open(path, "rb") as fh:
                fh.seek(live[0])
                data = fh.read()
        except FileNotFoundError:  # finished meanwhile
            return
        end = data.rfind(b"\n") + 1
        live[0] += end
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            live[1].add(record)
            if not record.get("error") and isinstance(record.get("latency"), (int, float)):
                self.latency[latency_bin(record["latency"])] += 1

    def finished(self, out_dir: Path, stats: dict) -> None:
        """Count partition ``stats["partition"]`` of ``out_dir`` as done with its own numbers
        (once, however often it is reported)."""
        path = journal_path(out_dir, stats["partition"])
        if path in self._finished:
            return
        self.done += 1
        self._finished[path] = PartitionCounts.of_stats(stats)
        self._live.pop(path, None)

    def snapshot(self) -> dict:
        """The figures of the line (and of ``run.metrics``): partitions, answers, errors (also
        by class), retries by class, completion tokens, elapsed seconds, the ETA (None until a
        partition finished), each endpoint's summary (``telemetry.summarise_endpoints``) and
        the latency histogram of the answers read from journals (``latency_bin`` -> count)."""
        elapsed = max(1e-9, time.time() - self._started)
        tallies = [live[1] for p, live in list(self._live.items()) if p not in self._finished]
        tallies += list(self._finished.values())
        errors_by_class, retries_by_class = Counter(), Counter()
        for tally in tallies:
            errors_by_class.update(tally.errors_by_class)
            retries_by_class.update(tally.retries_by_class)
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        return {"partitions": self.total, "partitions_done": self.done,
                "answers": sum(t.answers for t in tallies),
                "errors": sum(t.errors for t in tallies),
                "completion_tokens": sum(t.tokens for t in tallies),
                "errors_by_class": dict(errors_by_class),
                "retries_by_class": dict(retries_by_class), "latency": dict(self.latency),
                "elapsed_seconds": elapsed, "eta_seconds": eta,
                "endpoints": dict(self._summary)}

    def line(self) -> str:
        now = self.snapshot()
        elapsed = now["elapsed_seconds"]
        line = (f"partitions {self.done}/{self.total} | answers {now['answers']} | "
                f"{now['answers'] / elapsed:.1f} req/s | "
                f"{now['completion_tokens'] / elapsed:.0f} tok/s | errors {now['errors']} | "
                f"{elapsed:.0f} s")
        if now["eta_seconds"] is not None and self.done < self.total:
            line += f" | ETA {_duration(now['eta_seconds'])}"
        return line + (f" || {self._endpoints}" if self._endpoints else "")

    def _refresh_endpoints(self) -> None:
        if self._statuses is None:
            return
        try:  # idle pools stop reporting: the line keeps the last status seen
            statuses = self._statuses()
            self._endpoints = describe_endpoints(statuses) or self._endpoints
            self._summary = summarise_endpoints(statuses) or self._summary
            if self._summary:
                self.samples.append({"t": time.time(), "endpoints": dict(self._summary)})
                if len(self.samples) > MAX_SAMPLES:
                    self.samples = self.samples[::2]
        except Exception as exc:  # a status is nice to have; the run goes on without it
            logger.debug("no endpoint status: %s", exc)

    def _loop(self) -> None:
        tty = sys.stderr.isatty()
        last = asked = 0.0
        called = time.time()
        while not self._stop.wait(0.5):
            self._scan()
            if time.time() - asked >= setting("progress-status-seconds"):
                self._refresh_endpoints()
                asked = time.time()
            if self._every is not None and time.time() - called >= self._every[0]:
                self._every[1](self)
                called = time.time()
            if not self.enabled:
                continue
            if tty:
                print("\r" + self.line(), end="", file=sys.stderr, flush=True)
            elif time.time() - last >= 10:
                print(self.line(), file=sys.stderr, flush=True)
                last = time.time()

    def __enter__(self) -> "Progress":
        if self._metrics is not None:
            from nemocc_dask.run.metrics import serve_metrics

            host, port = self._metrics
            self._metrics_server = serve_metrics(self, port, host)
            self.metrics_url = f"http://{host}:{self._metrics_server.server_port}/metrics"
            logger.warning("live metrics (Prometheus): %s", self.metrics_url)
        if self.enabled or self._metrics is not None or self._every is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        if self._metrics_server is not None:
            self._scan()  # the final figures, for a last scrape
            time.sleep(float(setting("metrics-linger-seconds")))
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self.enabled:
            self._scan()
            print(("\r" if sys.stderr.isatty() else "") + self.line(), file=sys.stderr, flush=True)


def endpoint_statuses() -> dict[str, list[dict]]:
    """Every pool's endpoint status: from the scheduler's budget allocator (the pools report
    there), or from this process's pools without a cluster."""
    client = distributed_client()
    if client is None:
        from nemocc_dask.llm.pools import endpoint_statuses_here

        return endpoint_statuses_here()
    from nemocc_dask.llm.budget import endpoint_statuses

    return client.run_on_scheduler(endpoint_statuses)


def endpoint_series(since: float) -> dict[str, list[dict]]:
    """Per endpoint, the merged per-interval series of every worker's pools since ``since``
    (workers that left took theirs with them)."""
    from nemocc_dask.llm.pools import endpoint_series

    client = distributed_client()
    try:
        per_process = ([endpoint_series(since)] if client is None
                       else list(client.run(endpoint_series, since).values()))
    except Exception as exc:
        logger.warning("no per-endpoint series for the report: %s", exc)
        return {}
    pools: dict[str, list[dict]] = {}
    for series in per_process:
        for name, buckets in series.items():
            pools.setdefault(name, []).extend(buckets)
    return {name: merge_series(buckets) for name, buckets in pools.items()}


def _duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
