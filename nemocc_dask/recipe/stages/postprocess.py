"""The post-processing chain of a task, on one partition, with every removed row kept and labelled.

A chain is a sequence of steps, each a built-in step name (``POSTPROCESS_STEPS``) or a user partition
function ``f(df) -> df`` returning the rows it keeps. The runner tells kept from removed rows by a
private row-number column, so every removed row lands in the rejects with its reason (the step's
reason, or the user function's name), ``reject_detail`` (the value that rejected it, e.g.
``response_token_count 530 > 510``) and ``llm_raw_output`` (the model's answer before any cleanup).
Every reject frame has the same columns and dtypes (``reject_columns``), so the reject files of
all partitions read back as one table.

Re-joining tasks (Wikipedia paraphrasing): ``drop_incomplete_documents`` rejects every segment of a
document that lost any segment on the way (``incomplete_document``; the preset's
``keep_incomplete_documents`` turns that off), then ``join_segments`` writes one row per document
whose text, token counts and ``llm_*_tokens`` describe the whole document, with
``segments_total`` and ``segments_kept``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from nemocc_dask.io.frames import concat, is_cudf, series_like, to_host_list
from nemocc_dask.recipe.presets import TaskPreset
from nemocc_dask.recipe.stages import text
from nemocc_dask.recipe.stages.diverse_qa import format_diverse_qa
from nemocc_dask.recipe.stages.segments import count_tokens, filter_range, join_segments
from nemocc_dask.recipe.tokenizer import load_tokenizer

ROW = "_nemocc_row"
REJECT_REASON = "reject_reason"
REJECT_DETAIL = "reject_detail"
RAW_OUTPUT = "llm_raw_output"
RESPONSE_TOKENS = "response_token_count"
OUTPUT_TOKENS = "output_token_count"
SEGMENTS_TOTAL = "segments_total"
SEGMENTS_KEPT = "segments_kept"
_SUMMED_ON_JOIN = ("segment_token_count", "llm_prompt_tokens", "llm_completion_tokens",
                   RESPONSE_TOKENS)


@dataclass(frozen=True)
class ChainContext:
    """What a built-in step may read besides the partition."""

    preset: TaskPreset
    tokenizer: Any
    id_field: str
    seed: int
    segments_total: dict = field(default_factory=dict)  # document id -> segments generated

    @property
    def field(self) -> str:
        return self.preset.output_field


def _modify(df, ctx: ChainContext, fn: Callable):
    out = df.copy()
    out[ctx.field] = fn(df[ctx.field])
    return out


def _drop_failed(df, ctx):
    keep = df[ctx.field].notna()
    if "llm_error" in df.columns:
        keep = keep & df["llm_error"].isna()
    return df[keep]


def _drop_truncated(df, ctx):
    if "llm_finish_reason" not in df.columns:
        return df
    return df[df["llm_finish_reason"].fillna("") != "length"]


def _count_response_tokens(df, ctx):
    return count_tokens(df, ctx.tokenizer, ctx.field, RESPONSE_TOKENS)


def _count_output_tokens(df, ctx):
    return count_tokens(df, ctx.tokenizer, ctx.field, OUTPUT_TOKENS)


def _drop_too_long(df, ctx):
    return filter_range(df, RESPONSE_TOKENS, max_value=ctx.preset.effective_postprocess_max_tokens)


def _drop_too_short(df, ctx):
    return filter_range(df, OUTPUT_TOKENS, min_value=ctx.preset.postprocess_min_tokens)


def _require_prefix(df, ctx):
    if not ctx.preset.response_prefix:
        return df
    return df[text.has_prefix(df[ctx.field], ctx.preset.response_prefix)]


def _slice_after_prefix(df, ctx):
    if not ctx.preset.response_prefix:
        return df
    return _modify(df, ctx, lambda s: text.slice_after(s, ctx.preset.response_prefix))


def _format_diverse_qa(df, ctx):
    out = format_diverse_qa(df, ctx.preset.input_field, ctx.field, ctx.tokenizer,
                            ctx.preset.response_prefix or "", ctx.preset.max_num_pairs, ctx.seed,
                            ctx.id_field, "segment_id")
    return out[out[ctx.field] != ""]


def _drop_incomplete_documents(df, ctx):
    if ctx.preset.keep_incomplete_documents:
        return df
    ids = to_host_list(df[ctx.id_field])
    arrived = Counter(ids)
    complete = [arrived[doc] == ctx.segments_total.get(doc, 0) for doc in ids]
    return df[series_like(complete, df, dtype=bool)]


def _join_segments(df, ctx):
    sums = tuple(c for c in _SUMMED_ON_JOIN if c in df.columns)
    texts = (ctx.preset.input_field,) if ctx.preset.input_field in df.columns else ()
    out = join_segments(df, ctx.field, ctx.id_field, "segment_id", "\n", also_join=texts,
                        sum_fields=sums, count_field=SEGMENTS_KEPT)
    if SEGMENTS_KEPT not in out.columns:  # an empty partition
        out[SEGMENTS_KEPT] = series_like([], out, dtype="int64")
    total = [ctx.segments_total.get(doc, 0) for doc in to_host_list(out[ctx.id_field])]
    out[SEGMENTS_TOTAL] = series_like(total, out, dtype="int64")
    return out


NOT_SENT = ("prompt_too_long", "invalid_text")  # rows never sent: their own reason, not llm_error


def _reasons_failed(removed, ctx):
    """``llm_error``, or the reason a row was never sent (its error's prefix, e.g.
    ``prompt_too_long``)."""
    errors = to_host_list(removed["llm_error"]) if "llm_error" in removed.columns else \
        [None] * len(removed)
    return [e.split(":", 1)[0] if isinstance(e, str) and e.split(":", 1)[0] in NOT_SENT
            else "llm_error" for e in errors]


def _detail_failed(removed, ctx):
    errors = to_host_list(removed["llm_error"]) if "llm_error" in removed.columns else \
        [None] * len(removed)
    return [e if isinstance(e, str) else "the answer has no text" for e in errors]


def _detail_count(column: str, relation: str, limit: Callable[[TaskPreset], int]):
    def detail(removed, ctx):
        bound = limit(ctx.preset)
        return [f"{column} {n} {relation} {bound}" for n in to_host_list(removed[column])]
    return detail


def _detail_prefix(removed, ctx):
    return [f"the answer does not start with {ctx.preset.response_prefix!r}"] * len(removed)


def _detail_incomplete(removed, ctx):
    ids = to_host_list(removed[ctx.id_field])
    left = Counter(ids)
    return [f"{left[doc]} of {ctx.segments_total.get(doc, 0)} segments left" for doc in ids]


@dataclass(frozen=True)
class Step:
    """A built-in step: its function, the reason given to the rows it removes (None: merges),
    the ``detail`` of each removed row (a fixed text or a function of the removed rows), what
    it adds to every row before deciding (``annotate``, so rejects carry it too), and, where
    rows removed by one step have different reasons, each row's (``reasons``). ``reads`` and
    ``writes``: the columns it needs and adds (``{input}``, ``{id}`` stand for the task's input
    field and the id field; see ``stages.contracts``)."""

    fn: Callable
    reason: str | None
    detail: str | Callable = ""
    annotate: Callable | None = None
    reasons: Callable | None = None
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()


POSTPROCESS_STEPS: dict[str, Step] = {
    "drop_failed": Step(_drop_failed, "llm_error", _detail_failed, reasons=_reasons_failed),
    "drop_truncated": Step(_drop_truncated, "truncated",
                           "finish_reason is 'length': the answer hit max_tokens"),
    "drop_too_long": Step(_drop_too_long, "too_long", _detail_count(
        RESPONSE_TOKENS, ">", lambda p: p.effective_postprocess_max_tokens),
        annotate=_count_response_tokens, writes=(RESPONSE_TOKENS,)),
    "remove_markdown": Step(lambda df, ctx: _modify(df, ctx, text.remove_markdown), "empty"),
    "require_prefix": Step(_require_prefix, "missing_prefix", _detail_prefix),
    "slice_after_prefix": Step(_slice_after_prefix, "missing_prefix", _detail_prefix),
    "remove_quotations": Step(lambda df, ctx: _modify(df, ctx, text.remove_quotations), "empty"),
    "remove_lines": Step(lambda df, ctx: _modify(
        df, ctx, lambda s: text.remove_lines(s, ctx.preset.lines_to_remove)), "empty"),
    "format_diverse_qa": Step(_format_diverse_qa, "empty_parse",
                              "no 'Question: ... Answer: ...' pair could be parsed",
                              reads=("{input}", "{id}", "segment_id")),
    "format_knowledge_list": Step(lambda df, ctx: _modify(df, ctx, text.format_knowledge_list),
                                  "empty_parse"),
    "drop_incomplete_documents": Step(_drop_incomplete_documents, "incomplete_document",
                                      _detail_incomplete, reads=("{id}",)),
    "join_segments": Step(_join_segments, None, reads=("{id}", "segment_id"),
                          writes=(SEGMENTS_KEPT, SEGMENTS_TOTAL)),
    "drop_too_short": Step(_drop_too_short, "too_short", _detail_count(
        OUTPUT_TOKENS, "<", lambda p: p.postprocess_min_tokens), annotate=_count_output_tokens,
        writes=(OUTPUT_TOKENS,)),
}


def resolve_steps(steps) -> list[tuple[str, Step]]:
    """(name, Step) for each step; raises ValueError for an unknown step name. A user function
    ``f(df) -> df`` becomes a Step whose reason is its name."""
    resolved = []
    for step in steps:
        if isinstance(step, str):
            if step not in POSTPROCESS_STEPS:
                raise ValueError(f"unknown post-processing step {step!r}; built-in steps: "
                                 f"{', '.join(POSTPROCESS_STEPS)} (or pass a function df -> df)")
            resolved.append((step, POSTPROCESS_STEPS[step]))
        elif callable(step):
            name = getattr(step, "__name__", type(step).__name__)
            resolved.append((name, Step(lambda df, ctx, f=step: f(df), name,
                                        f"removed by the post-processing function {name}")))
        else:
            raise ValueError(f"post-processing step {step!r} is neither a step name nor a function")
    return resolved


def reject_columns(df) -> dict[str, str]:
    """The columns of every reject frame made from generated rows ``df``: ``df``'s columns with
    their dtypes (text as ``string``), then the raw answer, both token counts, reason and detail."""
    dtypes = (df.head(0).to_pandas() if is_cudf(df) else df).dtypes
    columns = {name: "string" if str(dtype) == "object" else str(dtype)
               for name, dtype in dtypes.items() if name != ROW}
    columns.update({RAW_OUTPUT: "string", RESPONSE_TOKENS: "Int64", OUTPUT_TOKENS: "Int64",
                    REJECT_REASON: "string", REJECT_DETAIL: "string"})
    return columns


def _labelled(removed, reasons: list[str], details: list[str]):
    out = removed.copy()
    out[REJECT_REASON] = series_like(reasons, removed)
    out[REJECT_DETAIL] = series_like(details, removed)
    return out


def _with_schema(frame, columns: dict[str, str]):
    """``frame`` with exactly ``columns`` (missing ones all-missing) in their dtypes."""
    host = frame.to_pandas() if is_cudf(frame) else frame
    host = host.reindex(columns=list(columns)).astype(columns)
    if is_cudf(frame):
        import cudf

        return cudf.DataFrame.from_pandas(host)
    return host


def dropped_rejects(docs, dropped, id_field: str, columns: dict[str, str]):
    """Reject rows for the documents removed before generation (``dropped``: ``id``, ``reason``,
    e.g. ``invalid_text``, ``document_too_short``): each document's own columns, its reason as
    ``reject_reason``; the generated columns missing. ``columns``: ``reject_columns``'s."""
    host = docs.to_pandas() if is_cudf(docs) else docs
    reasons = dict(zip(dropped["id"], dropped["reason"]))
    rows = host[host[id_field].isin(list(reasons))].copy()
    rows[REJECT_REASON] = rows[id_field].map(reasons)
    rows[REJECT_DETAIL] = "removed before generation: " + rows[REJECT_REASON]
    nullable = {"int64": "Int64", "int32": "Int32", "bool": "boolean"}  # generated: missing
    out = _with_schema(rows.reset_index(drop=True),
                       {name: nullable.get(dtype, dtype) for name, dtype in columns.items()})
    if is_cudf(docs):
        import cudf

        return cudf.DataFrame.from_pandas(out)
    return out


def postprocess_partition(df, preset: TaskPreset, tokenizer=None, id_field: str = "id",
                          seed: int = 0, return_rejects: bool = False):
    """Run the task's post-processing chain on one partition of generated rows.

    Reads the task's output field (and ``llm_error``/``llm_finish_reason`` when present); rewrites
    the output field and adds ``response_token_count`` and ``output_token_count`` (re-joining
    tasks also ``segments_total``/``segments_kept``). Returns the kept rows, or (kept, rejects)
    with ``return_rejects``; rejects have the columns of ``reject_columns(df)``.
    """
    totals = dict(Counter(to_host_list(df[id_field]))) if id_field in df.columns else {}
    ctx = ChainContext(preset, load_tokenizer(tokenizer), id_field, seed, totals)
    live = df.reset_index(drop=True)
    live[ROW] = series_like(list(range(len(live))), live, dtype="int64")
    live[RAW_OUTPUT] = live[ctx.field]
    rejects = []
    for _, step in resolve_steps(preset.postprocess_steps):
        if step.annotate is not None:
            live = step.annotate(live, ctx)
        out = step.fn(live, ctx)
        if step.reason is not None and len(out) < len(live):
            removed = live[~live[ROW].isin(out[ROW])]
            details = step.detail(removed, ctx) if callable(step.detail) else \
                [step.detail or step.reason] * len(removed)
            reasons = step.reasons(removed, ctx) if step.reasons else \
                [step.reason] * len(removed)
            rejects.append(_labelled(removed, reasons, details))
        live = out
    kept = live.drop(columns=[ROW, RAW_OUTPUT], errors="ignore").reset_index(drop=True)
    if not return_rejects:
        return kept
    rejected = concat(rejects, df) if rejects else df.iloc[:0]
    return kept, _with_schema(rejected.reset_index(drop=True), reject_columns(df))
