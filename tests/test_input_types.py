"""Issue 24 items 7 and 8, issue 23 item 4: one type per input column for the whole run (parts read
back as one dataset), every unreadable input named with its file and line before anything is
deleted or sent, and errors of a full disk or a missing bucket that say where."""

from __future__ import annotations

import errno
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_docs

from nemocc_dask import io
from nemocc_dask.io.types import InputTypeError, as_read, as_written, decide, parse_casts
from nemocc_dask.testing.mock import MockLLMServer


def cli(*args):
    return [sys.executable, "-m", "nemocc_dask.cli", *args]


def run_cli(server, inp, out: Path, *extra, rows: int = 10):
    return subprocess.run(cli("run", "--task", "distill", "--input", str(inp), "--output",
                              str(out), "--base-url", server.base_url, "--model", "mock",
                              "--workers", "1", "--no-progress", "--rows-per-partition",
                              str(rows), *extra), capture_output=True, text=True, timeout=300)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# --- deciding the types ---------------------------------------------------------------------

def test_files_that_agree_after_widening_get_one_type():
    observed = [("a.parquet", {"id": "int32", "text": "string", "score": "null"}),
                ("b.parquet", {"id": "int64", "text": "large_string", "score": "double"}),
                ("c.jsonl (lines 1-10)", {"id": ["int"], "text": ["str"], "score": ["int"]})]
    assert decide(observed, "id", ("text",), {}) == {"id": "int64", "text": "large_string",
                                                     "score": "double"}
    nested = [("a.parquet", {"meta": "struct<url: string>", "tags": "list<element: null>"}),
              ("b.parquet", {"meta": "struct<url: string, n: int64>",
                             "tags": "list<element: string>"}),
              ("c.jsonl (lines 1-10)", {"meta": ["dict", "list"], "tags": ["list"]})]
    assert decide(nested, "id", ("text",), {}) == {"meta": "nested", "tags": "nested"}


def test_ids_of_different_types_are_refused_naming_both_files_unless_cast():
    observed = [("a.parquet", {"id": "int64"}), ("b.parquet", {"id": "string"})]
    with pytest.raises(InputTypeError, match=r"'id' is int64 in a.parquet but string in "
                                             r"b.parquet.*--cast id=string"):
        decide(observed, "id", (), {})
    assert decide(observed, "id", (), {"id": "string"}) == {"id": "string"}
    with pytest.raises(InputTypeError, match="several types"):
        decide([("x.jsonl (lines 1-5)", {"id": ["int", "str"]})], "id", (), {})


def test_a_text_column_that_holds_no_text_is_refused_and_mixed_jsonl_values_become_text():
    with pytest.raises(InputTypeError, match="text column 'body' holds int64"):
        decide([("x.jsonl (lines 1-5)", {"body": ["int"]})], "id", ("body",), {})
    assert decide([("x.jsonl", {"note": ["int", "str"]})], "id", (), {}) == {"note": "string"}


def test_casts_are_parsed_and_checked():
    assert parse_casts(["id=string", "score = double"]) == {"id": "string", "score": "double"}
    with pytest.raises(ValueError, match="COLUMN=TYPE"):
        parse_casts(["id"])
    with pytest.raises(ValueError, match="choose one of"):
        parse_casts(["id=date"])


def test_values_are_read_and_written_in_the_run_types():
    frame = pd.DataFrame({"id": [1, 2], "note": [3, "x"], "text": [5, "t"]})
    read = as_read(frame, {"id": "string", "note": "string", "text": "string"}, ("text",))
    assert read["id"].tolist() == ["1", "2"] and read["note"].tolist() == ["3", "x"]
    assert read["text"].tolist() == [5, "t"]  # kept: a number there is an invalid_text reject
    table = pa.table({"score": pa.array([None, None], pa.null()), "n": [1.0, None]})
    written = as_written(table, {"score": "double", "n": "int64"})
    assert str(written.schema.field("score").type) == "double"
    assert written.column("n").to_pylist() == [1, None]


# --- errors that name the file ---------------------------------------------------------------

def test_invalid_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"id": 1, "text": "ok"}\n{"id": 2, "text": "caf\xe9"}\n')
    with pytest.raises(io.InputError, match=r"docs.jsonl: line 2 is not valid UTF-8"):
        io.partition_map(path)


def test_a_truncated_gzip_file_says_so(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    data = gzip.compress(b"".join(json.dumps({"id": i, "text": "x" * 50}).encode() + b"\n"
                                  for i in range(2000)))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(io.InputError, match=r"docs.jsonl.gz: the gzip stream is truncated"):
        io.partition_map(path)


def test_a_line_that_is_not_an_object_names_the_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": 1, "text": "ok"}\nnull\n')
    with pytest.raises(io.InputError, match="non-blank line 2 is a JSON null, not an object"):
        io.read_piece(io.Piece(str(path), "jsonl", 0, 2))


def test_a_pretty_printed_json_file_is_told_to_be_jsonl(tmp_path):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"id": 1, "text": "ok"}], indent=2))
    with pytest.raises(io.InputError, match=r"line 1 is not valid JSON; .*pretty-printed.*"
                                            r"jq -c '\.\[\]'"):
        io.read_piece(io.Piece(str(path), "jsonl", 0, 4))


def test_a_write_on_a_full_disk_names_the_path(tmp_path):
    with pytest.raises(OSError, match=r"No space left on device: '/dev/full'"):
        with io.naming("/dev/full"), open("/dev/full", "w") as fh:
            fh.write("x")
            fh.flush()
    with pytest.raises(OSError, match="parts/p.parquet") as caught:
        with io.naming(tmp_path / "parts" / "p.parquet"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.errno == errno.ENOSPC


# --- end to end, as a user meets it -----------------------------------------------------------

def _corrupt_data_pages(path: Path) -> None:
    """Flip bytes inside the column chunks of a parquet file, leaving its footer intact."""
    column = pq.ParquetFile(path).metadata.row_group(0).column(1)  # text: its dictionary page
    start = column.dictionary_page_offset or column.data_page_offset
    end = column.data_page_offset if column.dictionary_page_offset else \
        start + column.total_compressed_size
    raw = bytearray(path.read_bytes())
    for i in range(start + 30, end - 4, 7):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


@pytest.mark.slow
def test_overwrite_reads_every_page_before_deleting_the_earlier_run(tmp_path):
    """Issue 23 item 4: a parquet input whose footer is intact but whose data pages are corrupt:
    --overwrite refuses with exit 2 naming the file, and the finished run is still there."""
    path = tmp_path / "docs.parquet"
    make_docs(20).to_parquet(path, index=False, compression="snappy")
    out = tmp_path / "out"
    with MockLLMServer() as server:
        assert run_cli(server, path, out).returncode == 0
        before = snapshot(out)
        _corrupt_data_pages(path)
        sent = server.stats.requests
        proc = run_cli(server, path, out, "--overwrite")
        assert server.stats.requests == sent
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(r"error: cannot read rows (0-10|10-20) of \S*docs.parquet: OSError: Corrupt",
                     proc.stderr), proc.stderr[-3000:]
    assert snapshot(out) == before


@pytest.mark.slow
def test_files_that_disagree_on_types_give_one_dataset_or_a_clear_refusal(tmp_path):
    """Issue 24 item 7: ids int64 in one file and strings in another are refused naming both
    files (exit 2, nothing sent); with --cast id=string the run writes parts that read back as
    one dataset. A JSONL column missing in one piece and int in another is int64 everywhere."""
    folder = tmp_path / "in"
    folder.mkdir()
    first, second = make_docs(20), make_docs(20, start=100)
    first["score"] = None  # null in the first file: says nothing about its type
    second["score"] = range(20)
    second["id"] = second["id"].map(lambda i: f"doc-{i}")
    first.to_parquet(folder / "a.parquet", index=False)
    second.to_parquet(folder / "b.parquet", index=False)
    jsonl = tmp_path / "docs.jsonl"
    with jsonl.open("w") as fh:
        for i, row in make_docs(30).iterrows():
            record = {"id": int(row["id"]), "text": row["text"]}
            if i >= 10:
                record["score"] = i
            fh.write(json.dumps(record) + "\n")
    with MockLLMServer() as server:
        refused = run_cli(server, folder, tmp_path / "out")
        assert refused.returncode == 2 and server.stats.requests == 0
        assert "'id' is int64 in" in refused.stderr and "a.parquet" in refused.stderr \
            and "b.parquet" in refused.stderr and "--cast id=string" in refused.stderr
        assert not (tmp_path / "out").exists()
        cast = run_cli(server, folder, tmp_path / "out", "--cast", "id=string")
        assert cast.returncode == 0, cast.stderr[-3000:]
        from_jsonl = run_cli(server, jsonl, tmp_path / "out-jsonl")
        assert from_jsonl.returncode == 0, from_jsonl.stderr[-3000:]
    parts = pd.read_parquet(tmp_path / "out" / "parts")
    assert set(parts["id"].map(type)) == {str} and "doc-105" in set(parts["id"])
    for part in (tmp_path / "out" / "parts").glob("*.parquet"):  # null in a.parquet's parts too
        assert str(pq.read_schema(part).field("score").type) == "int64"
    assert parts["score"].dropna().tolist() and parts["score"].dropna().max() <= 19
    rejects = pd.read_parquet(tmp_path / "out" / "rejects")  # same types in rejects/
    assert set(rejects["id"].map(type)) <= {str}
    parts = pd.read_parquet(tmp_path / "out-jsonl" / "parts")
    for part in (tmp_path / "out-jsonl" / "parts").glob("*.parquet"):
        assert str(pq.read_schema(part).field("score").type) == "int64"
    assert parts["score"].dropna().astype(int).min() >= 10


@pytest.mark.slow
def test_bad_bytes_and_a_missing_bucket_are_exit_2_naming_where(tmp_path):
    """Issue 24 item 8, as a user meets it on the command line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": 1, "text": "ok"}\n' * 3 + b'{"id": 9, "text": "\xff\xfe"}\n')
    with MockLLMServer() as server:
        proc = run_cli(server, bad, tmp_path / "out")
        assert proc.returncode == 2 and "bad.jsonl: line 4 is not valid UTF-8" in proc.stderr
        assert server.stats.requests == 0


@pytest.mark.slow
def test_files_written_by_other_tools_are_read_as_the_documents_they_hold(tmp_path):
    """JSONL saved with a byte-order mark and CRLF line ends (and a lone surrogate escape, which
    becomes U+FFFD), empty and blank JSONL shards next to full ones, and a parquet file whose text is a pandas categorical (dictionary-encoded): every
    document is read, generated and accounted for, and the parts' text is plain text. A folder of
    empty JSONL files only is exit 2 saying there is nothing to do, before anything is sent."""
    folder = tmp_path / "in"
    folder.mkdir()
    docs = make_docs(12)
    with (folder / "a.jsonl").open("w", encoding="utf-8-sig", newline="") as fh:
        for _, row in docs.iloc[:6].iterrows():  # one text with half an emoji ("\\ud83d")
            text = row["text"] + (" \ud83d" if row["id"] == 2 else "")
            fh.write(json.dumps({"id": int(row["id"]), "text": text}) + "\r\n")
    (folder / "b.jsonl").write_bytes(b"")
    (folder / "c.jsonl").write_bytes(b"\n\r\n  \n")
    categorical = docs.iloc[6:][["id", "text"]].astype({"text": "category"})
    categorical.to_parquet(folder / "d.parquet", index=False)
    assert pa.types.is_dictionary(pq.read_schema(folder / "d.parquet").field("text").type)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "only.jsonl").write_bytes(b"\n\n")
    with MockLLMServer() as server:
        proc = run_cli(server, folder, tmp_path / "out", rows=4)
        assert proc.returncode == 0, proc.stderr[-3000:]
        sent = server.stats.requests
        nothing = run_cli(server, empty, tmp_path / "out-empty")
        assert server.stats.requests == sent
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["documents_in"] == 12 and report["accounted"]
    parts = pd.read_parquet(tmp_path / "out" / "parts")
    rejects = pd.read_parquet(tmp_path / "out" / "rejects")
    assert len(parts) > 0
    assert sorted(set(parts["id"]) | set(rejects["id"])) == list(range(12))  # every document
    assert all(isinstance(text, str) for text in parts["text"])
    for part in (tmp_path / "out" / "parts").glob("*.parquet"):
        assert str(pq.read_schema(part).field("text").type) in ("string", "large_string")
    assert nothing.returncode == 2 and "holds no documents" in nothing.stderr \
        and "only.jsonl" in nothing.stderr


@pytest.mark.slow
def test_nested_and_decimal_columns_are_kept_as_json_text_in_every_part(tmp_path):
    """Metadata beside the text (parquet structs, lists and decimals; JSONL objects and arrays)
    reaches the parts as JSON text that loads back to the values, one string type in every part
    (Dask's string conversion wrote them as Python reprs; a list empty in one partition and not
    in another would otherwise give parts that do not read back as one dataset)."""
    import decimal

    folder = tmp_path / "in"
    folder.mkdir()
    docs = make_docs(8)
    meta = [{"url": f"https://example.org/{i}", "tags": ["a", "b"][: i % 3] if i > 3 else []}
            for i in range(8)]
    for name, rows in (("a", slice(0, 4)), ("b", slice(4, 8))):  # tags: list<null> in a
        pq.write_table(pa.table({
            "id": docs["id"][rows], "text": docs["text"][rows], "meta": pa.array(meta[rows]),
            "price": pa.array([decimal.Decimal(f"{i}.25") for i in range(8)][rows],
                              pa.decimal128(10, 2))}), folder / f"{name}.parquet")
    assert pq.read_schema(folder / "a.parquet").field("meta").type != \
        pq.read_schema(folder / "b.parquet").field("meta").type
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": int(i), "text": t, "meta": m}) + "\n"
                             for i, t, m in zip(docs["id"], docs["text"], meta)))
    with MockLLMServer() as server:
        for source, out in ((folder, "out"), (jsonl, "out-jsonl")):
            proc = run_cli(server, source, tmp_path / out, rows=2)
            assert proc.returncode == 0, proc.stderr[-3000:]
    for out in ("out", "out-jsonl"):
        written = pd.concat([pd.read_parquet(tmp_path / out / "parts"),
                             pd.read_parquet(tmp_path / out / "rejects")])
        assert written["id"].nunique() == 8
        for ident, text in zip(written["id"], written["meta"]):
            assert json.loads(text) == meta[int(ident)]
        for part in (tmp_path / out / "parts").glob("*.parquet"):
            assert str(pq.read_schema(part).field("meta").type) in ("string", "large_string")
    prices = pd.read_parquet(tmp_path / "out" / "parts")[["id", "price"]]
    assert all(price == f"{int(ident)}.25" for ident, price in zip(prices["id"], prices["price"]))
