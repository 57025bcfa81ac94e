"""The benchmark suites. The mock server runs in a separate process so that the client CPU
measured here (``time.process_time`` of this process) is the client's alone.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.llm.pool import Request
from nemocc_dask.llm.pools import new_pool
from nemocc_dask.recipe.presets import PRESETS


class MockProcess:
    """``nemocc-dask serve-mock`` in a subprocess."""

    def __init__(self, port: int, **options):
        args = [sys.executable, "-m", "nemocc_dask.cli", "serve-mock", "--port", str(port)]
        for key, value in options.items():  # True: a flag without a value
            args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        self.base_url = json.loads(self.proc.stdout.readline())["base_url"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()


def _requests(n: int, tag: str) -> list[Request]:
    preset = PRESETS["knowledge_list"]
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    out = []
    for i in range(n):
        length = 5 + (i * 7) % 60  # answers of varying length -> varying latency
        doc = ". ".join(" ".join(words[(i + j) % 10] for j in range(6)) for _ in range(length // 6 + 1))
        out.append(Request(f"{tag}{i}", preset.messages(f"{tag}{i} {doc}."),
                           {"model": "mock", "max_tokens": 4000}))
    return out


def _ours_run(url: str, in_flight: int, n: int, tag: str, barrier=None) -> dict:
    """One client process's measurement of our pool: warm up, (wait for the others,) run ``n``."""
    llm = LLMConfig(base_url=url, model="mock", backoff_base=0.05, max_in_flight=in_flight)
    pool = new_pool(llm, in_flight)
    list(pool.stream(_requests(min(n, in_flight), "warm" + tag)))  # open connections
    if barrier is not None:
        barrier.wait()
    cpu, wall = time.process_time(), time.perf_counter()
    results = list(pool.stream(_requests(n, tag)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    pool.close()
    latencies = [r.latency for r in results if r.error is None]
    return {"n": n, "wall": wall, "cpu": cpu, "latencies": latencies,
            "failed": len(results) - len(latencies)}


def _ours_process(url, in_flight, n, tag, barrier, results) -> None:
    results.put(_ours_run(url, in_flight, n, tag, barrier))


def _ours(url: str, in_flight: int, n: int, tag: str, workers: int = 1) -> dict:
    """Our pool in ``workers`` client processes (each with ``in_flight`` slots and ``n`` requests),
    started together; figures over all of them."""
    if workers == 1:
        runs = [_ours_run(url, in_flight, n, tag)]
    else:
        ctx = multiprocessing.get_context("spawn")
        barrier, queue = ctx.Barrier(workers), ctx.Queue()
        procs = [ctx.Process(target=_ours_process, args=(url, in_flight, n, f"{tag}w{w}",
                                                         barrier, queue)) for w in range(workers)]
        for proc in procs:
            proc.start()
        runs = [queue.get() for _ in procs]
        for proc in procs:
            proc.join()
    latencies = [t for run in runs for t in run["latencies"]]
    return _figures(sum(r["n"] for r in runs), max(r["wall"] for r in runs),
                    sum(r["cpu"] for r in runs), latencies, sum(r["failed"] for r in runs),
                    workers * in_flight)


def _batch_sync(url: str, in_flight: int, n: int, tag: str, batch: int = 64) -> dict:
    """The reference's way: send a batch of rows (64, or ``in_flight`` if smaller), wait for the
    whole batch, then send the next."""
    import aiohttp

    batch = min(batch, in_flight)

    async def run():
        latencies = []
        async with aiohttp.ClientSession() as session:
            async def one(req):
                t = time.perf_counter()
                async with session.post(url + "/chat/completions",
                                        json={"messages": req.messages, **req.settings}) as resp:
                    await resp.read()
                latencies.append(time.perf_counter() - t)
            reqs = _requests(n, tag)
            for i in range(0, n, batch):
                await asyncio.gather(*(one(r) for r in reqs[i:i + batch]))
        return latencies

    cpu, wall = time.process_time(), time.perf_counter()
    lat = asyncio.run(run())
    return _figures(n, time.perf_counter() - wall, time.process_time() - cpu, lat, 0, batch)


def _openai_sdk(url: str, in_flight: int, n: int, tag: str) -> dict:
    """The openai SDK with its default (httpx) transport, the same in-flight limit."""
    import openai

    async def run():
        client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
        sem = asyncio.Semaphore(in_flight)
        latencies = []

        async def one(req):
            async with sem:
                t = time.perf_counter()
                await client.chat.completions.create(messages=req.messages, **req.settings)
                latencies.append(time.perf_counter() - t)
        await asyncio.gather(*(one(r) for r in _requests(n, tag)))
        await client.close()
        return latencies

    cpu, wall = time.process_time(), time.perf_counter()
    lat = asyncio.run(run())
    return _figures(n, time.perf_counter() - wall, time.process_time() - cpu, lat, 0, in_flight)


def _figures(n, wall, cpu, latencies, failed, in_flight) -> dict:
    mean = statistics.mean(latencies) if latencies else float("nan")
    ideal = in_flight / mean if latencies else float("nan")
    q = sorted(latencies) or [float("nan")]
    return {"requests": n, "failed": failed, "wall_s": round(wall, 3),
            "req_per_s": round(n / wall, 1), "ideal_req_per_s": round(min(ideal, 1e9), 1),
            "utilisation": round((n / wall) / ideal, 3) if latencies else None,
            "client_cpu_ms_per_req": round(1000 * cpu / n, 2),
            "p50_s": round(q[len(q) // 2], 3), "p99_s": round(q[int(len(q) * 0.99) - 1], 3)}


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for client in sorted({r["client"] for r in rows}):
        pts = [(r["in_flight"], r["req_per_s"]) for r in rows if r["client"] == client]
        line, = ax.plot(*zip(*pts), marker="o", label=client)
        if client.startswith("nemocc_dask"):
            ideal = [(r["in_flight"], r["ideal_req_per_s"]) for r in rows if r["client"] == client]
            ax.plot(*zip(*ideal), linestyle="--", color=line.get_color(), alpha=0.6,
                    label=f"ideal ({client})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("requests in flight per worker")
    ax.set_ylabel("requests/s")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_MOCK_LATENCY = {False: dict(latency=0.2, per_token_latency=0.002),  # the server
                 True: dict(latency=0.05, per_token_latency=0.0005)}  # --quick


def _levels(quick: bool) -> list[int]:
    return [16, 64] if quick else [16, 64, 256, 512, 1024]


def _ours_requests(k: int, quick: bool) -> int:
    """Requests per worker at ``k`` in flight: many rounds, so start-up and tail weigh little."""
    return 2 * k if quick else max(16 * k, 256)


def _baseline_requests(k: int, quick: bool) -> int:
    """The baselines are slow at high in-flight: fewer requests (still >= 8 rounds of 64)."""
    return 2 * k if quick else min(16 * k, 1024)


def generation(out: Path, quick: bool = False) -> dict:
    """Requests/s vs in-flight per worker for our pool in 1 and 2 worker processes, the
    batch-synchronous baseline and the openai SDK, against the same mock server process."""
    rows = []
    with MockProcess(0, max_concurrency=2048, **_MOCK_LATENCY[quick]) as server:
        for k in _levels(quick):
            n = _ours_requests(k, quick)
            ours = [{"client": f"nemocc_dask_{w}w", "in_flight": k,
                     **_ours(server.base_url, k, n, f"o{k}w{w}", workers=w)} for w in (1, 2)]
            nb = _baseline_requests(k, quick)
            batch = {"client": "batch_sync_64", "in_flight": k,
                     **_batch_sync(server.base_url, k, nb, f"b{k}")}
            for row in ours:
                row["vs_batch_sync"] = round(row["req_per_s"] / batch["req_per_s"], 2)
            rows += ours + [batch]
            if k <= 512:  # the SDK takes minutes beyond this on 2 cores
                rows.append({"client": "openai_sdk_httpx", "in_flight": k,
                             **_openai_sdk(server.base_url, k, nb, f"s{k}")})
    _plot(rows, out / "generation.png", "generation: requests/s vs in-flight")
    cols = ["client", "in_flight", "requests", "req_per_s", "ideal_req_per_s", "utilisation",
            "vs_batch_sync", "client_cpu_ms_per_req", "p50_s", "p99_s", "failed"]
    return {"rows": rows, "table": _table(rows, cols) + (
        "\n\n`in_flight` is per worker process (the 2-worker rows have twice as many in flight "
        "in total; ideal = all slots / mean latency). `vs_batch_sync`: requests/s over the "
        "batch-synchronous client's at the same in-flight.")}


def faults(out: Path, quick: bool = False) -> dict:
    """Our pool (1 worker) against a clean server and one answering 5% 429 + 2% 500: throughput
    kept and rows lost (failed after retries)."""
    runs = {}
    for label, injected in (("clean", {}), ("faulty", {"rate_429": 0.05, "rate_500": 0.02})):
        with MockProcess(0, max_concurrency=2048, **_MOCK_LATENCY[quick], **injected) as server:
            runs[label] = {k: _ours(server.base_url, k, _ours_requests(k, quick), f"{label}{k}")
                           for k in _levels(quick)}
    _plot([{"client": f"nemocc_dask_{label}", "in_flight": k, **runs[label][k]}
           for label in runs for k in _levels(quick)], out / "faults.png",
          "5% 429 + 2% 500 injected vs clean (1 worker)")
    rows = [{"in_flight": k, "clean_req_per_s": runs["clean"][k]["req_per_s"],
             "faulty_req_per_s": runs["faulty"][k]["req_per_s"],
             "throughput_kept": round(runs["faulty"][k]["req_per_s"]
                                      / runs["clean"][k]["req_per_s"], 3),
             "rows_lost": runs["faulty"][k]["failed"]} for k in _levels(quick)]
    return {"rows": rows, "table": _table(rows, list(rows[0]))}


def bench_corpus(copies: int):
    """The bundled sample repeated ``copies`` times with new ids. Every non-empty line of copy
    ``i`` ends with a marker `` [i]``, so no two copies share a document or a line: no count can
    be reused across copies (real corpora repeat few lines)."""
    import pandas as pd

    from nemocc_dask.io import SAMPLE_PATH

    sample = pd.read_parquet(SAMPLE_PATH)

    def marked(text: str, i: int) -> str:
        return "\n".join(f"{line} [{i}]" if line else line for line in text.split("\n"))

    return pd.concat([sample.assign(id=sample["id"] + i * len(sample),
                                    text=[marked(t, i) for t in sample["text"]])
                      for i in range(copies)], ignore_index=True)


def _raw_tokens(part) -> int:
    """Tokens of a partition's texts by one batched call of the fast tokenizer (the baseline)."""
    from nemocc_dask.recipe.tokenizer import load_tokenizer

    return sum(len(ids) for ids in load_tokenizer()(part["text"].tolist())["input_ids"])


def _preprocessed_rows(part) -> int:
    from nemocc_dask.recipe.stages.preprocess import preprocess_partition

    return len(preprocess_partition(part, PRESETS["diverse_qa"]))


def _best_of(fn, repeats: int = 3) -> float:
    """The shortest of ``repeats`` timed calls of ``fn()`` (seconds)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _on_workers(parts: list, workers: int) -> dict:
    """Seconds (best of 3) for the raw tokenizer and for ``preprocess`` over ``parts`` on a
    LocalCluster of ``workers`` single-threaded processes whose tokenizer runs on one thread
    (``TOKENIZERS_PARALLELISM=false``), so that workers = cores used."""
    import logging

    from distributed import Client, LocalCluster

    from nemocc_dask.recipe.tokenizer import load_tokenizer

    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited by the worker processes
    try:
        with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None,
                          silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
            client.run(load_tokenizer)
            futures = client.scatter(parts)
            return {name: _best_of(lambda fn=fn: client.gather(client.map(fn, futures, pure=False)))
                    for name, fn in (("raw", _raw_tokens), ("preprocess", _preprocessed_rows))}
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def preprocessing(out: Path, quick: bool = False) -> dict:
    """Tokens/s of ``preprocess`` vs one raw batched fast-tokenizer call on the same texts: in
    this process with per-stage times, and on 1 and 2 Dask worker processes (scaling)."""
    from nemocc_dask.recipe.stages.preprocess import PREPROCESS_STAGES, preprocess_partition
    from nemocc_dask.recipe.tokenizer import load_tokenizer

    tok = load_tokenizer()
    docs = bench_corpus(2 if quick else 20)
    texts = docs["text"].tolist()
    n_tokens = sum(len(ids) for ids in tok(texts)["input_ids"])  # also warms the BPE cache
    raw = _best_of(lambda: tok(texts))
    raw_fast = _best_of(lambda: tok.backend_tokenizer.encode_batch_fast(texts))
    stages: dict[str, float] = {}
    ours = _best_of(lambda: preprocess_partition(docs, PRESETS["diverse_qa"],
                                                 timings=stages.clear() or stages))
    rows = [{"where": "1 process (tokenizer on all cores)", "documents": len(docs), "tokens": n_tokens,
             "raw_tok_per_s": round(n_tokens / raw), "preprocess_tok_per_s": round(n_tokens / ours),
             "ratio": round(raw / ours, 3), "ratio_vs_encode_batch_fast": round(raw_fast / ours, 3)}]
    parts = [docs.iloc[i:i + 500] for i in range(0, len(docs), 500)]
    for workers in (1, 2):
        times = _on_workers(parts, workers)
        rows.append({"where": f"{workers} dask worker(s), 1 thread each", "documents": len(docs),
                     "tokens": n_tokens, "raw_tok_per_s": round(n_tokens / times["raw"]),
                     "preprocess_tok_per_s": round(n_tokens / times["preprocess"]),
                     "ratio": round(times["raw"] / times["preprocess"], 3)})
    rows[-1]["scaling_2w_over_1w"] = round(rows[-1]["preprocess_tok_per_s"]
                                           / rows[-2]["preprocess_tok_per_s"], 2)
    stage_rows = [{"stage": name, "seconds": round(stages[name], 3),
                   "share": round(stages[name] / ours, 3)} for name in PREPROCESS_STAGES]
    cols = ["where", "documents", "tokens", "raw_tok_per_s", "preprocess_tok_per_s", "ratio",
            "ratio_vs_encode_batch_fast", "scaling_2w_over_1w"]
    return {"rows": rows, "stages": stage_rows, "table": _table(rows, cols) + "\n\n" +
            _table(stage_rows, ["stage", "seconds", "share"]) + (
            "\n\nBest of 3 runs each, after a warm-up call. raw = `tokenizer(texts)` "
            "(transformers' batched call) on the documents; "
            "`ratio_vs_encode_batch_fast` compares with the Rust tokenizer's fastest batch call. "
            "preprocess encodes documents, then segments of the documents long enough (a segment "
            "equal to a whole document is not encoded again), as the reference counts segment "
            "tokens exactly; each distinct text is encoded once per partition. Stage seconds are "
            "from the 1-process run.")}


def _peak_rss_mb() -> float:
    """This process's peak resident set in MiB: ``VmHWM``, which starts at the process's own
    exec (Linux's ``ru_maxrss`` also keeps the peak of the parent a worker was forked from)."""
    import resource

    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(out: Path, quick: bool = False) -> dict:
    """Peak worker RSS for 1x and 4x the corpus (``bench_corpus``)."""
    import logging

    from distributed import Client, LocalCluster

    from nemocc_dask.run.runner import run_to_parquet
    from nemocc_dask.testing.mock import MockLLMServer

    rows = []
    for factor in (1, 4):
        path = out / f"corpus-{factor}x.parquet"  # scratch data, git-ignored
        corpus = bench_corpus(factor)
        corpus.to_parquet(path, row_group_size=50)
        with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None,
                          silence_logs=logging.WARNING) as cluster, Client(cluster) as client, \
                MockLLMServer() as server:
            llm = LLMConfig(base_url=server.base_url, model="mock", max_in_flight=64)
            run_to_parquet(path, out / f"memory-run-{factor}x", "knowledge_list", llm,
                           rows_per_partition=50, overwrite=True, show_progress=False)
            peak = max(client.run(_peak_rss_mb).values())
        rows.append({"corpus": f"{factor}x", "documents": len(corpus),
                     "peak_worker_rss_mb": round(peak, 1)})
    rows.append({"corpus": "ratio 4x/1x", "documents": "",
                 "peak_worker_rss_mb": round(rows[1]["peak_worker_rss_mb"]
                                             / rows[0]["peak_worker_rss_mb"], 3)})
    return {"rows": rows, "table": _table(rows, list(rows[0]))}
