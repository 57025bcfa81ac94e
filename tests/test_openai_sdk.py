"""Bring your own openai SDK client: its auth and headers reach the server, and it is driven by the
package's window, retries, error capture and journal like the built-in client."""

import functools

import dask.dataframe as dd
import pandas as pd
from conftest import make_docs

from nemocc_dask import LLMConfig, run_task
from nemocc_dask.recipe.presets import PRESETS
from nemocc_dask.run.generate import generate_partition
from nemocc_dask.testing import MockLLMServer


def team_client(base_url: str):
    """What a user's factory looks like: their client, their key, their headers."""
    import openai

    return openai.AsyncOpenAI(base_url=base_url, api_key="team-key",
                              default_headers={"X-Team": "data-eng"})


def test_sdk_client_from_a_factory_matches_the_builtin_client():
    docs = make_docs(6)
    with MockLLMServer(record_messages=True) as server:
        ours = LLMConfig(client_factory=functools.partial(team_client, server.base_url),
                         model="mock")
        got = run_task(dd.from_pandas(docs, npartitions=2), "knowledge_list", ours
                       ).compute(scheduler="threads")
        headers = [{k.lower(): v for k, v in h.items()} for h in server.stats.headers]
        builtin = run_task(dd.from_pandas(docs, npartitions=2), "knowledge_list",
                           LLMConfig(base_url=server.base_url, model="mock")
                           ).compute(scheduler="threads")
    assert len(got) > 0
    key = ["id", "segment_id"]
    columns = ["knowledge_list", "llm_finish_reason", "llm_prompt_tokens", "llm_completion_tokens"]
    pd.testing.assert_frame_equal(got.sort_values(key)[columns].reset_index(drop=True),
                                  builtin.sort_values(key)[columns].reset_index(drop=True))
    assert headers and all(h.get("x-team") == "data-eng" for h in headers)
    assert all(h.get("authorization") == "Bearer team-key" for h in headers)
    assert all(h.get("x-stainless-retry-count") == "0" for h in headers)  # our retries only


def test_sdk_client_errors_are_classified_and_retried_by_the_pool():
    docs = make_docs(3)
    docs.loc[1, "text"] = "REJECT ME " + docs.loc[1, "text"]
    with MockLLMServer(fail_marker="REJECT ME", rate_500=0.3, seed=1) as server:
        llm = LLMConfig(client_factory=functools.partial(team_client, server.base_url),
                        model="mock", backoff_base=0.01, max_retries=8)
        out, stats = generate_partition(docs, PRESETS["distill"], llm, return_stats=True)
        injected = server.stats.injected_500
    assert out["llm_error"].isna().tolist() == [True, False, True]
    assert out.loc[1, "llm_error"].startswith("http_400")
    assert stats["failed_by_class"] == {"http_400": 1}
    assert injected == 0 or stats["retries_by_class"].get("http_500") == injected
