"""Stage contracts (issue 25): every stage declares the columns it reads and writes, checked once
when the graph is built, and the run's output columns are what the declarations say."""

import dask.dataframe as dd
import pandas as pd
import pytest

from nemocc_dask import PRESETS, LLMConfig, MockLLMServer, make_task, run_task, run_to_parquet
from nemocc_dask.recipe.stages.contracts import check_contracts, task_contracts
from nemocc_dask.run.pipeline import postprocess

from conftest import make_docs

LLM = LLMConfig(base_url="http://127.0.0.1:9/v1", model="m")  # nothing is sent at graph build


@pytest.mark.parametrize("task", list(PRESETS))
def test_the_graph_has_the_columns_the_stages_declare(task):
    ddf = dd.from_pandas(make_docs(4), npartitions=1)
    declared = check_contracts(ddf.columns, task_contracts(PRESETS[task], "id"))
    assert list(run_task(ddf, task, LLM).columns) == declared


def test_a_column_a_step_needs_is_refused_at_graph_build_naming_the_step():
    task = make_task("qa_like", "Q about {document}",
                     postprocess_steps=["drop_failed", "format_diverse_qa"])
    answers = dd.from_pandas(pd.DataFrame({"id": [1], "text": ["t"], "qa_like": ["a"]}),
                             npartitions=1)
    with pytest.raises(ValueError, match=r"stage postprocess needs column 'segment_id' "
                                         r"\(read by step format_diverse_qa\)"):
        postprocess(answers, task)


def test_an_input_column_missing_is_named_with_its_option():
    ddf = dd.from_pandas(pd.DataFrame({"id": [1], "body": ["t"]}), npartitions=1)
    with pytest.raises(ValueError, match=r"text column 'text' not found.*--text-field"):
        run_task(ddf, "distill", LLM)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["wikipedia_paraphrasing", "diverse_qa"])
def test_written_parts_have_the_declared_columns(tmp_path, task):
    make_docs(20).to_parquet(tmp_path / "docs.parquet")
    with MockLLMServer(latency=0.01) as server:
        report = run_to_parquet(tmp_path / "docs.parquet", tmp_path / "out", task,
                                LLMConfig(base_url=server.base_url, model="mock"),
                                show_progress=False)
    parts = pd.read_parquet(tmp_path / "out" / "parts")
    assert len(parts) and list(parts.columns) == report["output_columns"]
