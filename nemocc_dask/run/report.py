"""The run report: partition stats summed into one JSON document and a printed table.

Every input row is accounted for: ``documents_in == documents_written + sum(documents_not_written)``
per task, ``documents_in + documents_invalid_quality + documents_other_route == input_rows``, and
the rows of all partitions add up to the input's row count. ``accounted`` records the check and
``accounting_errors`` says what did not add up (the runner then stops with an error).
"""

from __future__ import annotations

from collections import Counter

_SUMMED = ("input_rows", "documents_in", "documents_written", "documents_invalid_quality",
           "documents_other_route", "segments", "rows_written", "requests", "attempts", "retries",
           "reused_answers", "duplicate_prompts", "failed_requests", "recovered", "prompt_tokens",
           "completion_tokens", "journal_lines_skipped", "plan_answers")
_COUNTERS = ("documents_not_written", "rows_rejected", "failed_by_class", "retries_by_class")


def _sum_counts(items: list[dict]) -> dict:
    """The summed counts and the merged reason counters of partition stats or task reports."""
    out: dict = {k: sum(int(item.get(k, 0)) for item in items) for k in _SUMMED}
    for key in _COUNTERS:
        total = Counter()
        for item in items:
            total.update(item.get(key, {}))
        out[key] = dict(sorted(total.items()))
    seconds = Counter()
    for item in items:
        seconds.update(item.get("stage_seconds", {}))
    out["stage_seconds"] = {stage: round(t, 3) for stage, t in seconds.items()}
    return out


def accounting_errors(report: dict, expected_rows: int | None = None,
                      expected_partitions: int | None = None) -> list[str]:
    """What does not add up in a report (empty when every input row is accounted for)."""
    errors = []
    outcomes = report["documents_written"] + sum(report["documents_not_written"].values())
    if outcomes != report["documents_in"]:
        errors.append(f"documents written + not written = {outcomes}, but documents in = "
                      f"{report['documents_in']}")
    routed = (report["documents_in"] + report["documents_invalid_quality"]
              + report["documents_other_route"])
    if routed != report["input_rows"]:
        errors.append(f"documents in + invalid quality + other route = {routed}, but the "
                      f"partitions read {report['input_rows']} rows")
    if expected_partitions is not None and report["partitions"] != expected_partitions:
        errors.append(f"{report['partitions']} partitions finished, expected {expected_partitions}")
    if expected_rows is not None and report["input_rows"] != expected_rows:
        errors.append(f"the partitions read {report['input_rows']} rows, but the input has "
                      f"{expected_rows}")
    return errors


_THIS_RUN = ("requests", "attempts", "retries", "reused_answers", "failed_requests",
             "prompt_tokens", "completion_tokens", "journal_lines_skipped", "plan_answers")


def this_run(stats: list[dict], started: float, wall_seconds: float) -> dict:
    """What this run did (the partitions it finished since ``started``), apart from what earlier
    runs into the same folder did: requests, answers reused, tokens, wall time, throughput."""
    mine = [s for s in stats if float(s.get("finished_at", 0)) >= started]
    out = {key: sum(int(s.get(key, 0)) for s in mine) for key in _THIS_RUN}
    # answers an attempt of this run paid for and journaled before it died (a killed worker)
    # were reused by the attempt that finished: they are this run's requests, not earlier runs'
    lost = sum(int(s.get("lost_attempt_answers", 0)) for s in mine)
    out["requests"] += lost
    out["reused_answers"] -= lost
    out["requests_of_lost_attempts"] = lost
    out["reused_answers"] -= out["plan_answers"]  # the plan's probe paid them, not this run
    out["partitions"] = len(mine)
    out["wall_seconds"] = round(wall_seconds, 3)
    out["completion_tokens_per_second"] = (round(out["completion_tokens"] / wall_seconds, 1)
                                           if wall_seconds > 0 else 0.0)
    return out


def with_history(report: dict, previous: dict | None) -> dict:
    """``report`` (one run's ``this_run`` in it) with the runs before it: ``runs`` lists every
    run's ``this_run``; ``wall_seconds`` and ``completion_tokens_per_second`` are over all of
    them (the counts are the folder's, whichever run produced them)."""
    runs = list((previous or {}).get("runs", [])) + [report["this_run"]]
    report["runs"] = runs
    wall = sum(float(r.get("wall_seconds", 0)) for r in runs)
    report["wall_seconds"] = round(wall, 3)
    report["completion_tokens_per_second"] = (round(report["completion_tokens"] / wall, 1)
                                              if wall > 0 else 0.0)
    return report


def aggregate(stats: list[dict], wall_seconds: float, partitions_skipped: int = 0,
              expected_rows: int | None = None, expected_partitions: int | None = None) -> dict:
    """Sum partition stats into a report (tokens/s is completion tokens per wall-clock second),
    checking the counts against the input's row and partition counts when given."""
    report = _sum_counts(stats)
    # the answers of ``plan``'s probe were paid for this folder: requests, not reused answers
    report["requests"] += report["plan_answers"]
    report["reused_answers"] -= report["plan_answers"]
    endpoints: dict[str, dict] = {}
    for s in stats:
        for name, ep in s.get("endpoints", {}).items():
            agg = endpoints.setdefault(name, {"requests": 0, "errors": 0, "latency_sum": 0.0})
            for k in agg:
                agg[k] += ep[k]
    report["endpoints"] = {
        name: {"requests": ep["requests"], "errors": ep["errors"],
               "mean_latency_s": round(ep["latency_sum"] / ep["requests"], 4) if ep["requests"]
               else None}
        for name, ep in sorted(endpoints.items())}
    for s in sorted(stats, key=lambda s: s.get("finished_at", 0)):  # the latest one stays
        for name, ep in s.get("endpoints", {}).items():
            if ep.get("timeout_seconds") is not None:
                report["endpoints"][name]["timeout_seconds"] = ep["timeout_seconds"]
    report["partitions"] = len(stats)
    report["partitions_skipped"] = partitions_skipped
    report["wall_seconds"] = round(wall_seconds, 3)
    report["completion_tokens_per_second"] = (round(report["completion_tokens"] / wall_seconds, 1)
                                              if wall_seconds > 0 else 0.0)
    report["accounting_errors"] = accounting_errors(report, expected_rows, expected_partitions)
    report["accounted"] = not report["accounting_errors"]
    report["empty_input"] = report["documents_in"] == 0 and not report["documents_invalid_quality"]
    return report


def combine(reports: dict[str, dict]) -> dict:
    """A combined report of several tasks: each task's report plus totals of the summed counts."""
    totals = _sum_counts(list(reports.values()))
    # every task reads the whole input: its rows once, not once per task
    totals["input_rows"] = max((r.get("input_rows", 0) for r in reports.values()), default=0)
    totals["accounted"] = all(r.get("accounted", True) for r in reports.values())
    return {"tasks": reports, "total": totals}


def _rows(report: dict) -> list[tuple[str, str]]:
    rows = [("documents in", report["documents_in"]),
            ("documents written", report["documents_written"])]
    rows += [(f"  not written: {k}", v) for k, v in report["documents_not_written"].items()]
    if report.get("documents_invalid_quality"):
        rows.append(("documents with invalid quality", report["documents_invalid_quality"]))
    rows += [("segments", report["segments"]), ("requests sent", report["requests"]),
             ("  of which by plan's probe", report.get("plan_answers", 0)),
             ("retries", report["retries"]), ("reused answers (journal)", report["reused_answers"]),
             ("duplicate prompts (sent once)", report["duplicate_prompts"])]
    rows += [(f"  retried on: {k}", v) for k, v in report.get("retries_by_class", {}).items()]
    if report.get("recovered"):
        rows.append(("failed requests recovered (retry)", report["recovered"]))
    rows += [(f"  failed: {k}", v) for k, v in report["failed_by_class"].items()]
    rows += [(f"  filtered: {k}", v) for k, v in report["rows_rejected"].items()]
    rows += [("rows written", report["rows_written"]),
             ("prompt tokens", report["prompt_tokens"]),
             ("completion tokens", report["completion_tokens"])]
    if "wall_seconds" in report:
        rows += [("completion tokens/s", report["completion_tokens_per_second"]),
                 ("wall time (s)", report["wall_seconds"])]
    if "this_run" in report and len(report.get("runs", [])) > 1:
        mine = report["this_run"]
        rows += [("this run: requests sent", mine["requests"]),
                 ("this run: answers reused", mine["reused_answers"]),
                 ("this run: completion tokens/s", mine["completion_tokens_per_second"]),
                 ("this run: wall time (s)", mine["wall_seconds"])]
    rows += [(f"  in {stage} (worker-s)", t) for stage, t in report.get("stage_seconds", {}).items()]
    for name, ep in report.get("endpoints", {}).items():
        rows.append((f"endpoint {name}", f"{ep['requests']} ok, {ep['errors']} errors, "
                                         f"mean {ep['mean_latency_s']} s"))
    return [(k, str(v)) for k, v in rows]


def render_table(report: dict, title: str = "nemocc-dask run") -> str:
    """A two-column text table of the report."""
    rows = _rows(report)
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * (width + 16)] + [f"{k:<{width}}  {v:>12}" for k, v in rows]
    if report.get("empty_input"):
        lines.append("the input is empty: nothing to do")
    for error in report.get("accounting_errors", []):
        lines.append(f"NOT ACCOUNTED: {error}")
    return "\n".join(lines)
