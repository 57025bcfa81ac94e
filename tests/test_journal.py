"""The answer journal survives damage: a line torn inside a multi-byte character (as ENOSPC tears
them), invalid bytes, ``null``, a list, a record with a non-string key or no answer. Each is
skipped and counted, its request is sent again, and the rest is reused; never fatal."""

from __future__ import annotations

import pytest
from conftest import make_docs

from nemocc_dask import LLMConfig
from nemocc_dask.recipe.presets import PRESETS
from nemocc_dask.run.generate import generate_partition
from nemocc_dask.testing.mock import MockLLMServer

DAMAGE = [b'{"key": "\xc3', b"\xff\xfe not utf-8 at all", b"null", b"[1, 2]",
          b'{"key": 5, "text": "x", "error": null}', b'{"key": "k", "text": 3}']


def test_a_damaged_journal_costs_only_its_damaged_lines(tmp_path):
    docs = make_docs(12, paragraphs=1)
    journal = tmp_path / "part-00000.jsonl"
    with MockLLMServer(latency=0.001) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock")
        first, _ = generate_partition(docs, PRESETS["distill"], llm, journal_path=str(journal),
                                      return_stats=True)
        lines = journal.read_bytes().splitlines()
        assert len(lines) == 12
        # two answers lost to damage (one torn inside a UTF-8 character), junk lines between
        damaged = [lines[0][:-3] + "é".encode()[:1], *DAMAGE, *lines[2:]]
        journal.write_bytes(b"\n".join(damaged) + b"\n")
        before = server.stats.requests
        again, stats = generate_partition(docs, PRESETS["distill"], llm,
                                          journal_path=str(journal), return_stats=True)
    assert server.stats.requests - before == 2  # the two damaged answers, sent again
    assert stats["reused_answers"] == 10 and stats["journal_lines_skipped"] == 1 + len(DAMAGE)
    assert list(again["distill"]) == list(first["distill"])  # nothing else changed


def test_an_unreadable_journal_names_itself(tmp_path):
    journal = tmp_path / "part-00000.jsonl"
    journal.mkdir()  # not a file: reading it fails
    with MockLLMServer() as server, pytest.raises(OSError, match=str(journal)):
        generate_partition(make_docs(2), PRESETS["distill"],
                           LLMConfig(base_url=server.base_url, model="mock"),
                           journal_path=str(journal))


def test_compaction_keeps_every_record_on_a_line_of_its_own(tmp_path):
    """A finished partition's journal becomes one gzip file of one record per line (no blank
    lines), the live file goes, and compacting again (a redo) changes nothing."""
    import gzip

    from nemocc_dask.run.generate import Journal

    journal = Journal(tmp_path / "part-00000.jsonl")
    sink = journal.open()
    for i in range(4):
        sink.write(f'{{"key": "k{i}", "text": "a{i}"}}\n')
    sink.close()
    records = journal.load()
    journal.compact()
    lines = gzip.decompress(journal.compacted.read_bytes()).split(b"\n")
    assert lines[-1] == b"" and all(lines[:-1]) and len(lines) == 5
    assert not journal.path.exists() and Journal(journal.path).load() == records
    journal.compact()
    assert gzip.decompress(journal.compacted.read_bytes()).split(b"\n") == lines
