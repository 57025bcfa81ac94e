"""Reading inputs (parquet or JSONL) into a Dask DataFrame with deterministic partitions, checking
them before any request is sent, and writing files atomically.

Partitions are explicit: a parquet file is cut at row-group boundaries into pieces of about
``rows_per_partition`` rows, a JSONL file into line ranges. The same input therefore always gives the
same partitions, which is what resuming relies on.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd

from nemocc_dask.stages.backend import to_host_list

DEFAULT_ROWS_PER_PARTITION = 2000
SAMPLE_PATH = Path(__file__).with_name("data") / "sample.parquet"


class InputError(ValueError):
    """The input cannot be used; the message names the file or column and what to do."""


@dataclass(frozen=True)
class Piece:
    """One partition of the input: a parquet row-group range or a JSONL line range."""

    path: str
    kind: str  # "parquet" or "jsonl"
    start: int
    stop: int


def _files(paths) -> list[Path]:
    files: list[Path] = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(p)
        if not path.exists():
            raise InputError(f"input path {str(path)!r} does not exist")
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and _kind(f) is not None)
            if not found:
                raise InputError(f"input folder {str(path)!r} holds no .parquet or .jsonl files")
            files.extend(found)
        elif _kind(path) is None:
            raise InputError(f"input file {str(path)!r} is neither .parquet nor .jsonl/.json")
        else:
            files.append(path)
    return files


def _kind(path: Path) -> str | None:
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() in (".parquet", ".pq"):
        return "parquet"
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson") or suffixes == ".jsonl.gz":
        return "jsonl"
    return None


def _parquet_pieces(path: Path, rows_per_partition: int) -> list[Piece]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as exc:
        raise InputError(f"cannot read parquet file {str(path)!r}: {exc}. Is it corrupt or still "
                         "being written?") from None
    pieces, start, rows = [], 0, 0
    for group in range(meta.num_row_groups):
        rows += meta.row_group(group).num_rows
        if rows >= rows_per_partition:
            pieces.append(Piece(str(path), "parquet", start, group + 1))
            start, rows = group + 1, 0
    if start < meta.num_row_groups or not pieces:
        pieces.append(Piece(str(path), "parquet", start, meta.num_row_groups))
    return pieces


def _nonblank_lines(path: str | Path) -> Iterator[str]:
    """The non-blank lines of a JSONL file (``.gz`` files are decompressed), read as UTF-8.

    Both the partitioning and the reading of JSONL go through this, so line numbers agree."""
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        yield from (line for line in fh if line.strip())


def _jsonl_pieces(path: Path, rows_per_partition: int) -> list[Piece]:
    lines = sum(1 for _ in _nonblank_lines(path))
    if lines == 0:
        return [Piece(str(path), "jsonl", 0, 0)]
    return [Piece(str(path), "jsonl", s, min(lines, s + rows_per_partition))
            for s in range(0, lines, rows_per_partition)]


def read_piece(piece: Piece) -> pd.DataFrame:
    """Load one partition into pandas."""
    if piece.kind == "parquet":
        import pyarrow.parquet as pq

        groups = list(range(piece.start, piece.stop))
        table = pq.ParquetFile(piece.path).read_row_groups(groups) if groups else \
            pq.read_schema(piece.path).empty_table()
        return table.to_pandas()
    rows = []
    for i, line in enumerate(itertools.islice(_nonblank_lines(piece.path), piece.stop)):
        if i >= piece.start:
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise InputError(f"{piece.path}: line {i + 1} is not valid JSON") from None
    return pd.DataFrame(rows)


def _meta(pieces: list[Piece]) -> pd.DataFrame:
    first = pieces[0]
    if first.kind == "parquet":
        import pyarrow.parquet as pq

        return pq.read_schema(first.path).empty_table().to_pandas()
    sample = read_piece(Piece(first.path, "jsonl", 0, min(first.stop, 100)))
    return sample.iloc[:0]


def read_input(paths, rows_per_partition: int = DEFAULT_ROWS_PER_PARTITION):
    """A Dask DataFrame over parquet/JSONL files or folders, one partition per ``Piece``.

    Raises InputError for a missing path, an unreadable/corrupt parquet file (named), or files
    whose columns differ.
    """
    import dask.dataframe as dd

    files = _files(paths)
    pieces: list[Piece] = []
    for f in files:
        pieces += (_parquet_pieces if _kind(f) == "parquet" else _jsonl_pieces)(f, rows_per_partition)
    meta = _meta(pieces)
    for f in files[1:]:
        other = _meta([Piece(str(f), _kind(f), 0, 100)])
        if set(other.columns) != set(meta.columns):
            raise InputError(f"input file {str(f)!r} has columns {list(other.columns)}, but "
                             f"{pieces[0].path!r} has {list(meta.columns)}; all inputs need the "
                             "same columns")
    return dd.from_map(read_piece, pieces, meta=meta, enforce_metadata=False)


def input_fingerprint(paths) -> list:
    """(path, size, mtime) of every input file: changes when an input changes."""
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in _files(paths)]


def check_ids(ddf, id_field: str) -> int:
    """Raise InputError if ids repeat within a partition (reads the id column only); returns the
    number of input rows."""
    import dask

    def summary(part):
        ids = pd.Series(to_host_list(part[id_field]), dtype="object")
        repeated = ids[ids.duplicated()]
        return pd.DataFrame({"rows": [len(ids)], "dupes": [len(repeated)],
                             "example": [str(repeated.iloc[0]) if len(repeated) else ""]})

    parts = ddf[[id_field]].map_partitions(
        summary, meta=pd.DataFrame({"rows": pd.Series([], dtype="int64"),
                                    "dupes": pd.Series([], dtype="int64"),
                                    "example": pd.Series([], dtype="object")}))
    table = dask.compute(parts)[0].reset_index(drop=True)
    bad = table[table["dupes"] > 0]
    if len(bad):
        row = bad.iloc[0]
        raise InputError(f"id column {id_field!r} has {int(bad['dupes'].sum())} duplicate id(s) "
                         f"within partition(s) {list(bad.index)[:10]} (e.g. {row['example']!r}); "
                         "ids must be unique per document. Pass another --id-field or deduplicate")
    return int(table["rows"].sum())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_parquet(frame, path: Path) -> None:
    """Write a pandas/cuDF frame as parquet via a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def digest(obj) -> str:
    """sha256 of the JSON form of ``obj`` (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
