"""Concurrency that holds on any server: ``max_in_flight="auto"`` on a real LocalCluster (1, 2 or 4
worker processes, one window per endpoint on the scheduler) against mock servers of several kinds,
each measured *at the server* (its own ``/mock/stats``):

* fixed service time with a slot cap and a FIFO queue beyond it (``--latency S
  --max-concurrency C``), with and without log-normal noise (sigma 0.3) on every answer;
* continuous batching (``--capacity C``: tokens slow down with the batch);
* the server's queue gauges on ``/metrics`` or not (latency alone);
* capacity halved mid-run (batching mock, ``POST /mock/capacity``);
* 429 on overflow instead of queueing (``--overflow 429``).

Per cell: occupancy = mean requests in service / slots over the steady part; queueing = mean queue
wait / mean service time; t90 = first time the 2-s occupancy reached 0.9; failures = rows failed
after retries. Goals: occupancy >= 0.9, queueing <= 0.25, t90 <= 30 s, no failures.

Then the coordinator's cost on the scheduler with simulated holders (100 to 1,000 pools reporting
as often as it tells them): CPU seconds per second of reports, as a fraction of one core (goal <=
2% at 1,000). Only the handler is timed (Dask's RPC transport is not).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks.suites import MockProcess, _table
from nemocc_dask.llm.config import server_root

STEADY_FROM = 0.5  # the steady part: the second half of each cell


def _drive_here(url: str, seconds: float, count: int, tag: str) -> dict:
    """Run on a worker: keep this process's pool busy for ``seconds``."""
    from benchmarks.autotune import count_answers, requests
    from nemocc_dask.llm.config import LLMConfig
    from nemocc_dask.llm.pools import get_pool

    llm = LLMConfig(base_url=url, model="mock", max_retries=20, backoff_base=0.05,
                    backoff_max=2.0)
    answers, failures = count_answers(get_pool(llm).stream(requests(count, tag)), seconds)
    return {"answers": answers, "failures": failures}


def _stats(url: str) -> dict:
    with urllib.request.urlopen(server_root(url) + "/mock/stats", timeout=10) as answer:
        return json.loads(answer.read())


class _Watcher:
    """Samples ``/mock/stats`` every 0.5 s (busy seconds, service and queue sums)."""

    def __init__(self, url: str):
        self.url, self.samples = url, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.samples.append(_stats(self.url))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _measure(samples: list[dict], steady_from: float) -> dict:
    start = samples[0]["time"]
    first = next(s for s in samples if s["time"] - start >= steady_from)
    last = samples[-1]
    span = last["time"] - first["time"]
    served = max(1, last["served"] - first["served"])
    service = (last["service_seconds"] - first["service_seconds"]) / served
    wait = (last["queue_wait_seconds"] - first["queue_wait_seconds"]) / served
    t90 = None
    for i, s in enumerate(samples):
        back = next((b for b in reversed(samples[:i]) if s["time"] - b["time"] >= 2.0), None)
        if back is not None and (s["busy_seconds"] - back["busy_seconds"]) / (
                (s["time"] - back["time"]) * s["slots"]) >= 0.9:
            t90 = s["time"] - start
            break
    return {"occupancy": round((last["busy_seconds"] - first["busy_seconds"])
                               / (span * last["slots"]), 3),
            "queueing": round(wait / max(1e-9, service), 3),
            "t90_s": None if t90 is None else round(t90, 1)}


def _post(url: str, body: dict) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()


def _cell(client, workers: int, name: str, options: dict, rate: float, seconds: float,
          halve_at: float | None = None) -> dict:
    """One server kind driven by ``workers`` worker processes for ``seconds``."""
    addresses = sorted(client.scheduler_info(n_workers=-1)["workers"])[:workers]
    with MockProcess(0, **options) as server, _Watcher(server.base_url) as watcher:
        timer = None
        if halve_at is not None:
            timer = threading.Timer(halve_at, _post, (
                server_root(server.base_url) + "/mock/capacity",
                {"capacity": options["capacity"] // 2}))
            timer.start()
        count = int(rate * seconds * 1.5 / workers) + 200
        futures = [client.submit(_drive_here, server.base_url, seconds, count,
                                 f"{name}-{i}-", workers=[address], pure=False)
                   for i, address in enumerate(addresses)]
        drove = client.gather(futures)
        if timer is not None:
            timer.join()
    steady_from = (halve_at + (seconds - halve_at) / 2) if halve_at else seconds * STEADY_FROM
    measured = _measure(watcher.samples, steady_from)
    ok = (measured["occupancy"] >= 0.9 and measured["queueing"] <= 0.25
          and (halve_at is not None or (measured["t90_s"] or 1e9) <= 30)
          and not sum(d["failures"] for d in drove))
    return {"server": name, "workers": workers, **measured,
            "answers": sum(d["answers"] for d in drove),
            "failures": sum(d["failures"] for d in drove), "goal_met": ok}


def _cells(quick: bool) -> list[tuple]:
    """(name, serve-mock options, requests/s at capacity, workers, halve_at)."""
    def fixed(slots, service, **extra):
        return {"latency": service, "per_token_latency": 0, "max_concurrency": slots, **extra}

    def batching(capacity, t0):
        return {"capacity": capacity, "per_token_latency": t0, "latency": 0}

    if quick:
        return [("fixed C=32 S=0.2 s, no /metrics", fixed(32, 0.2, no_metrics=True), 160, 2,
                 None)]
    cells = []
    for workers in (1, 2, 4):
        cells.append(("fixed C=32 S=0.2 s, no /metrics", fixed(32, 0.2, no_metrics=True), 160,
                      workers, None))
    cells += [
        ("fixed C=256 S=1 s, no /metrics", fixed(256, 1.0, no_metrics=True), 256, 2, None),
        ("fixed C=256 S=1 s, /metrics", fixed(256, 1.0), 256, 2, None),
        ("fixed C=1000 S=2 s, no /metrics", fixed(1000, 2.0, no_metrics=True), 500, 4, None),
        ("noisy C=32 S=0.2 s sigma 0.3, no /metrics",
         fixed(32, 0.2, noise_sigma=0.3, no_metrics=True), 160, 2, None),
        ("noisy C=256 S=1 s sigma 0.3, no /metrics",
         fixed(256, 1.0, noise_sigma=0.3, no_metrics=True), 256, 4, None),
        ("batching C=64, no /metrics", {**batching(64, 0.005), "no_metrics": True}, 200, 2,
         None),
        ("batching C=64, /metrics", batching(64, 0.005), 200, 2, None),
        ("429 on overflow C=32 S=0.2 s", fixed(32, 0.2, overflow="429", no_metrics=True), 160,
         2, None),
        ("429 on overflow C=256 S=1 s", fixed(256, 1.0, overflow="429", no_metrics=True), 256,
         2, None),
        ("batching C=128 halved at 30 s, no /metrics",
         {**batching(128, 0.005), "no_metrics": True}, 400, 2, 30.0),
        ("batching C=128 halved at 30 s, /metrics", batching(128, 0.005), 400, 2, 30.0),
    ]
    return cells


def _scale(holders: int, seconds_of_reports: float = 2.0) -> dict:
    """CPU the coordinator spends on ``holders`` pools reporting every report-seconds."""
    from nemocc_dask.llm.budget import BudgetPlugin
    from nemocc_dask.llm.concurrency import Tally
    from nemocc_dask.llm.coordinator import budget_setting

    plugin = BudgetPlugin()
    every = budget_setting("report-seconds")  # until the coordinator paces the holders
    names = [f"tcp://10.0.{i // 250}.{i % 250}:4000/p" for i in range(holders)]
    caps = dict.fromkeys(names, 0)
    tally = Tally()
    for _ in range(8):
        tally.add(1.0, 100)
    rounds = int(seconds_of_reports / every)
    cpu = time.process_time()
    for _ in range(rounds):
        for name in names:
            report = {"total": 4 * holders, "auto": True, "cap": caps[name],
                      "in_flight": caps[name], "demand": 8, "status": {"window": 0},
                      "sent": {"0": 2}, "answers": {"0": tally.as_list()}, "lost": {},
                      "overloads": 0, "can_poll": True}
            answer = plugin.handle(name, name.rsplit("/", 1)[0], {"http://e/v1": report})
            caps[name] = answer["endpoints"]["http://e/v1"]["cap"]
        every = answer["report_seconds"]
    cpu = time.process_time() - cpu
    return {"holders": holders, "report_every_s": every,
            "reports_per_s": round(holders / every),
            "cpu_fraction_of_one_core": round(cpu / (rounds * every), 4)}


def plot(rows: list[dict], path: Path) -> None:
    """Occupancy and queueing per cell, with the goals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['server']} ({r['workers']}w)" for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    top.bar(range(len(rows)), [r["occupancy"] for r in rows], color="tab:blue")
    top.axhline(0.9, color="black", linestyle="--", linewidth=1, label="goal >= 0.9")
    top.set_ylabel("requests in service / slots")
    top.set_ylim(0, 1.05)
    top.legend(fontsize=7, loc="lower right")
    top.set_title("max_in_flight='auto' at the server, per server kind")
    bottom.bar(range(len(rows)), [r["queueing"] for r in rows], color="tab:orange")
    bottom.axhline(0.25, color="black", linestyle="--", linewidth=1, label="goal <= 0.25")
    bottom.set_ylabel("queue wait / service time")
    bottom.legend(fontsize=7, loc="upper right")
    bottom.set_xticks(range(len(rows)))
    bottom.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def concurrency(out: Path, quick: bool = False) -> dict:
    from distributed import Client, LocalCluster

    seconds = 25.0 if quick else 60.0
    rows = []
    with LocalCluster(n_workers=4 if not quick else 2, threads_per_worker=2,
                      dashboard_address=None, host="127.0.0.1") as cluster, \
            Client(cluster) as client:
        for name, options, rate, workers, halve_at in _cells(quick):
            row = _cell(client, workers, name, options, rate, seconds, halve_at)
            rows.append(row)
            print(row, flush=True)
    plot(rows, out / "concurrency.png")
    scale = [_scale(n) for n in ((100, 1000) if quick else (100, 500, 1000))]
    print(scale, flush=True)
    table = _table(rows, ["server", "workers", "occupancy", "queueing", "t90_s", "answers",
                          "failures", "goal_met"])
    table += (f"\n\nEach cell {seconds:.0f} s on a LocalCluster (the workers' pools share one "
              "window per endpoint on the scheduler); measured at the mock server over the "
              "second half (after the halving: the last half of what follows it). `occupancy` = "
              "mean requests in service / slots; `queueing` = mean wait for a slot / mean "
              "service time; `t90_s` = first time the 2-s occupancy reached 0.9. Goals: >= 0.9, "
              "<= 0.25, <= 30 s, no failures. Plot: concurrency.png.\n\n")
    table += _table(scale, ["holders", "report_every_s", "reports_per_s",
                            "cpu_fraction_of_one_core"])
    table += ("\n\nThe coordinator's handler with simulated holders, each reporting as often as "
              "the coordinator tells it (nemocc.budget.report-seconds, less often beyond "
              "1,000 reports/s in all), with answers to merge; goal <= 0.02 of one core at "
              "1,000 holders. Dask's RPC cost per message is not included.")
    return {"rows": rows, "scale": scale, "table": table}
