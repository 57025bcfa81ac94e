"""Resuming a finished run (issue 23): the same command again over 1,000 partitions should cost a
small fraction of the first run, because the partition map and the id check are kept in the
output folder (``input-cache.json``) and finished partitions are recognised from their stats.
Baseline: the same resume without that cache (the input is read again, as before the cache)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.suites import _table
from nemocc_dask import LLMConfig, run_to_parquet
from nemocc_dask.testing.mock import MockLLMServer


def _corpus(path: Path, documents: int) -> None:
    sentence = ("The river delta supports many species of birds, and its wetlands filter water "
                "for the towns downstream during the dry season. ")
    with open(path, "w") as fh:
        for i in range(documents):
            fh.write(json.dumps({"id": i, "text": f"Document {i}. " + sentence * 4}) + "\n")


def _timed_run(path: Path, out: Path, llm: LLMConfig) -> tuple[float, dict]:
    started = time.perf_counter()
    report = run_to_parquet(path, out, "knowledge_list", llm, rows_per_partition=10,
                            show_progress=False)
    return time.perf_counter() - started, report


def resume(out: Path, quick: bool = False) -> dict:
    """First run, a resume of the finished run, and a resume with its input cache removed."""
    from distributed import Client, LocalCluster

    partitions = 100 if quick else 1000
    rows = []
    with tempfile.TemporaryDirectory() as tmp, MockLLMServer(latency=0.01) as server, \
            LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None) as cluster, \
            Client(cluster):
        path, folder = Path(tmp) / "docs.jsonl", Path(tmp) / "out"
        _corpus(path, partitions * 10)
        llm = LLMConfig(base_url=server.base_url, model="mock", max_in_flight=256)
        first, report = _timed_run(path, folder, llm)
        sent = server.stats.requests
        again, resumed = _timed_run(path, folder, llm)
        (folder / "input-cache.json").unlink()
        uncached, _ = _timed_run(path, folder, llm)
        assert server.stats.requests == sent and resumed["partitions_skipped"] == partitions
    for label, seconds in (("first run", first), ("resume (cached input map)", again),
                           ("resume without the input cache", uncached)):
        rows.append({"run": label, "partitions": partitions, "requests": report["requests"],
                     "wall_s": round(seconds, 2), "vs_first_run": round(seconds / first, 4)})
    for row in rows:
        print(row, flush=True)
    return {"rows": rows, "table": _table(rows, list(rows[0])) + (
        "\n\n`vs_first_run`: wall time over the first run's, measured in one session on the "
        "same mock server (10 ms per answer) and LocalCluster (2 workers x 2 threads); goal for "
        "the resume of a finished run: under 0.05. Neither resume sends a request.")}
