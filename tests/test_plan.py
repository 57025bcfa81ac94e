"""``nemocc-dask plan``: its counts are the run's (exactly with --exact, within the stated interval
from a sample), its probe is reused by the run (nothing paid twice), and its arithmetic holds.
How close the projected wall time comes is measured in benchmarks/plan.py, not asserted here."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from conftest import make_docs

from nemocc_dask import LLMConfig, MockLLMServer
from nemocc_dask.run.plan import sample_partitions, spread
from nemocc_dask.run.projection import (answer_rate, run_projection,
                                        task_projection)


def varied_corpus(n: int) -> pd.DataFrame:
    """Documents of 1 to 9 paragraphs, and every 13th one too short for any task, so that
    requests differ from documents and from partition to partition."""
    frames = [make_docs(1, paragraphs=1 + (i * 5) % 9, start=i) for i in range(n)]
    docs = pd.concat(frames, ignore_index=True)
    docs.loc[docs.index % 13 == 0, "text"] = "Too short."
    return docs


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemocc_dask.cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_spread_and_sample_are_even_and_deterministic():
    assert spread(10, 3) == [0, 4, 9] and spread(3, 5) == [0, 1, 2] and spread(7, 1) == [0]
    assert sample_partitions(10, 1000, None) == list(range(10))
    assert sample_partitions(10, 1000, 250) == spread(10, 3)
    assert sample_partitions(10, 1000, 250) == sample_partitions(10, 1000, 250)


def _count(rows, documents, requests, sumsq, tokens=100):
    return {"input_rows": rows, "documents": documents, "segments": requests,
            "requests": requests, "prompt_tokens": tokens, "answered": 0,
            "max_prompt_tokens": 50, "not_sent": {}, "preprocess_seconds": 1.0,
            "requests_per_document": [requests, sumsq]}


def test_projection_scales_a_sample_and_is_exact_on_everything():
    counts = [_count(100, 100, 150, 250), _count(100, 100, 250, 700)]
    whole = task_projection(counts, [], 200, 512, 1000, None)
    assert whole["requests"] == 400 and whole["requests_interval"] == [400, 400]
    sampled = task_projection(counts, [], 2000, 512, 1000, None)
    low, high = sampled["requests_interval"]
    assert sampled["requests"] == 4000 and low < 4000 < high
    assert task_projection(counts, [], 200, 512, 1000, 1024)["context"]["fits"] is False


def test_answer_rate_counts_from_the_first_request_on_the_wire():
    probes = [{"answer_times": [11.0, 12.0, 13.0], "first_sent": 10.0, "sent_at": 8.0,
               "rows_sent": 3, "postprocess_seconds": 0.0}]
    assert answer_rate(probes) == pytest.approx(1.0)
    probes[0]["round"] = 0
    tasks = {"t": {"requests": 1000, "requests_to_send": 1000, "prompt_tokens": 10**6,
                   "completion_tokens": 2 * 10**6, "rows_expected": 900, "output_bytes": 1}}
    total = run_projection(tasks, [_count(10, 10, 10, 10)], probes, total_rows=10,
                           partitions=1, slots=1, startup_seconds=0.0, endpoints_probed=1,
                           endpoints=4, gpus_per_endpoint=2, price_input=1.0, price_output=2.0)
    assert total["cost"] == 5.0  # 1 M prompt tokens at 1 + 2 M completion tokens at 2
    # 1000 answers at 1/s on one endpoint, 4 endpoints: 250 s, + 2 s pools + 1 s CPU
    assert total["wall_seconds"] == pytest.approx(253.0)
    assert total["gpu_hours"] == pytest.approx(253.0 / 3600 * 4 * 2, abs=1e-3)


@pytest.mark.slow
def test_plan_then_run_from_the_command_line(tmp_path):
    """A user plans, then runs the same command: the exact plan's requests are the run's, the
    probe's answers are reused (the server sees each request once), the rows expected and the
    completion tokens are near what the run wrote."""
    varied_corpus(600).to_parquet(tmp_path / "docs.parquet")
    out = tmp_path / "out"
    with MockLLMServer(latency=0.05, per_token_latency=0.0002, noise_sigma=0.2) as server:
        common = ["--task", "knowledge_list", "--input", str(tmp_path / "docs.parquet"),
                  "--output", str(out), "--base-url", server.base_url, "--model", "mock",
                  "--rows-per-partition", "100", "--workers", "2", "--tokenizer", "bundled"]
        planned = cli("plan", *common, "--exact", "--probe-requests", "60",
                      "--price-input", "0.1", "--price-output", "0.4")
        assert planned.returncode == 0, planned.stderr
        assert "requests" in planned.stdout and "GPU-hours" in planned.stdout
        plan = json.loads((out / "plan.json").read_text())
        probe_answers = server.stats.requests
        task = plan["tasks"]["knowledge_list"]
        assert probe_answers == task["probe"]["answers"] == task["requests_answered"] > 0
        ran = cli("run", *common, "--no-progress")
        assert ran.returncode == 0, ran.stderr
        report = json.loads((out / "report.json").read_text())
        assert server.stats.requests == report["requests"]  # nothing sent twice
    assert task["requests"] == report["requests"] and task["requests_interval"][0] == \
        task["requests_interval"][1]
    assert report["plan_answers"] == probe_answers and report["reused_answers"] == 0
    assert report["this_run"]["requests"] == report["requests"] - probe_answers
    # the run's tokenizer counts the prompts' text; the server's usage adds its chat template
    assert 0.75 * report["prompt_tokens"] <= task["prompt_tokens"] <= report["prompt_tokens"]
    assert task["documents"] == report["documents_in"] and plan["input"]["exact"]
    low, high = task["completion_tokens_interval"]
    assert low <= report["completion_tokens"] <= high
    assert abs(task["rows_expected"] - report["rows_written"]) <= 0.1 * report["rows_written"]
    assert plan["total"]["cost"] == pytest.approx(
        task["prompt_tokens"] / 1e6 * 0.1 + task["completion_tokens"] / 1e6 * 0.4, abs=0.01)
    # issue 26 item 4: the run's ledger takes the plan's prices
    spent = report["ledger"]["cumulative"]
    assert spent["cost"] == pytest.approx(report["prompt_tokens"] / 1e6 * 0.1
                                          + report["completion_tokens"] / 1e6 * 0.4, abs=1e-3)
    assert spent["gpu_hours"] == pytest.approx(report["wall_seconds"] / 3600, abs=1e-4)


def test_ledger_prices_from_dask_config_win_over_the_plan():
    import dask

    from nemocc_dask.run.ledger import ledger

    report = {"this_run": {"prompt_tokens": 2_000_000, "completion_tokens": 1_000_000,
                           "wall_seconds": 3600.0}}
    report["runs"] = [dict(report["this_run"], prompt_tokens=1_000_000), report["this_run"]]
    plan = {"settings": {"price_input": 1.0, "price_output": 1.0, "gpus_per_endpoint": 8}}
    assert ledger(report, 2, plan)["this_run"] == {
        "prompt_tokens": 2_000_000, "completion_tokens": 1_000_000, "wall_seconds": 3600.0,
        "endpoints": 2, "gpu_hours": 16.0, "cost": 3.0}
    with dask.config.set({"nemocc.ledger.price-output": 10.0}):
        entry = ledger(report, 2, plan)["cumulative"]
    assert entry["cost"] == 3.0 + 20.0 and entry["gpu_hours"] == 32.0
    assert ledger(report, 1, None)["this_run"]["cost"] is None


@pytest.mark.slow
def test_a_sampled_plan_of_the_pipeline_brackets_each_task(tmp_path):
    """The five-task pipeline planned from a third of the input: each task's interval holds the
    requests its run sends; planned into one folder, run into another (no probe reuse)."""
    from distributed import Client, LocalCluster

    from nemocc_dask.run.nemotron_cc import run_nemotron_cc_to_parquet
    from nemocc_dask.run.plan import plan_nemotron_cc

    varied_corpus(900).to_parquet(tmp_path / "docs.parquet")
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster), MockLLMServer(latency=0.02) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock")
        plan = plan_nemotron_cc(tmp_path / "docs.parquet", tmp_path / "planned", llm,
                                tokenizer="bundled", rows_per_partition=100,
                                sample_documents=300, probe_requests=50)
        reports = run_nemotron_cc_to_parquet(tmp_path / "docs.parquet", tmp_path / "run", llm,
                                             tokenizer="bundled", rows_per_partition=100,
                                             show_progress=False)
    assert not plan["input"]["exact"] and plan["input"]["sampled_partitions"] == 3
    assert json.loads((tmp_path / "planned" / "plan.json").read_text()) == plan
    for name, report in reports.items():
        low, high = plan["tasks"][name]["requests_interval"]
        assert low <= report["requests"] <= high, (name, low, report["requests"], high)
    assert plan["total"]["requests"] == sum(t["requests"] for t in plan["tasks"].values())
