"""The answer journal: a torn last line is ignored and does not swallow the next record; the
later record of a key wins (a retried failure replaced by its answer)."""

import json

from nemocc_dask.llm.generate import Journal


def test_torn_line_is_ignored_and_the_next_record_starts_on_its_own_line(tmp_path):
    path = tmp_path / "part-00000.jsonl"
    path.write_text(json.dumps({"key": "a", "text": "A"}) + "\n" + '{"key": "b", "te')
    journal = Journal(path)
    assert set(journal.load()) == {"a"}
    with journal.open() as sink:
        sink.write(json.dumps({"key": "c", "text": "C"}) + "\n")
    assert {k: r["text"] for k, r in journal.load().items()} == {"a": "A", "c": "C"}


def test_later_record_of_a_key_wins(tmp_path):
    journal = Journal(tmp_path / "j.jsonl")
    with journal.open() as sink:
        sink.write(json.dumps({"key": "a", "text": None, "error": "http_500: down"}) + "\n")
        sink.write(json.dumps({"key": "a", "text": "answer", "error": None}) + "\n")
    assert journal.load()["a"]["text"] == "answer" and journal.load()["a"]["error"] is None


def test_missing_journal_loads_empty(tmp_path):
    assert Journal(tmp_path / "none.jsonl").load() == {}
