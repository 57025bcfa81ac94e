"""The served model's context: prompts that cannot fit with max_tokens are not sent (no HTTP 400
from the server), whether the context is reported by /v1/models or given by the user."""

import pandas as pd
import pytest

from nemocc_dask import LLMConfig
from nemocc_dask.recipe.presets import PRESETS
from nemocc_dask.run.generate import generate_partition
from nemocc_dask.testing import MockLLMServer


def _docs() -> pd.DataFrame:
    short = "The delta has many birds. " * 10  # ~70 tokens
    long = "The delta supports birds and wetlands that filter water for towns. " * 80  # ~1,100
    return pd.DataFrame({"id": [1, 2, 3], "text": [short, long, short + "again"]})


def test_without_the_context_the_server_refuses_long_prompts():
    with MockLLMServer(max_model_len=2000) as server:
        out = generate_partition(_docs(), PRESETS["distill"],
                                 LLMConfig(base_url=server.base_url, model="mock", max_retries=0))
        assert server.stats.rejected_400 == 1
    assert out.loc[1, "llm_error"].startswith("http_400")


@pytest.mark.parametrize("reported", [True, False])
def test_prompts_beyond_the_served_context_are_not_sent(reported):
    with MockLLMServer(max_model_len=2000 if reported else None) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock",
                        max_model_len=None if reported else 2000)
        out = generate_partition(_docs(), PRESETS["distill"], llm, check_endpoint=True)
        assert server.stats.rejected_400 == 0 and server.stats.requests == 2
    assert out["llm_error"].isna().tolist() == [True, False, True]
    assert out.loc[1, "llm_error"].startswith("prompt_too_long")
    assert "served context 2000 minus max_tokens 1600" in out.loc[1, "llm_error"]


def test_run_warns_when_the_served_context_is_smaller_than_the_task_needs(tmp_path, caplog,
                                                                          cluster_client):
    from nemocc_dask import run_to_parquet

    path = tmp_path / "docs.parquet"
    _docs().to_parquet(path)
    with MockLLMServer(max_model_len=2000) as server, caplog.at_level("WARNING"):
        report = run_to_parquet(path, tmp_path / "out", "distill",
                                LLMConfig(base_url=server.base_url, model="mock"),
                                show_progress=False)
        assert server.stats.rejected_400 == 0
    assert "needs a context of 3600 tokens" in caplog.text and "served with 2000" in caplog.text
    assert report["failed_by_class"] == {"prompt_too_long": 1} and report["accounted"]
    rejects = pd.read_parquet(tmp_path / "out" / "rejects")  # stored with its own reason
    assert rejects["reject_reason"].tolist().count("prompt_too_long") == 1
    assert "llm_error" not in rejects["reject_reason"].tolist()
    assert report["documents_not_written"]["prompt_too_long"] == 1
    assert report["served_context"] == 2000 and report["tokenizer"].startswith("qwen2.5")
