"""How close ``plan`` comes to the run it plans (issue 26): for several kinds of server (a fixed
service time, decode time per token, a slot cap with a queue and noisy service, 429s on overflow),
``plan`` from a sample of the input on one LocalCluster, then the run of the same command on a
fresh one (as two commands would), into the same folder. Reported: projected over real wall time,
and the real requests against the projected interval. Goal: wall time within 25%."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.suites import _table
from nemocc_dask import LLMConfig, run_to_parquet
from nemocc_dask.run.plan import plan
from nemocc_dask.testing.mock import MockLLMServer

SERVERS = {
    "fixed 0.2 s": dict(latency=0.2, per_token_latency=0.0),
    "decode 0.5 ms/token": dict(latency=0.05, per_token_latency=0.0005),
    "32 slots, queue, noise": dict(latency=0.05, per_token_latency=0.0005, capacity=32,
                                   noise_sigma=0.3),
    "64 slots, 429 on overflow": dict(latency=0.05, per_token_latency=0.0003, capacity=64,
                                      overflow="429"),
}


def _corpus(path: Path, documents: int) -> None:
    import pandas as pd

    sentence = ("The river delta supports {k} species of birds, and its wetlands filter water "
                "for the towns downstream during the dry season. ")
    texts = ["\n".join(sentence.format(k=i + p) * 3 for p in range(1 + i % 7))
             for i in range(documents)]
    pd.DataFrame({"id": range(documents), "text": texts}).to_parquet(path)


def _cluster():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
    return cluster, Client(cluster)


def plan_accuracy(out: Path, quick: bool = False) -> dict:
    """Plan, then run, per server kind; projected vs real wall time and requests."""
    documents, per_partition, sample = (1200, 200, 400) if quick else (4000, 500, 1000)
    servers = dict(list(SERVERS.items())[:1]) if quick else SERVERS
    rows = []
    for label, options in servers.items():
        with tempfile.TemporaryDirectory() as tmp, MockLLMServer(**options) as server:
            path, folder = Path(tmp) / "docs.parquet", Path(tmp) / "out"
            _corpus(path, documents)
            llm = LLMConfig(base_url=server.base_url, model="mock")
            cluster, client = _cluster()
            with cluster, client:
                planned = plan(path, folder, "knowledge_list", llm, tokenizer="bundled",
                               rows_per_partition=per_partition, sample_documents=sample)
            cluster, client = _cluster()
            with cluster, client:
                started = time.perf_counter()
                report = run_to_parquet(path, folder, "knowledge_list", llm,
                                        tokenizer="bundled", rows_per_partition=per_partition,
                                        show_progress=False)
                wall = time.perf_counter() - started
        task = planned["tasks"]["knowledge_list"]
        low, high = task["requests_interval"]
        rows.append({"server": label, "documents": documents,
                     "requests": report["requests"], "projected": task["requests"],
                     "in_interval": low <= report["requests"] <= high,
                     "probe_answers": report["plan_answers"],
                     "projected_wall_s": planned["total"]["wall_seconds"],
                     "run_wall_s": round(wall, 2),
                     "projected_over_real": round(planned["total"]["wall_seconds"] / wall, 3)})
        print(rows[-1], flush=True)
    return {"rows": rows, "table": _table(rows, list(rows[0])) + (
        f"\n\n`projected_over_real`: the plan's wall time over the run's, measured in one "
        f"session; the plan counted about {sample} of the {documents} documents and probed "
        "the server, then the run (a fresh LocalCluster of 2 workers x 1 thread, as a second "
        "command would have) reused the probe's answers. Goal: within 0.75-1.25. The mock "
        "server shares this machine's 2 cores with the workers.")}
