"""The benchmark suites. The mock server runs in a separate process so that the client CPU
measured here (``time.process_time`` of this process) is the client's alone.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.llm.pool import Request, new_pool
from nemocc_dask.presets import PRESETS


class MockProcess:
    """``nemocc-dask serve-mock`` in a subprocess."""

    def __init__(self, port: int, **options):
        args = [sys.executable, "-m", "nemocc_dask.cli", "serve-mock", "--port", str(port)]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
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


def _ours(url: str, in_flight: int, n: int, tag: str) -> dict:
    llm = LLMConfig(base_url=url, model="mock", backoff_base=0.05)
    pool = new_pool(llm, in_flight)
    list(pool.stream(_requests(min(n, in_flight), "warm" + tag)))  # open connections
    cpu, wall = time.process_time(), time.perf_counter()
    results = list(pool.stream(_requests(n, tag)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    pool.close()
    ok = [r for r in results if r.error is None]
    return _figures(n, wall, cpu, [r.latency for r in ok], len(results) - len(ok), in_flight)


def _batch_sync(url: str, in_flight: int, n: int, tag: str, batch: int = 64) -> dict:
    """The reference's way: gather a batch of 64 rows, wait for all, then the next batch."""
    import aiohttp

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

    fig, ax = plt.subplots(figsize=(6, 4))
    for client in sorted({r["client"] for r in rows}):
        pts = [(r["in_flight"], r["req_per_s"]) for r in rows if r["client"] == client]
        ax.plot(*zip(*pts), marker="o", label=client)
    ideal = [(r["in_flight"], r["ideal_req_per_s"]) for r in rows if r["client"] == "nemocc_dask"]
    ax.plot(*zip(*ideal), linestyle="--", color="grey", label="ideal (ours)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests in flight")
    ax.set_ylabel("requests/s")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def generation(out: Path, quick: bool = False, faults: dict | None = None) -> dict:
    """Requests/s vs in-flight for our pool, the batch-of-64 baseline and the openai SDK (1 worker
    process; the 2-worker figures are not measured yet)."""
    levels = [16, 64] if quick else [16, 64, 256, 512, 1024]
    latency = dict(latency=0.05, per_token_latency=0.0005) if quick else \
        dict(latency=0.2, per_token_latency=0.002)
    rows = []
    with MockProcess(0, max_concurrency=2048, **latency,
                     **(faults or {})) as server:
        for k in levels:
            n = max(4 * k, 128) if not quick else 2 * k
            row = {"client": "nemocc_dask", "in_flight": k, **_ours(server.base_url, k, n, f"o{k}")}
            rows.append(row)
            if faults:
                continue
            rows.append({"client": "batch_sync_64", "in_flight": k,
                         **_batch_sync(server.base_url, k, n, f"b{k}")})
            if k <= 512:
                rows.append({"client": "openai_sdk_httpx", "in_flight": k,
                             **_openai_sdk(server.base_url, k, 2 * k, f"s{k}")})
    name = "faults" if faults else "generation"
    _plot(rows, out / f"{name}.png", f"{name}: requests/s vs in-flight")
    cols = ["client", "in_flight", "req_per_s", "ideal_req_per_s", "utilisation",
            "client_cpu_ms_per_req", "p50_s", "p99_s", "failed"]
    return {"rows": rows, "table": _table(rows, cols)}


def faults(out: Path, quick: bool = False) -> dict:
    """Generation with 5% 429 + 2% 500 injected: throughput kept vs a clean run, rows lost."""
    clean = generation(out, quick)["rows"]
    faulty = generation(out, quick, faults={"rate_429": 0.05, "rate_500": 0.02})["rows"]
    rows = []
    for f in faulty:
        c = next(r for r in clean if r["client"] == "nemocc_dask" and r["in_flight"] == f["in_flight"])
        rows.append({"in_flight": f["in_flight"], "clean_req_per_s": c["req_per_s"],
                     "faulty_req_per_s": f["req_per_s"],
                     "throughput_kept": round(f["req_per_s"] / c["req_per_s"], 3),
                     "rows_lost": f["failed"]})
    return {"rows": rows, "table": _table(rows, list(rows[0]))}


def preprocessing(out: Path, quick: bool = False) -> dict:
    """Tokens/s of ``preprocess`` vs one raw batched fast-tokenizer call on the same texts."""
    import pandas as pd

    from nemocc_dask.io import SAMPLE_PATH
    from nemocc_dask.stages.preprocess import preprocess_partition
    from nemocc_dask.tokenizer import load_tokenizer

    tok = load_tokenizer()
    sample = pd.read_parquet(SAMPLE_PATH)
    reps = 2 if quick else 20
    docs = pd.concat([sample.assign(id=sample["id"] + i * len(sample)) for i in range(reps)],
                     ignore_index=True)
    texts = docs["text"].tolist()
    t = time.perf_counter()
    n_tokens = sum(len(ids) for ids in tok(texts)["input_ids"])
    raw = time.perf_counter() - t
    t = time.perf_counter()
    preprocess_partition(docs, PRESETS["diverse_qa"])
    ours = time.perf_counter() - t
    row = {"documents": len(docs), "tokens": n_tokens,
           "raw_tokenizer_tok_per_s": round(n_tokens / raw), "preprocess_tok_per_s":
           round(n_tokens / ours), "ratio": round(raw / ours, 3)}
    return {"rows": [row], "table": _table([row], list(row)) +
            "\n\npreprocess tokenizes each text twice (documents, then segments), so the ideal ratio "
            "is about 0.5; 1 worker process."}


def memory(out: Path, quick: bool = False) -> dict:
    """Peak worker RSS for 1x and 4x the corpus (sample repeated with new ids)."""
    import logging

    import pandas as pd
    from distributed import Client, LocalCluster

    from nemocc_dask.io import SAMPLE_PATH
    from nemocc_dask.llm.mock import MockLLMServer
    from nemocc_dask.runner import run_to_parquet

    sample = pd.read_parquet(SAMPLE_PATH)
    rows = []
    for factor in (1, 4):
        path = out / f"corpus-{factor}x.parquet"  # scratch data, git-ignored
        pd.concat([sample.assign(id=sample["id"] + i * len(sample)) for i in range(factor)],
                  ignore_index=True).to_parquet(path, row_group_size=50)
        with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None,
                          silence_logs=logging.WARNING) as cluster, Client(cluster) as client, \
                MockLLMServer() as server:
            llm = LLMConfig(base_url=server.base_url, model="mock", max_in_flight=64)
            run_to_parquet(path, out / f"memory-run-{factor}x", "knowledge_list", llm,
                           rows_per_partition=50, overwrite=True, show_progress=False)
            peak = max(client.run(lambda: __import__("resource").getrusage(
                __import__("resource").RUSAGE_SELF).ru_maxrss).values())
        rows.append({"corpus": f"{factor}x", "documents": factor * len(sample),
                     "peak_worker_rss_mb": round(peak / 1024, 1)})
    rows.append({"corpus": "ratio 4x/1x", "documents": "",
                 "peak_worker_rss_mb": round(rows[1]["peak_worker_rss_mb"]
                                             / rows[0]["peak_worker_rss_mb"], 3)})
    return {"rows": rows, "table": _table(rows, list(rows[0]))}
