"""Report aggregation and the accounting checks; what each document counts as."""

import pandas as pd

from nemocc_dask.run.partition_job import _document_outcomes
from nemocc_dask.run.report import aggregate, render_table


def _stats(**over):
    stats = {"input_rows": 10, "documents_in": 8, "documents_written": 6,
             "documents_not_written": {"too_short": 1, "llm_error": 1},
             "documents_invalid_quality": 1, "documents_other_route": 1, "segments": 12,
             "rows_written": 9, "requests": 12, "attempts": 14, "retries": 2,
             "failed_requests": 1, "recovered": 0, "retries_by_class": {"http_500": 2},
             "failed_by_class": {"http_400": 1}, "rows_rejected": {"llm_error": 1},
             "endpoints": {"http://a/v1": {"requests": 11, "errors": 3, "latency_sum": 2.2}}}
    stats.update(over)
    return stats


def test_partition_stats_add_up():
    report = aggregate([_stats(), _stats()], 2.0, expected_rows=20, expected_partitions=2)
    assert report["accounted"] and report["accounting_errors"] == []
    assert report["documents_in"] == 16 and report["retries_by_class"] == {"http_500": 4}
    assert report["endpoints"]["http://a/v1"] == {"requests": 22, "errors": 6,
                                                  "mean_latency_s": 0.2}
    assert "retried on: http_500" in render_table(report)


def test_missing_rows_or_partitions_are_not_accounted():
    short = aggregate([_stats()], 1.0, expected_rows=20, expected_partitions=2)
    assert not short["accounted"]
    assert any("expected 2" in e for e in short["accounting_errors"])
    assert any("input has 20" in e for e in short["accounting_errors"])
    assert "NOT ACCOUNTED" in render_table(short)
    lost = aggregate([_stats(documents_written=5)], 1.0)
    assert not lost["accounted"] and "documents in = 8" in lost["accounting_errors"][0]


def test_document_outcomes_count_every_id_once():
    dropped = pd.DataFrame({"id": [3], "reason": ["too_short_document"]})
    rejects = pd.DataFrame({"id": [2, 2, 4], "reject_reason": ["llm_error", "incomplete_document",
                                                             "too_long"]})
    written, reasons = _document_outcomes([1, 1, 2, 3, 4, 5], dropped, {1}, rejects, "id")
    assert written == 1
    assert reasons == {"too_short_document": 1, "incomplete_document": 1, "too_long": 1,
                       "no_output": 1}
