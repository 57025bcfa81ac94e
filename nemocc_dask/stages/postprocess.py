"""The post-processing chain of a task, on one partition, with every removed row kept and labelled.

A chain is a sequence of steps, each a built-in step name (``POSTPROCESS_STEPS``) or a user partition
function ``f(df) -> df`` returning the rows it keeps. The runner tells kept from removed rows by a
private row-number column, so every removed row lands in the rejects with its reason (the step's
reason, or the user function's name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from nemocc_dask.presets import TaskPreset
from nemocc_dask.stages import text
from nemocc_dask.stages.backend import concat, series_like
from nemocc_dask.stages.diverse_qa import format_diverse_qa
from nemocc_dask.stages.segments import count_tokens, filter_range, join_segments
from nemocc_dask.tokenizer import load_tokenizer

ROW = "_nemocc_row"
REJECT_REASON = "reject_reason"
RESPONSE_TOKENS = "response_token_count"
OUTPUT_TOKENS = "output_token_count"


@dataclass(frozen=True)
class ChainContext:
    """What a built-in step may read besides the partition."""

    preset: TaskPreset
    tokenizer: Any
    id_field: str
    seed: int

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


def _drop_too_long(df, ctx):
    counted = count_tokens(df, ctx.tokenizer, ctx.field, RESPONSE_TOKENS)
    return filter_range(counted, RESPONSE_TOKENS, max_value=ctx.preset.effective_postprocess_max_tokens)


def _drop_too_short(df, ctx):
    counted = count_tokens(df, ctx.tokenizer, ctx.field, OUTPUT_TOKENS)
    return filter_range(counted, OUTPUT_TOKENS, min_value=ctx.preset.postprocess_min_tokens)


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


def _join_segments(df, ctx):
    return join_segments(df, ctx.field, ctx.id_field, "segment_id", "\n")


@dataclass(frozen=True)
class Step:
    """A built-in step: its function and the reason given to the rows it removes (None: merges)."""

    fn: Callable
    reason: str | None


POSTPROCESS_STEPS: dict[str, Step] = {
    "drop_failed": Step(_drop_failed, "llm_error"),
    "drop_truncated": Step(_drop_truncated, "truncated"),
    "drop_too_long": Step(_drop_too_long, "too_long"),
    "remove_markdown": Step(lambda df, ctx: _modify(df, ctx, text.remove_markdown), "empty"),
    "require_prefix": Step(_require_prefix, "missing_prefix"),
    "slice_after_prefix": Step(_slice_after_prefix, "missing_prefix"),
    "remove_quotations": Step(lambda df, ctx: _modify(df, ctx, text.remove_quotations), "empty"),
    "remove_lines": Step(lambda df, ctx: _modify(
        df, ctx, lambda s: text.remove_lines(s, ctx.preset.lines_to_remove)), "empty"),
    "format_diverse_qa": Step(_format_diverse_qa, "empty_parse"),
    "format_knowledge_list": Step(lambda df, ctx: _modify(df, ctx, text.format_knowledge_list),
                                  "empty_parse"),
    "join_segments": Step(_join_segments, None),
    "drop_too_short": Step(_drop_too_short, "too_short"),
}


def resolve_steps(steps) -> list[tuple[str, Callable, str | None]]:
    """(name, fn(df, ctx), reason) for each step; raises ValueError for an unknown step name."""
    resolved = []
    for step in steps:
        if isinstance(step, str):
            if step not in POSTPROCESS_STEPS:
                raise ValueError(f"unknown post-processing step {step!r}; built-in steps: "
                                 f"{', '.join(POSTPROCESS_STEPS)} (or pass a function df -> df)")
            resolved.append((step, POSTPROCESS_STEPS[step].fn, POSTPROCESS_STEPS[step].reason))
        elif callable(step):
            name = getattr(step, "__name__", type(step).__name__)
            resolved.append((name, lambda df, ctx, f=step: f(df), name))
        else:
            raise ValueError(f"post-processing step {step!r} is neither a step name nor a function")
    return resolved


def _with_reason(df, reason: str):
    out = df.copy()
    out[REJECT_REASON] = series_like([reason] * len(df), df)
    return out


def postprocess_partition(df, preset: TaskPreset, tokenizer=None, id_field: str = "id",
                          seed: int = 0, return_rejects: bool = False):
    """Run the task's post-processing chain on one partition of generated rows.

    Reads the task's output field (and ``llm_error``/``llm_finish_reason`` when present); rewrites
    the output field and adds ``response_token_count`` and ``output_token_count``. Returns the kept
    rows, or (kept, rejects) with ``return_rejects``; rejects carry ``reject_reason``.
    """
    ctx = ChainContext(preset, load_tokenizer(tokenizer), id_field, seed)
    live = df.reset_index(drop=True)
    live[ROW] = series_like(list(range(len(live))), live, dtype="int64")
    rejects = []
    for name, fn, reason in resolve_steps(preset.postprocess_steps):
        out = fn(live, ctx)
        if reason is not None and len(out) < len(live):
            removed = live[~live[ROW].isin(out[ROW])]
            rejects.append(_with_reason(removed, reason))
        live = out
    kept = live.drop(columns=[ROW]).reset_index(drop=True)
    if not return_rejects:
        return kept
    if rejects:
        rejected = concat(rejects, df).drop(columns=[ROW]).reset_index(drop=True)
    else:
        rejected = _with_reason(df.iloc[:0], "")
    return kept, rejected
