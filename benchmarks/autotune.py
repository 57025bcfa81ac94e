"""Self-tuning concurrency: ``max_in_flight="auto"`` against a continuous-batching mock (its own
process: ``serve-mock --capacity C``), next to fixed windows of 64 (the old default) and 4096
(what a user sets to be safe), all in one run.

Per capacity C: steady token throughput / the mock's maximum (C sequences decoding), mean queueing
delay at the mock / the unloaded latency of a request, and the time until the throughput first
reaches 90% of the maximum; with the /metrics queue signal and with latency alone. Then a mock
whose capacity drops from 512 to 128 mid-run (seconds until our in-flight is back under 1.25x the
new capacity, and failed requests), and two endpoints, one twice as fast (share of answers).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.cluster import Sampler
from benchmarks.suites import MockProcess, _table, bench_corpus
from nemocc_dask.llm.config import LLMConfig, server_root
from nemocc_dask.llm.pool import Request
from nemocc_dask.llm.pools import new_pool
from nemocc_dask.recipe.presets import PRESETS

WINDOW_SECONDS = 2.0  # throughput is measured over sliding windows this long


def requests(n: int, tag: str) -> list[Request]:
    """Knowledge-list prompts whose mock answers are about 50 tokens."""
    preset = PRESETS["knowledge_list"]
    sentence = "The river {i} carries water past the town and the fields. "
    return [Request(f"{tag}{i}", preset.messages(sentence.format(i=i) * (3 + i % 3)),
                    {"model": "mock", "max_tokens": 600}) for i in range(n)]


def count_answers(stream, seconds: float) -> tuple[int, int]:
    """(answers, failures) read from a pool's ``stream`` for ``seconds``; then it is closed."""
    answers = failures = 0
    deadline = time.monotonic() + seconds
    try:
        for result in stream:
            answers += result.error is None
            failures += result.error is not None
            if time.monotonic() >= deadline:
                break
    finally:
        stream.close()
    return answers, failures


def _drive(urls: list[str], max_in_flight, seconds: float, rate: float) -> dict:
    """Keep our pool busy against ``urls`` for ``seconds``; count answers and failures."""
    llm = LLMConfig(base_url=urls, model="mock", max_in_flight=max_in_flight)
    pool = new_pool(llm, llm.in_flight_total)
    try:
        answers, failures = count_answers(
            pool.stream(requests(int(rate * seconds * 1.3) + 2000, "r")), seconds)
    finally:
        windows = [e.window for e in pool.endpoints]
        pool.close()
    return {"answers": answers, "failures": failures, "windows": windows}


def _rates(stats: list[tuple[float, dict]]) -> list[tuple[float, float]]:
    """(time since start, decoded tokens/s over the last WINDOW_SECONDS)."""
    start, out, j = stats[0][0], [], 0
    for t, sample in stats:
        while stats[j + 1][0] <= t - WINDOW_SECONDS:  # the last sample WINDOW_SECONDS back
            j += 1
        if t - stats[j][0] >= WINDOW_SECONDS:
            out.append((t - start, (sample["decoded_tokens"] - stats[j][1]["decoded_tokens"])
                        / (t - stats[j][0])))
    return out


def _steady(stats: list[tuple[float, dict]], from_s: float) -> dict:
    """Throughput, queueing delay and answer length between ``from_s`` and the end."""
    start = stats[0][0]
    first = next(s for t, s in stats if t - start >= from_s)
    t_first = next(t for t, s in stats if t - start >= from_s)
    t_last, last = stats[-1]
    admitted = max(1, last["admitted"] - first["admitted"])
    return {"tokens_per_s": (last["decoded_tokens"] - first["decoded_tokens"]) / (t_last - t_first),
            "queue_wait": (last["queue_wait_total"] - first["queue_wait_total"]) / admitted,
            "tokens_per_answer": (last["decoded_tokens"] - first["decoded_tokens"]) / admitted}


def _capacity_run(capacity: int, t0: float, policy, metrics: bool, seconds: float) -> dict:
    options = {"capacity": capacity, "per_token_latency": t0, "latency": 0}
    if not metrics:
        options["no_metrics"] = True
    with MockProcess(0, **options) as server, Sampler(server.base_url, every=0.25) as sampler:
        ideal = capacity / (t0 * 2)  # tokens/s with C decoding (knee = C)
        drove = _drive([server.base_url], policy, seconds, ideal / 50)
    steady = _steady(sampler.stats, seconds * 0.5)
    unloaded = steady["tokens_per_answer"] * t0 * (1 + 1 / capacity)
    t90 = next((t for t, rate in _rates(sampler.stats) if rate >= 0.9 * ideal), None)
    return {"capacity": capacity, "policy": str(policy),
            "signal": ("metrics" if metrics else "latency") if policy == "auto" else "-",
            "window": drove["windows"][0],
            "throughput_over_max": round(steady["tokens_per_s"] / ideal, 3),
            "queue_over_unloaded": round(steady["queue_wait"] / unloaded, 3),
            "t90_s": None if t90 is None else round(t90, 1),
            "failures": drove["failures"]}


def _post(url: str, body: dict) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()


def _drop_run(metrics: bool, seconds: float, drop_at: float) -> dict:
    import threading

    options = {"capacity": 512, "per_token_latency": 0.01, "latency": 0}
    if not metrics:
        options["no_metrics"] = True
    with MockProcess(0, **options) as server, Sampler(server.base_url, every=0.1) as sampler:
        timer = threading.Timer(drop_at, _post, (server_root(server.base_url) + "/mock/capacity",
                                                 {"capacity": 128}))
        timer.start()
        drove = _drive([server.base_url], "auto", seconds, 512 / 1.0)
        timer.join()
    start = sampler.stats[0][0]
    after = [(t - start - drop_at, s["in_flight"]) for t, s in sampler.stats
             if t - start >= drop_at]
    under = next((t for i, (t, n) in enumerate(after)
                  if all(m <= 1.25 * 128 for _, m in after[i:i + 10])), None)
    return {"signal": "metrics" if metrics else "latency",
            "seconds_to_under_1.25x": None if under is None else round(under, 1),
            "failures": drove["failures"], "window_after": drove["windows"][0]}


def _two_speeds(seconds: float) -> dict:
    with MockProcess(0, capacity=64, per_token_latency=0.005, latency=0) as fast, \
            MockProcess(0, capacity=64, per_token_latency=0.01, latency=0) as slow, \
            Sampler(fast.base_url, every=1.0) as fast_s, \
            Sampler(slow.base_url, every=1.0) as slow_s:
        drove = _drive([fast.base_url, slow.base_url], "auto", seconds, 400)
    fast_n, slow_n = fast_s.stats[-1][1]["completed"], slow_s.stats[-1][1]["completed"]
    return {"fast_answers": fast_n, "slow_answers": slow_n,
            "fast_over_slow": round(fast_n / max(1, slow_n), 2), "windows": drove["windows"]}


def cli_series(out: Path, copies: int, capacity: int = 128) -> dict:
    """A whole CLI run with the default ``--max-in-flight auto`` (2 workers); plots the report's
    per-endpoint series (window, requests/s, latency p50/p95) to ``autotune_series.png``."""
    with tempfile.TemporaryDirectory() as tmp, \
            MockProcess(0, capacity=capacity, per_token_latency=0.01, latency=0) as server:
        docs = Path(tmp) / "corpus.parquet"
        bench_corpus(copies).to_parquet(docs)
        subprocess.run([sys.executable, "-m", "nemocc_dask.cli", "run", "--task", "diverse_qa",
                        "--input", str(docs), "--output", str(Path(tmp) / "out"), "--base-url",
                        server.base_url, "--model", "mock", "--workers", "2", "--no-progress",
                        "--rows-per-partition", "100"], check=True, capture_output=True,
                       timeout=3600)
        report = json.loads((Path(tmp) / "out" / "report.json").read_text())
    series = report["endpoint_series"][server.base_url]
    plot_series(series, out / "autotune_series.png",
                f"CLI run, --max-in-flight auto, mock capacity {capacity}, 2 workers")
    return {"requests": report["requests"], "intervals": len(series),
            "last_window": series[-2]["window"] if len(series) > 1 else series[-1]["window"]}


def plot_series(series: list[dict], path: Path, title: str) -> None:
    """report.json's ``endpoint_series`` of one endpoint: window and req/s, latency p50/p95."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [i["t"] - series[0]["t"] for i in series]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.step(t, [i["window"] for i in series], where="post", label="window (all workers)")
    top.plot(t, [i["req_per_s"] for i in series], marker=".", label="requests/s")
    top.legend(fontsize=7)
    top.set_title(title)
    for name in ("latency_p50", "latency_p95"):
        bottom.plot(t, [i[name] for i in series], marker=".", label=name.replace("_", " "))
    bottom.set_ylabel("seconds")
    bottom.set_xlabel("seconds since the first interval")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def autotune(out: Path, quick: bool = False) -> dict:
    seconds = 12.0 if quick else 45.0
    capacities = [(32, 0.01)] if quick else [(32, 0.01), (256, 0.01), (1024, 0.02)]
    rows = []
    for capacity, t0 in capacities:
        runs = [("auto", True), ("auto", False), (64, True)] + ([] if quick else [(4096, True)])
        for policy, metrics in runs:
            row = _capacity_run(capacity, t0, policy, metrics, seconds)
            rows.append(row)
            print(row, flush=True)
    cols = ["capacity", "policy", "signal", "window", "throughput_over_max",
            "queue_over_unloaded", "t90_s", "failures"]
    table = _table(rows, cols) + (
        f"\n\nEach run {seconds:.0f} s; steady = its second half. `throughput_over_max`: decoded "
        "tokens/s at the mock / its maximum (C sequences at t0 x 2 per token, knee = C); "
        "`queue_over_unloaded`: mean seconds a request waited in the mock's queue / one request's "
        "latency alone; `t90_s`: first time the 2-s throughput reached 90% of the maximum. "
        "Goals: >= 0.95, <= 0.25, <= 30 s.")
    series = cli_series(out, 1 if quick else 8)
    table += (f"\n\nCLI run with the default (auto): {series['requests']} requests, window "
              f"{series['last_window']} at the end (mock capacity 128); its report's series is "
              "plotted in autotune_series.png.")
    extra: dict = {"cli_series": series}
    if not quick:
        drops = [_drop_run(metrics, 50.0, 30.0) for metrics in (True, False)]
        speeds = _two_speeds(30.0)
        print(drops, speeds, flush=True)
        table += ("\n\nCapacity 512 -> 128 at 30 s, once settled (goal: back under 1.25x "
                  "within 10 s, no failures):\n\n" + _table(drops, list(drops[0])))
        table += ("\n\nTwo endpoints, capacity 64 each, one twice as fast per token (goal: the "
                  "fast one serves about twice the answers):\n\n" + _table([speeds], list(speeds)))
        extra.update(drops=drops, two_speeds=speeds)
    return {"rows": rows, **extra, "table": table}
