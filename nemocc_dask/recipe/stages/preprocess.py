"""The five preprocessing steps of every task, on one partition.

count document tokens -> drop short documents -> split on "\\n" -> drop over-long segments ->
greedily join adjacent segments up to ``max_segment_tokens`` -> drop short segments.
"""

from __future__ import annotations

import contextlib
import time

import pandas as pd

from nemocc_dask.io.frames import to_host_list
from nemocc_dask.recipe.presets import TaskPreset
from nemocc_dask.recipe.stages.segments import (count_tokens, filter_range, join_segments,
                                                split_documents)
from nemocc_dask.recipe.tokenizer import load_tokenizer, max_segment_tokens

DOCUMENT_TOKENS = "document_token_count"
SEGMENT_TOKENS = "segment_token_count"
SEGMENT_ID = "segment_id"


def _ids(df, id_field: str) -> set:
    return set(to_host_list(df[id_field]))


def preprocess_partition(df, preset: TaskPreset, tokenizer=None, text_field: str = "text",
                         id_field: str = "id", return_dropped: bool = False,
                         timings: dict[str, float] | None = None):
    """Segments of one partition, ready for prompting.

    Reads ``text_field`` and ``id_field``; keeps every input column and writes
    ``document_token_count``, ``segment_id`` and ``segment_token_count``. Missing, empty or
    non-string text counts 0 tokens and is filtered (decision 8). With ``return_dropped`` also
    returns a pandas frame (``id``, ``reason``) for the documents that produced no segment:
    ``invalid_text``, ``document_too_short`` or ``no_usable_segment``. ``timings``, if given, gets
    the seconds spent in each stage added under the names in ``PREPROCESS_STAGES``.
    """
    tok = load_tokenizer(tokenizer)
    max_seg = max_segment_tokens(tok, preset)
    counted: dict[str, int] = {}  # a segment equal to a document (no "\n") is not encoded twice
    with timed(timings, "count_document_tokens"):
        docs = count_tokens(df, tok, text_field, DOCUMENT_TOKENS, known=counted)
    with timed(timings, "filter_documents"):
        valid = docs[text_field].notna() & (docs[DOCUMENT_TOKENS] > 0)
        invalid_ids = _ids(docs[~valid], id_field)
        docs = filter_range(docs[valid], DOCUMENT_TOKENS, min_value=preset.min_document_tokens)
    with timed(timings, "split_documents"):
        segments = split_documents(docs, text_field, "\n", SEGMENT_ID)
    with timed(timings, "count_segment_tokens"):
        segments = count_tokens(segments, tok, text_field, SEGMENT_TOKENS, known=counted)
    with timed(timings, "join_segments"):
        segments = filter_range(segments, SEGMENT_TOKENS, max_value=max_seg)
        segments = join_segments(segments, text_field, id_field, SEGMENT_ID, "\n",
                                 max_length=max_seg, length_field=SEGMENT_TOKENS)
        segments = filter_range(segments, SEGMENT_TOKENS, min_value=preset.min_segment_tokens)
    if not return_dropped:
        return segments
    long_enough = _ids(docs, id_field)
    kept = _ids(segments, id_field)
    dropped = [(i, "invalid_text") for i in invalid_ids]
    dropped += [(i, "document_too_short") for i in _ids(df, id_field) - invalid_ids - long_enough]
    dropped += [(i, "no_usable_segment") for i in long_enough - kept]
    return segments, pd.DataFrame(dropped, columns=["id", "reason"])


PREPROCESS_STAGES = ("count_document_tokens", "filter_documents", "split_documents",
                     "count_segment_tokens", "join_segments")


@contextlib.contextmanager
def timed(timings: dict[str, float] | None, stage: str):
    """Add the seconds spent in the ``with`` block to ``timings[stage]`` (no-op for None)."""
    start = time.perf_counter()
    yield
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
