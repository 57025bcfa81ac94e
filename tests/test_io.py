"""Input partitioning: row ranges independent of row groups, reading only what a piece needs,
the run identity of an input, and atomic writes with unique temporary names."""

import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_docs

from nemocc_dask import io
from nemocc_dask.io import readers


@pytest.mark.parametrize("row_group_size", [None, 7, 25])
def test_parquet_pieces_are_row_ranges_whatever_the_row_groups(tmp_path, row_group_size):
    path = tmp_path / "docs.parquet"
    docs = make_docs(55)
    pq.write_table(pa.Table.from_pandas(docs, preserve_index=False), path,
                   row_group_size=row_group_size)
    pieces = io.partition_map(path, 20)
    assert [(p.start, p.stop) for p in pieces] == [(0, 20), (20, 40), (40, 55)]
    got = pd.concat([io.read_piece(p) for p in pieces], ignore_index=True)
    pd.testing.assert_frame_equal(got, docs)
    assert list(io.read_piece(pieces[1], ["id"]).columns) == ["id"]


def test_a_piece_reads_only_the_row_groups_it_overlaps(tmp_path, monkeypatch):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pandas(make_docs(100), preserve_index=False), path,
                   row_group_size=10)
    read = []
    original = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups",
                        lambda self, groups, **kw: (read.append(list(groups)),
                                                    original(self, groups, **kw))[1])
    frame = io.read_piece(io.Piece(str(path), "parquet", 25, 45))
    assert read == [[2, 3, 4]] and list(frame["id"]) == list(range(25, 45))


def test_one_row_group_file_gives_ceil_rows_over_rows_per_partition(tmp_path):
    path = tmp_path / "docs.parquet"
    make_docs(1500).to_parquet(path, index=False)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    assert io.read_input(path, 100).npartitions == 15


def test_run_identity_changes_with_the_partition_map(tmp_path):
    path = tmp_path / "docs.parquet"
    make_docs(60).to_parquet(path, index=False)
    at20 = io.input_fingerprint(path, io.partition_map(path, 20))
    at10 = io.input_fingerprint(path, io.partition_map(path, 10))
    assert at20["files"] == at10["files"] and at20["partitions"] != at10["partitions"]


def test_atomic_writes_use_unique_temp_names_and_stale_ones_are_removed(tmp_path):
    target = tmp_path / "parts" / "part-00000.parquet"
    names = {io.temp_name(target).name for _ in range(50)}
    assert len(names) == 50 and all(str(os.getpid()) in n for n in names)
    io.atomic_write_parquet(pd.DataFrame({"a": [1]}), target)
    io.atomic_write_bytes(tmp_path / "stats" / "s.json", b"{}")
    stale = io.temp_name(target)
    stale.write_bytes(b"torn")
    assert io.remove_stale_temps(tmp_path) == 1 and not stale.exists()
    assert pd.read_parquet(target)["a"].tolist() == [1]


def test_jsonl_pieces_read_only_their_own_bytes_once(tmp_path, monkeypatch):
    lines = [json.dumps({"id": i, "text": f"doc {i} é"}) for i in range(25)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines[:10]) + "\n\n \r\n" + "\r\n".join(lines[10:]) + "\n",
                    encoding="utf-8")
    pieces = io.partition_map(path, 10)
    assert [(p.start, p.stop) for p in pieces] == [(0, 10), (10, 20), (20, 25)]
    ranges = []
    original = readers._read_block

    def recording(path, offset, end):
        ranges.append((offset, end))
        return original(path, offset, end)

    monkeypatch.setattr(readers, "_read_block", recording)
    got = pd.concat([io.read_piece(p) for p in pieces], ignore_index=True)
    assert got["id"].tolist() == list(range(25)) and got["text"].iloc[3] == "doc 3 é"
    # one read per piece; together they cover the file once (blank lines go with a piece), but
    # for the newline before each piece's first line, read to check that it starts a line
    assert ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
    assert all(a[1] == b[0] + 1 for a, b in zip(ranges, ranges[1:]))


def test_a_jsonl_file_changed_after_partitioning_is_refused_not_misread(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": "x"}) + "\n" for i in range(20)))
    pieces = io.partition_map(path, 10)
    path.write_text("".join(json.dumps({"id": i, "text": "xy"}) + "\n" for i in range(20)))
    with pytest.raises(io.InputError, match="changed after it was partitioned"):
        io.read_piece(pieces[1])


def test_gzip_pieces_seek_through_the_index_built_by_the_partition_pass(tmp_path, monkeypatch):
    import gzip

    import dask

    from nemocc_dask.io import gzindex

    monkeypatch.setattr(gzindex, "SPACING", 64 * 1024)  # many seek points in a small file
    import hashlib

    lines = [json.dumps({"id": i, "text": hashlib.sha256(str(i).encode()).hexdigest() * 4})
             for i in range(30000)]  # 8 MB, hard to compress: several deflate blocks and points
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    with dask.config.set({"nemocc.gzip-index-dir": str(tmp_path / "index")}):
        pieces = io.partition_map(path, 3000)
        assert gzindex.index_path(path).exists()

        def no_decompressing_from_the_start(*args, **kwargs):
            raise AssertionError("a piece decompressed the file from its start")

        with monkeypatch.context() as patched:
            patched.setattr(gzindex.gzip, "open", no_decompressing_from_the_start)
            got = pd.concat([io.read_piece(p) for p in pieces[1:]], ignore_index=True)
        assert got["id"].tolist() == list(range(3000, 30000))
    # without the index (a worker that cannot see it) the same rows come back, just slower
    with dask.config.set({"nemocc.gzip-index-dir": str(tmp_path / "elsewhere")}):
        assert io.read_piece(pieces[-1])["id"].tolist() == list(range(27000, 30000))


def test_a_glob_pattern_reads_the_input_files_it_matches(tmp_path, monkeypatch):
    """``--input 'data/*.parquet'`` (as with Dask's readers): the matching files in order, other
    files a broad pattern matches left out, and a pattern matching none is an InputError."""
    data = tmp_path / "data"
    (data / "more").mkdir(parents=True)
    make_docs(4).to_parquet(data / "b.parquet", index=False)
    make_docs(4, start=10).to_parquet(data / "a.parquet", index=False)
    make_docs(4, start=20).to_parquet(data / "more" / "c.parquet", index=False)
    (data / "README.md").write_text("about the data\n")
    monkeypatch.chdir(tmp_path)
    files = [p.path for p in io.partition_map("data/*.parquet", 10)]
    assert [os.path.basename(f) for f in files] == ["a.parquet", "b.parquet"]
    everything = {os.path.basename(p.path) for p in io.partition_map("data/*", 10)}
    assert everything == {"a.parquet", "b.parquet", "c.parquet"}  # the folder, searched
    deep = [os.path.basename(p.path) for p in io.partition_map("data/**/c.parquet", 10)]
    assert deep == ["c.parquet"]
    with pytest.raises(io.InputError, match="'data/\\*.jsonl' matches no .parquet or .jsonl"):
        io.partition_map("data/*.jsonl", 10)
