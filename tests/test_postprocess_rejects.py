"""Post-processing rejects: one schema for every partition, the value that rejected each row, the
raw answer, and incomplete re-joined documents."""

import pandas as pd

from nemocc_dask.recipe.presets import get_preset
from nemocc_dask.recipe.stages.postprocess import postprocess_partition, reject_columns


def _generated(answers, ids=None, segment_ids=None, field="distill", errors=None, finish=None):
    n = len(answers)
    return pd.DataFrame({
        "id": ids or list(range(n)), "segment_id": segment_ids or [0] * n,
        "text": [f"segment {i}" for i in range(n)],
        "segment_token_count": pd.Series([10] * n, dtype="int64"),
        field: pd.Series(answers, dtype="string"),
        "llm_finish_reason": pd.Series(finish or ["stop"] * n, dtype="string"),
        "llm_prompt_tokens": pd.Series([100] * n, dtype="Int64"),
        "llm_completion_tokens": pd.Series([50] * n, dtype="Int64"),
        "llm_error": pd.Series(errors or [None] * n, dtype="string")})


LONG = "Paraphrased Text: " + "The mill turned grain into flour for the valley. " * 8


def test_every_reason_carries_its_value_and_the_raw_answer(tokenizer):
    preset = get_preset("distill", postprocess_max_tokens=150)
    df = _generated([None, LONG, "Paraphrased Text: short.", LONG * 2, "no prefix at all " * 20],
                    errors=["http_500: down", None, None, None, None],
                    finish=["stop", "stop", "stop", "length", "stop"])
    kept, rejects = postprocess_partition(df, preset, tokenizer, return_rejects=True)
    by_id = rejects.set_index("id")
    assert by_id.loc[0, "reject_reason"] == "llm_error"
    assert by_id.loc[0, "reject_detail"] == "http_500: down"
    assert by_id.loc[3, "reject_reason"] == "truncated"
    assert by_id.loc[2, "reject_reason"] == "too_short"
    assert by_id.loc[2, "reject_detail"] == f"output_token_count {by_id.loc[2, 'output_token_count']} < 50"
    assert by_id.loc[4, "reject_reason"] == "missing_prefix"
    assert by_id.loc[4, "llm_raw_output"].startswith("no prefix at all")
    assert list(kept["id"]) == [1]
    assert "llm_raw_output" not in kept.columns


def test_too_long_reject_carries_its_count(tokenizer):
    preset = get_preset("distill", postprocess_max_tokens=60)
    kept, rejects = postprocess_partition(_generated([LONG]), preset, tokenizer,
                                          return_rejects=True)
    assert len(kept) == 0 and rejects.loc[0, "reject_reason"] == "too_long"
    count = rejects.loc[0, "response_token_count"]
    assert count > 60 and rejects.loc[0, "reject_detail"] == f"response_token_count {count} > 60"


def test_reject_schema_is_the_same_with_or_without_rejects(tokenizer):
    preset = get_preset("distill")
    _, none = postprocess_partition(_generated([LONG]), preset, tokenizer, return_rejects=True)
    _, some = postprocess_partition(_generated([None], errors=["http_500: x"]), preset, tokenizer,
                                    return_rejects=True)
    assert len(none) == 0 and len(some) == 1
    assert none.dtypes.to_dict() == some.dtypes.to_dict()
    assert list(none.columns) == list(reject_columns(_generated([LONG])))


def test_incomplete_document_is_rejected_unless_kept(tokenizer):
    answer = "Here is a paraphrased version: " + "The valley had many mills and rivers. " * 10
    df = _generated([answer, None, answer, answer, answer], ids=[7, 7, 7, 8, 8],
                    segment_ids=[0, 1, 2, 0, 1], field="rephrased",
                    errors=[None, "timeout: slow", None, None, None])
    kept, rejects = postprocess_partition(df, get_preset("wikipedia_paraphrasing"), tokenizer,
                                          return_rejects=True)
    assert list(kept["id"]) == [8]
    assert kept.loc[0, "segments_total"] == kept.loc[0, "segments_kept"] == 2
    assert kept.loc[0, "text"] == "segment 3\nsegment 4"
    assert kept.loc[0, "llm_completion_tokens"] == 100 and kept.loc[0, "segment_token_count"] == 20
    incomplete = rejects[rejects["reject_reason"] == "incomplete_document"]
    assert list(incomplete["id"]) == [7, 7]
    assert set(incomplete["reject_detail"]) == {"2 of 3 segments left"}
    kept_all, _ = postprocess_partition(
        df, get_preset("wikipedia_paraphrasing", keep_incomplete_documents=True), tokenizer,
        return_rejects=True)
    row = kept_all.set_index("id").loc[7]
    assert row["segments_total"] == 3 and row["segments_kept"] == 2
