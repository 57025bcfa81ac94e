"""Token counting, range filters, and splitting documents into segments and joining them back.

All functions take and return one partition (pandas or cuDF DataFrame). Segments never leave the
partition of their document, so none of these needs a shuffle.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from nemocc_dask.io.frames import is_cudf, series_like, to_host_list
from nemocc_dask.recipe.tokenizer import count_tokens_list

_DOC_ROW = "_nemocc_doc_row"
# Decision 9: the "\n" separator costs one token when segments are packed together.
SEPARATOR_COST = 1


def count_tokens(df, tokenizer, text_field: str = "text", count_field: str = "token_count",
                 known: dict[str, int] | None = None):
    """Write ``count_field`` (int64): tokens of ``text_field`` incl. special tokens; missing -> 0.

    ``known`` (text -> count) is reused and extended, as in ``count_tokens_list``.
    """
    counts = count_tokens_list(tokenizer, to_host_list(df[text_field]), known=known)
    out = df.copy()
    out[count_field] = series_like(counts, df, dtype="int64")
    return out


def filter_range(df, field: str, min_value=None, max_value=None):
    """Keep rows whose ``field`` lies in [min_value, max_value] (inclusive; None = unbounded)."""
    keep = df[field].notna()
    if min_value is not None:
        keep = keep & (df[field] >= min_value)
    if max_value is not None:
        keep = keep & (df[field] <= max_value)
    return df[keep]


def split_documents(df, text_field: str = "text", separator: str = "\n",
                    segment_id_field: str = "segment_id"):
    """One row per ``separator``-piece of ``text_field`` (literal split, empty pieces kept).

    Writes ``text_field`` (the piece) and ``segment_id_field`` (0..k-1 per document); all other
    columns are copied onto every segment. The index is reset.
    """
    out = df.reset_index(drop=True)
    if len(out) == 0:
        out[segment_id_field] = out.index.astype("int64") if len(out.columns) else []
        return out
    out[_DOC_ROW] = series_like(list(range(len(out))), out, dtype="int64")
    out[text_field] = out[text_field].str.split(separator, regex=False)
    out = out.explode(text_field).reset_index(drop=True)
    out[segment_id_field] = out.groupby(_DOC_ROW).cumcount().astype("int64")
    if not is_cudf(out):
        out[text_field] = out[text_field].astype(df[text_field].dtype)
    return out.drop(columns=[_DOC_ROW])


def _ordered_groups(doc_ids: list, segment_ids: list) -> list[list[int]]:
    """Row positions grouped by document id (sorted, missing ids dropped), in segment order."""
    host = pd.DataFrame({"doc": doc_ids, "seg": segment_ids, "pos": range(len(doc_ids))})
    host = host[host["doc"].notna()].sort_values(["doc", "seg"], kind="stable")
    docs = host["doc"].to_numpy()
    starts = np.flatnonzero(docs[1:] != docs[:-1]) + 1
    return [group.tolist() for group in np.split(host["pos"].to_numpy(), starts) if len(group)]


def join_segments(df, text_field: str = "text", document_id_field: str = "id",
                  segment_id_field: str = "segment_id", separator: str = "\n",
                  max_length: int | None = None, length_field: str | None = None,
                  drop_segment_id_field: bool = False, also_join: tuple[str, ...] = (),
                  sum_fields: tuple[str, ...] = (), count_field: str | None = None):
    """Join the segments of each document in segment order.

    Without ``max_length`` (mode A): one row per document, texts joined with ``separator``, other
    columns from the first segment. With ``max_length`` and ``length_field`` (mode B): greedy
    packing of adjacent segments while ``sum(lengths) + SEPARATOR_COST * (n-1) <= max_length``;
    each chunk copies its first row, gets the joined text, the accumulated length and a new
    ``segment_id`` 0..k-1. A single over-long segment becomes its own chunk. Missing segments are
    skipped. Output is sorted by document id; rows without an id are dropped.

    Mode A only: ``also_join`` text columns are joined like ``text_field``; ``sum_fields`` become
    the sum over the document's segments (missing values count as 0); ``count_field`` is written
    with the number of segments joined.
    """
    if max_length is not None and length_field is None:
        raise ValueError("max_length is specified but length_field is not")
    if length_field is not None and max_length is None:
        raise ValueError("length_field is specified but max_length is not")
    if len(df) == 0:
        return df.drop(columns=[segment_id_field]) if drop_segment_id_field else df
    texts = to_host_list(df[text_field])
    lengths = to_host_list(df[length_field]) if length_field else None
    first_rows, joined, acc_lengths, new_ids = [], [], [], []
    extra_texts = {name: to_host_list(df[name]) for name in also_join}
    extra_sums = {name: to_host_list(df[name]) for name in sum_fields}
    joined_extra = {name: [] for name in (*also_join, *sum_fields)}
    counts = []
    for group in _ordered_groups(to_host_list(df[document_id_field]),
                                 to_host_list(df[segment_id_field])):
        group = [p for p in group if isinstance(texts[p], str)]
        if not group:
            continue
        if max_length is None:
            first_rows.append(group[0])
            joined.append(separator.join(texts[p] for p in group))
            counts.append(len(group))
            for name, values in extra_texts.items():
                joined_extra[name].append(separator.join(values[p] for p in group
                                                         if isinstance(values[p], str)))
            for name, values in extra_sums.items():
                joined_extra[name].append(sum(int(values[p]) for p in group
                                              if pd.notna(values[p])))
            continue
        chunk_id, start, acc_len = 0, group[0], int(lengths[group[0]])
        parts = [texts[start]]
        for p in group[1:]:
            proposed = acc_len + int(lengths[p]) + SEPARATOR_COST
            if proposed <= max_length:
                parts.append(texts[p])
                acc_len = proposed
                continue
            first_rows.append(start); joined.append(separator.join(parts))
            acc_lengths.append(acc_len); new_ids.append(chunk_id)
            chunk_id, start, acc_len, parts = chunk_id + 1, p, int(lengths[p]), [texts[p]]
        first_rows.append(start); joined.append(separator.join(parts))
        acc_lengths.append(acc_len); new_ids.append(chunk_id)
    out = df.iloc[first_rows].reset_index(drop=True)
    out[text_field] = series_like(joined, out, dtype=df[text_field].dtype)
    for name, values in joined_extra.items():
        out[name] = series_like(values, out, dtype=df[name].dtype)
    if count_field is not None and max_length is None:
        out[count_field] = series_like(counts, out, dtype="int64")
    if max_length is not None:
        out[length_field] = series_like(acc_lengths, out, dtype=df[length_field].dtype)
        out[segment_id_field] = series_like(new_ids, out, dtype=df[segment_id_field].dtype)
    if drop_segment_id_field:
        out = out.drop(columns=[segment_id_field])
    return out
