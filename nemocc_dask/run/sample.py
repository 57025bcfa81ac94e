"""What ``plan`` measures on a worker, one input partition at a time: the exact requests and prompt
tokens a partition makes (``count_partition``: route, preprocess, prompts; nothing sent), and a
probe (``probe_partition``: the first requests of the partition sent and journaled, so that the
run reuses them, then post-processed to measure answer length, rows kept and bytes per row).
"""

from __future__ import annotations

import io as bytes_io
import time
from collections import Counter

from nemocc_dask.io.frames import to_host_list
from nemocc_dask.recipe.stages.postprocess import REJECT_REASON, postprocess_partition
from nemocc_dask.recipe.stages.preprocess import preprocess_partition, timed
from nemocc_dask.recipe.stages.route import route_partition
from nemocc_dask.recipe.tokenizer import load_tokenizer
from nemocc_dask.run.generate import PLAN_TAG, Journal, build_prompts, generate_partition
from nemocc_dask.run.partition_job import PartitionPlan, finished_stats, journal_path


def _segments(df, plan: PartitionPlan, seconds: dict):
    """(routed rows, segments) of one input partition, preprocessing timed into ``seconds``."""
    routed, _ = route_partition(df, plan.route)
    load_tokenizer(plan.tokenizer)  # loaded once per process: not part of the timing
    with timed(seconds, "preprocess"):
        segments = preprocess_partition(routed, plan.preset, plan.tokenizer,
                                        plan.preset.input_field, plan.id_field)
    return routed, segments


def count_partition(df, index: int, plan: PartitionPlan) -> dict:
    """The requests partition ``index`` makes for ``plan``'s task, nothing sent: input rows,
    documents, segments, distinct requests and their prompt tokens, the longest prompt, rows not
    sent by reason, the per-document request counts' sum and sum of squares (for an interval),
    requests already answered in the output folder, and the preprocessing seconds."""
    seconds: dict[str, float] = {}
    routed, segments = _segments(df, plan, seconds)
    prompts = build_prompts(segments, plan.preset, plan.llm, load_tokenizer(plan.tokenizer),
                            plan.llm.max_model_len)
    per_document = Counter()
    for doc_id, key in zip(to_host_list(segments[plan.id_field]), prompts.row_keys):
        per_document[doc_id] += key in prompts.requests
    documents = set(to_host_list(routed[plan.id_field]))
    counts = [per_document.get(doc_id, 0) for doc_id in documents]
    done = finished_stats(plan.out_dir, index)
    if done is not None:
        answered = len(prompts.requests)
    else:
        known = Journal(journal_path(plan.out_dir, index)).load()
        answered = sum(1 for key in prompts.requests if key in known
                       and not known[key].get("error"))
    return {"partition": index, "input_rows": len(df), "documents": len(documents),
            "segments": len(segments), "requests": len(prompts.requests),
            "prompt_tokens": sum(prompts.prompt_tokens.values()),
            "max_prompt_tokens": max(prompts.prompt_tokens.values(), default=0),
            "not_sent": dict(Counter(k.split(":", 1)[0] for k in prompts.row_keys
                                     if k not in prompts.requests)),
            "requests_per_document": [sum(counts), sum(c * c for c in counts)],
            "answered": answered, "preprocess_seconds": seconds.get("preprocess", 0.0)}


def _unanswered_rows(row_keys: list[str], sendable: set, answered: dict, requests: int) -> list:
    """Positions of the rows holding the first ``requests`` distinct sendable requests that the
    journal (``answered``) does not hold yet."""
    chosen: set = set()
    rows = []
    for row, key in enumerate(row_keys):
        if key in sendable and key not in answered and (key in chosen or len(chosen) < requests):
            chosen.add(key)
            rows.append(row)
    return rows


def _parquet_bytes(frame) -> int:
    """The size of ``frame`` written as parquet (0 for no rows)."""
    if not len(frame):
        return 0
    sink = bytes_io.BytesIO()
    (frame.to_pandas() if hasattr(frame, "to_pandas") else frame).to_parquet(sink, index=False)
    return sink.tell()


def probe_partition(df, index: int, plan: PartitionPlan, requests: int) -> dict:
    """Send the first ``requests`` distinct requests of partition ``index`` that its journal does
    not hold yet (journaled there, tagged as the plan's, so that the run reuses them),
    post-process their rows, and measure: each answer's arrival time, completion tokens per
    answer, rows kept and rejected by reason, parquet bytes of the kept and rejected rows,
    post-processing seconds."""
    seconds: dict[str, float] = {}
    _, segments = _segments(df, plan, seconds)
    tok = load_tokenizer(plan.tokenizer)
    prompts = build_prompts(segments, plan.preset, plan.llm, tok, plan.llm.max_model_len)
    path = journal_path(plan.out_dir, index)
    rows = _unanswered_rows(prompts.row_keys, set(prompts.requests), Journal(path).load(),
                            requests)
    picked = segments.iloc[rows]
    sent_at = time.time()
    generated, stats = generate_partition(picked, plan.preset, plan.llm, plan.tokenizer,
                                          journal_path=str(path), return_stats=True,
                                          answered_by=PLAN_TAG)
    records = Journal(path).load()
    keys = list(dict.fromkeys(prompts.row_keys[row] for row in rows))
    answered = [records[k] for k in keys if k in records]
    with timed(seconds, "postprocess"):
        kept, rejects = postprocess_partition(generated, plan.preset, tok, plan.id_field,
                                              plan.seed, return_rejects=True)
    return {"partition": index, "task": plan.preset.name, "sent_at": sent_at,
            "answer_times": sorted(float(r["at"]) for r in answered if not r.get("error")),
            "first_sent": min((float(r["at"]) - float(r.get("latency") or 0) for r in answered),
                              default=None),
            "answers": stats["requests"], "failed": stats["failed_requests"],
            "completion_tokens": [int(r["completion_tokens"]) for r in answered
                                  if r.get("completion_tokens") is not None],
            "rows_sent": len(rows), "rows_kept": len(kept),
            "rows_rejected": dict(Counter(to_host_list(rejects[REJECT_REASON]))),
            "kept_bytes": _parquet_bytes(kept), "rejected_bytes": _parquet_bytes(rejects),
            "rejected_rows": len(rejects),
            "postprocess_seconds": seconds.get("postprocess", 0.0)}
