"""One input partition, end to end, on a worker: route -> preprocess -> generate (journaled) ->
postprocess -> write rejects, the output part and stats, each atomically, in that order. The
stats are written last and record the part's size and sha256, so a partition is finished when
its stats exist and its part has that size (a part missing or cut short is redone); a rewrite
(``--retry-failed``) first deletes the stats, so a crash mid-rewrite leaves it unfinished. The
journal of a finished partition is kept compacted (gzip): a redo reuses every answer.

Output folder layout (one per task)::

    run.json                   fingerprint and settings of the run (no secrets)
    parts/part-00000.parquet   kept rows of input partition 0
    rejects/part-00000.parquet removed rows with ``reject_reason``
    stats/part-00000.json      the partition's counts (summed into report.json), the part's
                               size and sha256 (``nemocc-dask verify`` checks them)
    journal/part-00000.jsonl   answers received so far (reused after a crash); compacted to
                               part-00000.jsonl.gz once the part is written (a redo, or
                               --retry-failed resending the failed ones, reuses the rest)
    report.json                the run report
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from nemocc_dask.io import atomic_write_bytes, atomic_write_parquet, file_digest
from nemocc_dask.io.frames import concat, to_host_list
from nemocc_dask.io.storage import as_path, refresh
from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.recipe.presets import TaskPreset
from nemocc_dask.recipe.stages.postprocess import (REJECT_REASON, dropped_rejects,
                                                   postprocess_partition, reject_columns)
from nemocc_dask.recipe.stages.preprocess import preprocess_partition, timed
from nemocc_dask.recipe.stages.route import Route, route_partition
from nemocc_dask.run.generate import Journal, generate_partition

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class PartitionPlan:
    """Everything a worker needs to process and write one partition of one task (picklable)."""

    preset: TaskPreset
    llm: LLMConfig
    out_dir: str
    tokenizer: Any = None  # a spec for load_tokenizer, or a ServedTokenizer
    id_field: str = "id"
    seed: int = 0
    retry_failed: bool = False
    route: Route | None = None
    input_types: dict | None = None  # the run's type per input column (``input_types``)
    run_started: float | None = None  # when the run began (answers journaled since: this run's)


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def part_path(out_dir: str | Path, index: int) -> Path:
    return as_path(out_dir) / "parts" / f"{part_name(index)}.parquet"


def stats_path(out_dir: str | Path, index: int) -> Path:
    return as_path(out_dir) / "stats" / f"{part_name(index)}.json"


def journal_path(out_dir: str | Path, index: int) -> Path:
    return as_path(out_dir) / "journal" / f"{part_name(index)}.jsonl"


def read_stats(out_dir: str | Path, skip_unreadable: bool = False) -> list[dict]:
    """Every partition's stats in ``out_dir``, in partition order, from a fresh listing;
    ``skip_unreadable``: leave out one that cannot be read (while the run goes) instead of
    raising."""
    out = as_path(out_dir)
    refresh(out)
    stats = []
    for path in sorted((out / "stats").glob("*.json")):
        try:
            stats.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            if not skip_unreadable:
                raise
    return stats


def finished_stats(out_dir: str | Path, index: int) -> dict | None:
    """The stats of partition ``index`` if it is finished (its stats, written last, exist and
    its part has the size they record), else None: a part missing, cut short or grown is
    redone (from the partition's compacted journal: nothing is paid twice)."""
    stats, part = stats_path(out_dir, index), part_path(out_dir, index)
    if not stats.exists():
        return None
    try:
        done = json.loads(stats.read_text())
    except ValueError:  # not expected (atomic writes), but then it is not finished
        return None
    size = part.stat().st_size if part.exists() else None
    if size is None or size != done.get("part_bytes", size):
        logger.warning("%s is %s (its stats record %s bytes): the partition is redone from its "
                       "journal", part, "missing" if size is None else f"{size} bytes",
                       done.get("part_bytes"))
        return None
    return done


def _document_outcomes(input_ids: list, dropped: pd.DataFrame, kept_ids: set,
                       rejects: pd.DataFrame, id_field: str) -> tuple[int, Counter]:
    """(documents written, documents not written by reason); every input id is counted once.

    A document with no kept row is counted under the reason of its last reject row (the last
    step that removed it, e.g. ``incomplete_document`` after one segment's ``llm_error``)."""
    reasons = Counter()
    dropped_ids = dict(zip(dropped["id"], dropped["reason"]))
    reject_reason = dict(zip(rejects[id_field].tolist(), rejects[REJECT_REASON].tolist()))
    written = 0
    for doc_id in set(input_ids):
        if doc_id in kept_ids:
            written += 1
        elif doc_id in dropped_ids:
            reasons[dropped_ids[doc_id]] += 1
        else:
            reasons[reject_reason.get(doc_id, "no_output")] += 1
    return written, reasons


def process_partition(df, index: int, plan: PartitionPlan, redo: bool = False) -> dict:
    """Process input partition ``index`` and write its files; returns its stats (also written to
    ``stats/part-NNNNN.json``). A finished partition is returned as it is unless ``redo`` (then
    its stats are deleted first and every file is rewritten; failed requests are resent when
    the plan says ``retry_failed``)."""
    out = as_path(plan.out_dir)
    if not redo:
        done = finished_stats(out, index)
        if done is not None:
            return done
    stats_path(out, index).unlink(missing_ok=True)
    started = time.time()
    routed, invalid_quality = route_partition(df, plan.route)
    seconds: dict[str, float] = {}
    segments, dropped = preprocess_partition(routed, plan.preset, plan.tokenizer,
                                             plan.preset.input_field, plan.id_field,
                                             return_dropped=True, timings=seconds)
    with timed(seconds, "generate"):
        generated, gen_stats = generate_partition(
            segments, plan.preset, plan.llm, plan.tokenizer,
            journal_path=str(journal_path(out, index)),
            retry_failed=plan.retry_failed, return_stats=True, run_started=plan.run_started)
    with timed(seconds, "postprocess"):
        kept, rejects = postprocess_partition(generated, plan.preset, plan.tokenizer,
                                              plan.id_field, plan.seed, return_rejects=True)
    input_ids = to_host_list(routed[plan.id_field])
    written, not_written = _document_outcomes(
        input_ids, dropped, set(to_host_list(kept[plan.id_field])),
        rejects.to_pandas() if hasattr(rejects, "to_pandas") else rejects, plan.id_field)
    if len(dropped):  # which documents were lost before generation, and why, is in rejects/
        rejects = concat([rejects, dropped_rejects(routed, dropped, plan.id_field,
                                                   reject_columns(generated))], rejects)
    stats = {
        "partition": index, "task": plan.preset.name, "finished_at": time.time(),
        "input_rows": len(df),
        "documents_in": len(set(input_ids)), "documents_written": written,
        "documents_not_written": dict(not_written), "documents_invalid_quality": invalid_quality,
        "documents_other_route": len(df) - len(routed) - invalid_quality,
        "segments": len(segments), "rows_written": len(kept),
        "rows_rejected": dict(Counter(to_host_list(rejects[REJECT_REASON]))),
        "requests": gen_stats["requests"], "attempts": gen_stats["attempts"],
        "retries": gen_stats["retries"], "reused_answers": gen_stats["reused_answers"],
        "lost_attempt_answers": gen_stats["lost_attempt_answers"],
        "plan_answers": gen_stats["plan_answers"],
        "journal_lines_skipped": gen_stats["journal_lines_skipped"],
        "duplicate_prompts": gen_stats["duplicate_prompts"],
        "failed_requests": gen_stats["failed_requests"], "recovered": gen_stats["recovered"],
        "failed_by_class": dict(gen_stats["failed_by_class"]),
        "retries_by_class": dict(gen_stats["retries_by_class"]),
        "prompt_tokens": int(pd.Series(to_host_list(generated["llm_prompt_tokens"]),
                                       dtype="Int64").sum()),
        "completion_tokens": int(pd.Series(to_host_list(generated["llm_completion_tokens"]),
                                           dtype="Int64").sum()),
        "endpoints": gen_stats["endpoints"], "seconds": round(time.time() - started, 3),
        "stage_seconds": {stage: round(t, 4) for stage, t in seconds.items()},
    }
    atomic_write_parquet(rejects, out / "rejects" / f"{part_name(index)}.parquet",
                         plan.input_types)
    atomic_write_parquet(kept, part_path(out, index), plan.input_types)
    stats["part_bytes"], stats["part_sha256"] = file_digest(part_path(out, index))
    # compacted before the stats mark the partition finished: a crash between the two redoes
    # it from the compacted journal (unpaid), and a finished partition never keeps chunks
    Journal(journal_path(out, index)).compact()  # a damaged part is redone from it, unpaid
    atomic_write_bytes(stats_path(out, index), json.dumps(stats, indent=1).encode())  # last
    return stats
