"""End-to-end generation on a real LocalCluster (2 workers) against the mock server."""

import dask.dataframe as dd
import pandas as pd
import pytest
from conftest import make_docs

from nemocc_dask import LLMConfig, PreflightError, generate, preprocess, run_task
from nemocc_dask.recipe.presets import PRESETS
from nemocc_dask.testing.mock import MockLLMServer

pytestmark = pytest.mark.slow


def _ddf(n=40, parts=4):
    return dd.from_pandas(make_docs(n), npartitions=parts)


def _check(task, out, docs):
    field = PRESETS[task].output_field
    assert len(out) > 0 and out[field].notna().all()
    if task == "diverse_qa":
        assert all(t.startswith(s + "\n\n") and "Question:" in t
                   for s, t in zip(out["text"], out[field]))
    elif task == "wikipedia_paraphrasing":
        assert not out[field].str.contains("Here is a paraphrased version:").any()
        assert out["id"].is_unique  # one row per document after re-joining
    elif task == "distill":
        assert not out[field].str.startswith("Paraphrased Text:").any()
    elif task == "extract_knowledge":
        assert not out[field].str.contains(r"^Passage \d:$", regex=True).any()
    elif task == "knowledge_list":
        assert not out[field].str.contains(r"^- ", regex=True).any()
    assert set(out["id"]) <= set(docs["id"])


@pytest.mark.parametrize("task", list(PRESETS))
def test_each_task_end_to_end(cluster_client, task):
    docs = make_docs(40)
    with MockLLMServer(latency=0.01) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock", max_in_flight=16)
        out = run_task(dd.from_pandas(docs, npartitions=4), task, llm).compute()
        generated = generate(preprocess(dd.from_pandas(docs, npartitions=4), task), task,
                             llm).compute()
    _check(task, out, docs)
    # every document is accounted for: it reached generation, and each row has output or error
    assert set(generated["id"]) == set(docs["id"])
    assert (generated[PRESETS[task].output_field].notna() | generated["llm_error"].notna()).all()
    assert str(generated["llm_error"].dtype) == "string"
    assert str(generated["llm_prompt_tokens"].dtype) == "Int64"


def test_faults_give_same_output_as_clean_run(cluster_client):
    ddf = _ddf(60, 4)
    with MockLLMServer(latency=0.01) as clean:
        llm = LLMConfig(base_url=clean.base_url, model="mock", max_in_flight=32)
        expected = run_task(ddf, "diverse_qa", llm).compute()
    with MockLLMServer(latency=0.01, rate_429=0.05, rate_500=0.02, rate_drop=0.01,
                       retry_after=0.01, seed=1) as faulty:
        llm = LLMConfig(base_url=faulty.base_url, model="mock", max_in_flight=32,
                        backoff_base=0.01, max_retries=8)
        got = run_task(ddf, "diverse_qa", llm).compute()
    assert faulty.stats.injected_429 + faulty.stats.injected_500 + faulty.stats.dropped > 0
    key = ["id", "segment_id"]
    pd.testing.assert_frame_equal(got.sort_values(key).reset_index(drop=True),
                                  expected.sort_values(key).reset_index(drop=True))


def test_one_bad_row_fails_alone(cluster_client):
    docs = make_docs(20)
    docs.loc[3, "text"] = docs.loc[3, "text"] + " POISON"
    with MockLLMServer(fail_marker="POISON") as server:
        llm = LLMConfig(base_url=server.base_url, model="mock")
        out = generate(preprocess(dd.from_pandas(docs, npartitions=2), "distill"), "distill",
                       llm).compute()
    bad = out[out["text"].str.contains("POISON")]
    assert len(bad) == 1 and bad["llm_error"].iloc[0].startswith("http_400")
    assert bad["distill"].isna().all()
    good = out[~out["text"].str.contains("POISON")]
    assert good["llm_error"].isna().all() and good["distill"].notna().all()


def test_identical_prompts_are_sent_once(cluster_client):
    docs = make_docs(10)
    docs["text"] = docs["text"].iloc[0]
    with MockLLMServer() as server:
        llm = LLMConfig(base_url=server.base_url, model="mock")
        out = generate(preprocess(dd.from_pandas(docs, npartitions=1), "distill"), "distill",
                       llm).compute()
    assert len(out) == 10 and out["distill"].nunique() == 1
    assert server.stats.requests == 1


def test_prompt_too_long_is_not_sent():
    docs = make_docs(3)
    with MockLLMServer() as server:
        llm = LLMConfig(base_url=server.base_url, model="mock")
        out = generate(dd.from_pandas(docs.assign(segment_id=0), npartitions=1), "knowledge_list",
                       llm, max_input_tokens=50).compute(scheduler="sync")
    assert out["llm_error"].str.startswith("prompt_too_long").all()
    assert server.stats.requests == 0


def test_preflight_errors_name_the_fix():
    """The endpoint check runs when the first partition is computed (not while the graph is
    built) and names the fix."""
    with MockLLMServer(api_key="right-key") as server:
        with pytest.raises(PreflightError, match="refused the API key"):
            generate(_ddf(4, 1), "distill", LLMConfig(base_url=server.base_url, model="mock",
                                                      api_key="wrong")).compute(scheduler="sync")
        with pytest.raises(PreflightError, match="not served.*mock"):
            generate(_ddf(4, 1), "distill", LLMConfig(base_url=server.base_url, model="gpt-x",
                                                      api_key="right-key")
                     ).compute(scheduler="sync")
        url = server.base_url
    with pytest.raises(PreflightError, match="cannot reach endpoint"):
        generate(_ddf(4, 1), "distill", LLMConfig(base_url=url, model="mock",
                                                  timeout=5)).compute(scheduler="sync")


def test_building_a_graph_sends_nothing_and_journal_dir_makes_recompute_free(tmp_path,
                                                                            cluster_client):
    docs = make_docs(12)
    with MockLLMServer(record_messages=True) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock")
        out = run_task(dd.from_pandas(docs, npartitions=3), "distill", llm,
                       journal_dir=tmp_path / "journal")
        assert server.stats.requests == 0 and not server.stats.authorization  # no GET either
        first = out.compute()
        sent = server.stats.requests
        second = out.compute()
        assert server.stats.requests == sent  # every answer came from the journal
    assert sent == 12 and len(list((tmp_path / "journal").glob("part-*.jsonl"))) == 3
    key = ["id", "segment_id"]
    pd.testing.assert_frame_equal(first.sort_values(key).reset_index(drop=True),
                                  second.sort_values(key).reset_index(drop=True))


def test_missing_columns_are_named():
    ddf = dd.from_pandas(pd.DataFrame({"doc": [1], "body": ["x"]}), npartitions=1)
    with pytest.raises(ValueError, match=r"text column 'text' not found.*\['doc', 'body'\]"):
        preprocess(ddf, "distill")
    with pytest.raises(ValueError, match="id column 'id' not found"):
        preprocess(ddf, "distill", text_field="body")


def test_a_busy_endpoint_is_told_apart_from_a_dead_one():
    """A server that accepts connections but does not answer gets longer waits and its own
    message; a closed port fails at once with 'cannot reach'."""
    import socket
    import time

    from nemocc_dask.llm.preflight import preflight

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(8)  # the kernel accepts connections; nobody ever answers
    url = f"http://127.0.0.1:{busy.getsockname()[1]}/v1"
    started = time.monotonic()
    with pytest.raises(PreflightError, match="is up .* did not answer GET /models within 0.5 s"):
        preflight(LLMConfig(base_url=url, model="m"), timeouts=(0.2, 0.3))
    assert time.monotonic() - started >= 0.5
    busy.close()
    with pytest.raises(PreflightError, match="cannot reach endpoint"):
        preflight(LLMConfig(base_url=url, model="m"), timeouts=(0.2, 0.3))


def test_the_served_context_is_read_from_vllm_and_llama_cpp_model_lists():
    from nemocc_dask.llm.preflight import _served_context

    assert _served_context({"id": "m", "max_model_len": 4096}) == 4096  # vLLM, SGLang
    assert _served_context({"id": "m", "owned_by": "llamacpp",
                            "meta": {"n_ctx": 8192, "n_ctx_train": 131072}}) == 8192
    assert _served_context({"id": "m", "meta": {"n_ctx": 0}}) is None
    assert _served_context({"id": "m", "object": "model"}) is None  # a hosted API says nothing
