"""Custom tasks and clients, several endpoints, and the quality-routed full pipeline."""

import json
import threading
import time

import dask.dataframe as dd
import pandas as pd
import pytest
from conftest import make_docs

from nemocc_dask import LLMConfig, make_task, run_task
from nemocc_dask.llm.client import Completion
from nemocc_dask.recipe.presets import HIGH_QUALITY_TASKS
from nemocc_dask.recipe.task_file import load_task_file
from nemocc_dask.run.nemotron_cc import run_nemotron_cc
from nemocc_dask.run.runner import run_to_parquet
from nemocc_dask.testing.mock import MockLLMServer, fake_answer

pytestmark = pytest.mark.slow


class SyncEchoClient:
    """A synchronous custom client answering like the mock server; fails rows containing 'BOOM'
    and answers without content for rows containing 'EMPTY'."""

    def complete_sync(self, messages, settings):
        user = messages[-1]["content"]
        if "BOOM" in user:
            raise RuntimeError("backend refused")
        if "EMPTY" in user:
            return Completion(text=None, finish_reason="stop")
        text = fake_answer(user)
        return Completion(text=text, finish_reason="stop", prompt_tokens=1,
                          completion_tokens=len(text) // 4)


class AsyncEchoClient:
    async def complete(self, messages, settings):
        return SyncEchoClient().complete_sync(messages, settings)


@pytest.mark.parametrize("client", [SyncEchoClient, AsyncEchoClient])
def test_custom_clients_match_builtin(cluster_client, client):
    ddf = dd.from_pandas(make_docs(20), npartitions=2)
    with MockLLMServer() as server:
        builtin = run_task(ddf, "knowledge_list",
                           LLMConfig(base_url=server.base_url, model="mock")).compute()
    custom = run_task(ddf, "knowledge_list", LLMConfig(client_factory=client)).compute()
    cols = ["id", "segment_id", "knowledge_list"]
    pd.testing.assert_frame_equal(custom[cols].sort_values(cols).reset_index(drop=True),
                                  builtin[cols].sort_values(cols).reset_index(drop=True))


def test_custom_client_failures_go_to_rejects(tmp_path, cluster_client):
    docs = make_docs(10)
    docs.loc[2, "text"] += " BOOM"
    path = tmp_path / "in.parquet"
    docs.to_parquet(path)
    report = run_to_parquet(path, tmp_path / "out", "distill",
                            LLMConfig(client_factory=SyncEchoClient), show_progress=False)
    rejects = pd.concat(pd.read_parquet(f) for f in (tmp_path / "out" / "rejects").glob("*"))
    failed = rejects[rejects["reject_reason"] == "llm_error"]
    assert set(failed["id"]) == {2} and failed["llm_error"].str.contains("backend refused").all()
    assert report["failed_by_class"] == {"client_error": 1} and report["accounted"]


def test_answer_without_content_is_an_empty_response_error():
    from nemocc_dask.recipe.presets import PRESETS
    from nemocc_dask.run.generate import generate_partition

    docs = make_docs(3)
    docs.loc[1, "text"] += " EMPTY"
    out, stats = generate_partition(docs, PRESETS["distill"], LLMConfig(client_factory=SyncEchoClient),
                                    return_stats=True)
    assert out["llm_error"].isna().tolist() == [True, False, True]
    assert out.loc[1, "llm_error"].startswith("empty_response") and pd.isna(out.loc[1, "distill"])
    assert stats["failed_by_class"] == {"empty_response": 1}


def test_custom_task_sends_only_a_user_message(tmp_path, cluster_client):
    task = make_task("summary", "Summarise this:\n{document}", max_output_tokens=2000,
                     min_segment_tokens=5, postprocess_min_tokens=1, top_k=20, stop=["END"])
    docs = make_docs(6)
    with MockLLMServer(record_messages=True) as server:
        out = run_task(dd.from_pandas(docs, npartitions=2), task,
                       LLMConfig(base_url=server.base_url, model="mock")).compute()
    assert server.stats.messages and all(len(m) == 1 and m[0]["role"] == "user"
                                         for m in server.stats.messages)
    assert out["summary"].str.startswith("Response:").all() and len(out) == 6


def test_prompt_file(tmp_path):
    path = tmp_path / "task.toml"
    path.write_text('name = "translate"\nprompt_template = "Translate: {document}"\n'
                    'max_output_tokens = 300\npostprocess_steps = ["drop_failed", "drop_too_short"]\n')
    task = load_task_file(path)
    assert task.output_field == "translate" and task.max_output_tokens == 300
    path.write_text('name = "x"\nprompt_template = "Translate: {text}"\n')
    with pytest.raises(ValueError, match=r"task.toml.*\{text\}"):
        load_task_file(path)
    path.write_text('name = "x"\nprompt_template = "{document}"\npostprocess_steps = ["nope"]\n')
    with pytest.raises(ValueError, match="unknown post-processing step 'nope'"):
        load_task_file(path)


def test_user_partition_function_in_chain(cluster_client):
    def drop_odd_ids(df):
        return df[df["id"] % 2 == 0]

    task = make_task("kl", "{document}", postprocess_steps=["drop_failed", drop_odd_ids],
                     min_segment_tokens=5)
    out = run_task(dd.from_pandas(make_docs(8), npartitions=2), task,
                   LLMConfig(client_factory=SyncEchoClient)).compute()
    assert set(out["id"]) == {0, 2, 4, 6}


# -- several endpoints -------------------------------------------------------------------------
def test_faster_endpoint_serves_more():
    ddf = dd.from_pandas(make_docs(80), npartitions=2)
    with MockLLMServer(latency=0.02) as fast, MockLLMServer(latency=0.2) as slow:
        llm = LLMConfig(base_url=[fast.base_url, slow.base_url], model="mock", max_in_flight=4)
        run_task(ddf, "knowledge_list", llm).compute(scheduler="threads")
    assert fast.stats.completed > 2 * slow.stats.completed


def test_stopped_endpoint_shifts_load(tmp_path, docs_parquet, cluster_client):
    a = MockLLMServer(latency=0.1).start()
    b = MockLLMServer(latency=0.1).start()
    llm = LLMConfig(base_url=[a.base_url, b.base_url], model="mock", max_in_flight=4,
                    backoff_base=0.01, endpoint_cooldown=30, max_retries=10)
    def stop_b_midway():
        while b.stats.completed < 5:
            time.sleep(0.01)
        b.stop()

    stopper = threading.Thread(target=stop_b_midway)
    stopper.start()
    try:
        report = run_to_parquet(docs_parquet, tmp_path / "out", "knowledge_list", llm,
                                rows_per_partition=10, show_progress=False)
    finally:
        stopper.join()
        a.stop()
    assert report["failed_by_class"] == {} and report["accounted"]
    eps = report["endpoints"]
    assert eps[b.base_url]["errors"] > 0
    assert eps[a.base_url]["requests"] > eps[b.base_url]["requests"]
    assert eps[a.base_url]["requests"] + eps[b.base_url]["requests"] == report["requests"]


# -- full pipeline -----------------------------------------------------------------------------
def test_run_nemotron_cc_routes_by_bucket(cluster_client):
    docs = make_docs(40)
    docs.loc[0, "bucketed_results"] = None
    with MockLLMServer() as server:
        llm = LLMConfig(base_url=server.base_url, model="mock")
        frames = run_nemotron_cc(dd.from_pandas(docs, npartitions=2), llm)
        results = {task: frame.compute() for task, frame in frames.items()}
    high = set(docs.loc[docs["bucketed_results"] > 11, "id"])
    low = set(docs.loc[docs["bucketed_results"] <= 11, "id"])
    assert set(results["wikipedia_paraphrasing"]["id"]) <= low
    for task in HIGH_QUALITY_TASKS:
        assert set(results[task]["id"]) <= high and len(results[task]) > 0
    assert 0 not in set().union(*(set(r["id"]) for r in results.values()))


def test_nemotron_cc_cli_end_to_end_with_resume(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from nemocc_dask.io import SAMPLE_PATH

    sample = pd.read_parquet(SAMPLE_PATH)
    out = tmp_path / "full"
    with MockLLMServer(latency=0.05) as server:
        cmd = [sys.executable, "-m", "nemocc_dask.cli", "nemotron-cc", "--input", str(SAMPLE_PATH),
               "--output", str(out), "--base-url", server.base_url, "--model", "mock",
               "--workers", "1", "--rows-per-partition", "40", "--no-progress"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("*/stats/*.json")):
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # finished partitions: stats are written last (a part without them is redone)
        done_before = {p.relative_to(out) for p in out.glob("*/stats/*.json")}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    combined = json.loads((out / "report.json").read_text())
    assert set(combined["tasks"]) == {"wikipedia_paraphrasing", *HIGH_QUALITY_TASKS}
    low = int((sample["bucketed_results"] <= 11).sum())
    for task, report in combined["tasks"].items():
        assert report["accounted"]
        expected = low if task == "wikipedia_paraphrasing" else len(sample) - low
        assert report["documents_in"] == expected
        written = pd.concat(pd.read_parquet(f) for f in (out / task / "parts").glob("*.parquet"))
        buckets = written["bucketed_results"]
        assert ((buckets <= 11) if task == "wikipedia_paraphrasing" else (buckets > 11)).all()
    assert combined["total"]["documents_in"] == low + 4 * (len(sample) - low)
    assert combined["total"]["input_rows"] == len(sample)  # each document once, not per task
    assert done_before, "the kill came before any partition finished"
    resumed = [r["partitions_skipped"] for r in combined["tasks"].values()]
    assert sum(resumed) >= len(done_before)
