"""The public API: what a Dask user imports from the top level, and options that must be named."""

import inspect

import pytest

import nemocc_dask


def test_entry_points_are_at_the_top_level():
    from nemocc_dask.testing import MockLLMServer

    for name in ("run_to_parquet", "run_nemotron_cc", "run_nemotron_cc_to_parquet", "read_input",
                 "run_task", "preprocess", "generate", "postprocess", "LLMConfig", "make_client",
                 "get_preset", "make_task", "load_tokenizer"):
        assert callable(getattr(nemocc_dask, name)), name
    assert MockLLMServer is nemocc_dask.MockLLMServer


@pytest.mark.parametrize("name, positional", [
    ("preprocess", 2), ("generate", 3), ("postprocess", 2), ("run_task", 3),
    ("run_to_parquet", 4), ("run_nemotron_cc", 2), ("run_nemotron_cc_to_parquet", 3),
])
def test_options_after_data_task_and_llm_are_keyword_only(name, positional):
    fn = getattr(nemocc_dask, name)
    params = list(inspect.signature(fn).parameters.values())
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:positional])
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params[positional:])
    with pytest.raises(TypeError):
        fn(*([None] * (positional + 1)))


def test_shared_options_come_in_the_same_order():
    order = ["tokenizer", "text_field", "id_field", "seed"]
    for name in ("run_task", "run_to_parquet", "run_nemotron_cc", "run_nemotron_cc_to_parquet",
                 "postprocess"):
        names = [p for p in inspect.signature(getattr(nemocc_dask, name)).parameters
                 if p in order]
        assert names == order, name
