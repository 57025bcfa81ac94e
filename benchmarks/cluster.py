"""Scale-out suites: the cluster-wide in-flight budget on 1, 2 and 4 workers (and while workers come
and go), end-to-end occupancy of the endpoint over a whole CLI run, and the cost of reading JSONL
inputs in many partitions. The mock server runs in its own process and is sampled over HTTP.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks.suites import MockProcess, _table, bench_corpus
from nemocc_dask.llm.config import server_root


class Sampler:
    """Samples the mock's ``/mock/stats`` (in flight, completed) every ``every`` seconds."""

    def __init__(self, base_url: str, every: float = 0.05):
        self.url = server_root(base_url) + "/mock/stats"
        self.every = every
        self.samples: list[tuple[float, int, int]] = []  # (time, in flight, completed)
        self.stats: list[tuple[float, dict]] = []  # (time, everything /mock/stats said)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            with urllib.request.urlopen(self.url, timeout=5) as answer:
                stats = json.loads(answer.read())
            now = time.monotonic()
            self.samples.append((now, stats["in_flight"], stats["completed"]))
            self.stats.append((now, stats))

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def steady_mean(self) -> float:
        """Mean in flight while the run was between 10% and 90% of its answers."""
        done = self.samples[-1][2] - self.samples[0][2]
        low, high = self.samples[0][2] + 0.1 * done, self.samples[0][2] + 0.9 * done
        middle = [n for _, n, completed in self.samples if low <= completed <= high]
        return sum(middle) / max(1, len(middle))

    def whole_mean(self) -> float:
        return sum(n for _, n, _ in self.samples) / max(1, len(self.samples))

    def peak(self) -> int:
        return max((n for _, n, _ in self.samples), default=0)


def _one_row_group_file(folder: Path, documents: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "docs.parquet"
    words = "river delta wetland species water season town bird".split()
    texts = [" ".join(words[(i + j) % 8] for j in range(60)) + f" document {i}."
             for i in range(documents)]
    pq.write_table(pa.table({"id": list(range(documents)), "text": texts}), path,
                   row_group_size=documents)  # one row group, as pandas/pyarrow write small files
    return path


def _budget_run(base_url: str, docs: Path, out: Path, workers: int, budget: int,
                per_worker: int | None = None, churn: bool = False) -> dict:
    from distributed import Client, LocalCluster

    from nemocc_dask.llm.config import LLMConfig
    from nemocc_dask.run.runner import run_to_parquet

    llm = LLMConfig(base_url=base_url, model="mock", max_in_flight=budget,
                    max_in_flight_per_worker=per_worker, timeout=600)
    with LocalCluster(n_workers=workers, threads_per_worker=4, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        changer = threading.Thread(target=_change_workers, args=(cluster, client, workers))
        with Sampler(base_url) as sampler:
            if churn:
                changer.start()
            started = time.perf_counter()
            report = run_to_parquet(docs, out, "distill", llm, rows_per_partition=100,
                                    show_progress=False)
            wall = time.perf_counter() - started
            if churn:
                changer.join()
    return {"requests": report["requests"], "wall_s": round(wall, 2),
            "peak_in_flight": sampler.peak(), "steady_in_flight": round(sampler.steady_mean(), 1),
            "req_per_s": round(report["requests"] / wall, 1)}


def _change_workers(cluster, client, workers: int) -> None:
    """A worker joins after 3 s; one leaves 3 s later."""
    time.sleep(3)
    cluster.scale(workers + 1)
    client.wait_for_workers(workers + 1, timeout=60)
    time.sleep(3)
    client.retire_workers([sorted(client.scheduler_info(n_workers=-1)["workers"])[0]])


def budget(out: Path, quick: bool = False) -> dict:
    """A one-row-group parquet file, a fixed total budget, 1, 2 and 4 workers: in flight at the
    server (peak and steady) vs the budget, requests/s vs budget / latency. Baseline: the same
    budget split statically (``max_in_flight_per_worker`` = budget / workers). Last row: a
    worker joins and one leaves mid-run (peak must stay within the budget)."""
    documents, total, latency = (800, 32, 0.3) if quick else (5000, 128, 1.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, \
            MockProcess(0, latency=latency, per_token_latency=0) as server:
        docs = _one_row_group_file(Path(tmp), documents)
        runs = [("allocator", w, None, False) for w in (1, 2, 4)]
        runs += [("static split", w, total // w, False) for w in (2, 4)]
        runs += [("allocator, +1 -1 worker", 2, None, True)]
        for i, (mode, workers, per_worker, churn) in enumerate(runs):
            row = {"mode": mode, "workers": workers, "budget": total,
                   **_budget_run(server.base_url, docs, Path(tmp) / f"out{i}", workers, total,
                                 per_worker, churn)}
            row["peak_over_budget"] = round(row["peak_in_flight"] / total, 3)
            row["steady_over_budget"] = round(row["steady_in_flight"] / total, 3)
            row["req_per_s_over_ideal"] = round(row["req_per_s"] / (total / latency), 3)
            rows.append(row)
            print(row, flush=True)
    cols = ["mode", "workers", "budget", "requests", "wall_s", "peak_in_flight",
            "peak_over_budget", "steady_in_flight", "steady_over_budget", "req_per_s",
            "req_per_s_over_ideal"]
    return {"rows": rows, "table": _table(rows, cols) + (
        f"\n\n{documents} documents in ONE row group, {documents // 100} partitions, mock latency "
        f"{latency} s. `steady`: mean in flight at the server between 10% and 90% of the answers; "
        "ideal requests/s = budget / latency (the whole run, start and tail included).")}


def occupancy(out: Path, quick: bool = False) -> dict:
    """The whole CLI run (cluster start included), DiverseQA, 2 workers: mean requests in service
    at the server over the run / budget, and the run's wall time vs the generation-bound ideal."""
    copies, total, latency = (1, 64, 0.5) if quick else (32, 256, 2.0)
    with tempfile.TemporaryDirectory() as tmp, \
            MockProcess(0, latency=latency, per_token_latency=0) as server:
        docs = Path(tmp) / "corpus.parquet"
        bench_corpus(copies).to_parquet(docs)
        args = [sys.executable, "-m", "nemocc_dask.cli", "run", "--task", "diverse_qa",
                "--input", str(docs), "--output", str(Path(tmp) / "out"), "--base-url",
                server.base_url, "--model", "mock", "--max-in-flight", str(total), "--workers",
                "2", "--no-progress", "--rows-per-partition", "250"]
        with Sampler(server.base_url, every=0.1) as sampler:
            started = time.perf_counter()
            subprocess.run(args, check=True, capture_output=True, timeout=3600)
            wall = time.perf_counter() - started
        report = json.loads((Path(tmp) / "out" / "report.json").read_text())
    ideal = report["requests"] * latency / total
    row = {"requests": report["requests"], "budget": total, "latency_s": latency,
           "wall_s": round(wall, 1), "ideal_s": round(ideal, 1),
           "mean_in_service": round(sampler.whole_mean(), 1),
           "occupancy": round(sampler.whole_mean() / total, 3),
           "ideal_over_wall": round(ideal / wall, 3)}
    print(row, flush=True)
    cols = list(row)
    return {"rows": [row], "table": _table([row], cols) + (
        "\n\n`occupancy`: requests in service at the server, averaged over the whole CLI run "
        "(cluster start and the tail included), over the budget. `ideal_s` = requests x latency "
        "/ budget.")}


def jsonl_reading(out: Path, quick: bool = False) -> dict:
    """A JSONL file (plain and .gz) read in many partitions: the partition pass plus every piece,
    vs one piece holding the whole file (one sequential read of its bytes, the same parsing). The .gz rows
    without the seek index show what each piece decompressing from the start costs."""
    import gzip

    from nemocc_dask import io
    from nemocc_dask.io import gzindex

    lines, parts = (100_000, 50) if quick else (1_000_000, 500)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain, packed = Path(tmp) / "docs.jsonl", Path(tmp) / "docs.jsonl.gz"
        # words drawn from real text (with its word frequencies): compresses about like prose,
        # where a repeated sample would give unrealistically long deflate blocks
        words, rng = " ".join(bench_corpus(1)["text"]).split(), random.Random(0)
        with open(plain, "w") as fh:
            for i in range(lines):
                text = " ".join(rng.choices(words, k=40))
                fh.write(json.dumps({"id": i, "text": text}) + "\n")
        with open(plain, "rb") as src, gzip.open(packed, "wb", compresslevel=6) as dst:
            dst.write(src.read())
        size = plain.stat().st_size  # decompressed bytes: the one piece's byte range
        for path in (plain, packed):
            rows.append(_read_cost(io, path, lines, size, parts, path.name))
        original = gzindex._indexed_gzip
        gzindex._indexed_gzip = lambda: None
        try:
            few = min(parts, 50)
            rows.append(_read_cost(io, packed, lines, size, few,
                                   f"{packed.name} without index"))
        finally:
            gzindex._indexed_gzip = original
    for row in rows:
        print(row, flush=True)
    cols = ["file", "lines", "partitions", "one_read_s", "pass_s", "partitioned_s", "ratio"]
    return {"rows": rows, "table": _table(rows, cols) + (
        "\n\n`ratio` = (partition pass + reading every piece) / reading the whole file as one "
        "piece; goal <= 1.5. `pass_s`: the partition pass alone (for .gz it also saves the seek "
        "index).")}


def _read_cost(io, path: Path, lines: int, size: int, parts: int, name: str) -> dict:
    started = time.perf_counter()
    whole = io.read_piece(io.Piece(str(path), "jsonl", 0, lines, 0, size))
    one = time.perf_counter() - started
    assert len(whole) == lines
    del whole
    started = time.perf_counter()
    pieces = io.partition_map(path, lines // parts)
    mapped = time.perf_counter()
    total = sum(len(io.read_piece(p)) for p in pieces)
    partitioned = time.perf_counter() - started
    assert total == lines
    return {"file": name, "lines": lines, "partitions": len(pieces), "one_read_s": round(one, 2),
            "pass_s": round(mapped - started, 2), "partitioned_s": round(partitioned, 2),
            "ratio": round(partitioned / one, 3)}
