"""Live metrics (issue 26 item 2): while a run goes, its figures are served in the Prometheus text
format on 127.0.0.1 (``--metrics-port``), read here with prometheus_client's own parser; the
progress line gains an ETA."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nemocc_dask.testing import MockLLMServer

from conftest import make_docs


def _scrape(url: str) -> dict[tuple, float]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.mark.slow
def test_a_run_serves_its_live_figures_for_prometheus(tmp_path):
    make_docs(60).to_parquet(tmp_path / "docs.parquet")
    with MockLLMServer(latency=0.2) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nemocc_dask.cli", "run", "--task", "knowledge_list",
             "--input", str(tmp_path / "docs.parquet"), "--output", str(tmp_path / "out"),
             "--base-url", server.base_url, "--model", "mock", "--workers", "1",
             "--rows-per-partition", "10", "--max-in-flight", "4", "--no-progress",
             "--metrics-port", "0"], stderr=subprocess.PIPE, text=True)
        url = None
        for line in proc.stderr:  # the URL is said at start
            found = re.search(r"live metrics \(Prometheus\): (\S+)", line)
            if found:
                url = found.group(1)
                break
        assert url and url.startswith("http://127.0.0.1:")
        samples, deadline = {}, time.monotonic() + 120
        while time.monotonic() < deadline:  # until a partition finished: the ETA is known
            samples = _scrape(url)
            if samples.get(("nemocc_partitions_done", ())) and samples.get(
                    ("nemocc_endpoint_window", (("endpoint", server.base_url),))):
                break
            time.sleep(0.5)
        answered = server.stats.completed
        rest = proc.stderr.read()
        proc.wait(timeout=300)
    assert proc.returncode == 0, rest[-2000:]
    assert samples[("nemocc_partitions", ())] == 6
    assert 1 <= samples[("nemocc_partitions_done", ())] <= 6
    assert 0 < samples[("nemocc_answers", ())] <= answered
    assert samples[("nemocc_errors", ())] == 0 and samples[("nemocc_completion_tokens", ())] > 0
    assert samples[("nemocc_eta_seconds", ())] >= 0
    assert samples[("nemocc_endpoint_window", (("endpoint", server.base_url),))] == 4
    assert ("nemocc_endpoint_in_flight", (("endpoint", server.base_url),)) in samples
    with pytest.raises(OSError):  # served only while the run goes
        _scrape(url)


def test_the_progress_line_says_the_eta_once_a_partition_finished(tmp_path):
    from nemocc_dask.run.progress import Progress

    progress = Progress([tmp_path], 4, enabled=False)
    assert "ETA" not in progress.line() and progress.snapshot()["eta_seconds"] is None
    progress._started -= 60  # a minute in, one of four partitions done: about 3 minutes left
    progress.finished(tmp_path, {"partition": 0, "requests": 5, "failed_requests": 0,
                                 "completion_tokens": 100})
    assert re.search(r"\| ETA 3 min", progress.line())
    assert 170 <= progress.snapshot()["eta_seconds"] <= 190


@pytest.mark.slow
def test_the_last_scrape_matches_the_report(tmp_path):
    """With failures and retries: a scrape after the last partition (the metrics linger for
    it) has report.json's answers, errors and retries by class and tokens; the latency
    histogram and quantiles come from the answers seen."""
    import json
    import os

    make_docs(40).to_parquet(tmp_path / "docs.parquet")
    env = dict(os.environ, DASK_NEMOCC__METRICS_LINGER_SECONDS="4")
    with MockLLMServer(latency=0.1, rate_500=0.3) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nemocc_dask.cli", "run", "--task", "knowledge_list",
             "--input", str(tmp_path / "docs.parquet"), "--output", str(tmp_path / "out"),
             "--base-url", server.base_url, "--model", "mock", "--workers", "1",
             "--rows-per-partition", "10", "--max-in-flight", "4", "--max-retries", "1",
             "--no-progress", "--metrics-port", "0"], stderr=subprocess.PIPE, text=True,
            env=env)
        url = next(found.group(1) for line in proc.stderr
                   if (found := re.search(r"live metrics \(Prometheus\): (\S+)", line)))
        last = {}
        while proc.poll() is None:
            try:
                last = _scrape(url)
            except OSError:
                break
            time.sleep(0.3)
        rest = proc.stderr.read()
        proc.wait(timeout=300)
    assert proc.returncode == 0, rest[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["failed_requests"] > 0 and report["retries"] > 0  # the case is exercised
    assert last[("nemocc_partitions_done", ())] == 4
    assert last[("nemocc_answers", ())] == report["requests"]
    assert last[("nemocc_errors", ())] == report["failed_requests"]
    assert last[("nemocc_completion_tokens", ())] == report["completion_tokens"]
    assert last[("nemocc_retries", ())] == report["retries"]
    for name, key in (("nemocc_errors_by_class", "failed_by_class"),
                      ("nemocc_retries_by_class", "retries_by_class")):
        got = {dict(labels)["class"]: value for (metric, labels), value in last.items()
               if metric == name}
        assert got == report[key]
    count = last[("nemocc_answer_latency_seconds_count", ())]
    assert 0 < count <= report["requests"] - report["failed_requests"]
    median = last[("nemocc_answer_latency_quantile_seconds", (("quantile", "0.5"),))]
    assert 0.1 <= median <= 2.0  # the mock answers in 0.1 s plus its per-token time
