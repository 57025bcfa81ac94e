"""Reading inputs (parquet or JSONL) into a Dask DataFrame with deterministic partitions.

Partitions are explicit: a parquet file is cut into row ranges of ``rows_per_partition`` rows
(whatever its row groups; a piece reads only the row groups it overlaps), a JSONL file into line
ranges found in one pass (each piece then reads its own byte range in one read, so reading a
plain JSONL file costs about two reads of it, whatever the number of partitions; for a
``.jsonl.gz`` file that pass also saves a seek index, see ``gzindex``). The same input and
``rows_per_partition`` always give the same partitions (the partition map, recorded in
``run.json``), which is what resuming relies on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io as io_module
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import pandas as pd

from nemocc_dask.io import gzindex, storage
from nemocc_dask.io import types as input_types
from nemocc_dask.io.listing import InputError, file_kind, input_files
from nemocc_dask.io.unicode import json_without_lone_surrogates, may_hold_surrogates

DEFAULT_ROWS_PER_PARTITION = 2000
SAMPLE_PATH = Path(__file__).parents[1] / "data" / "sample.parquet"


@dataclass(frozen=True)
class Piece:
    """One partition of the input: a parquet or JSONL row range ``[start, stop)`` of one file."""

    path: str
    kind: str  # "parquet" or "jsonl"
    start: int
    stop: int
    offset: int = 0  # JSONL: byte offset of the piece's first line
    end: int | None = None  # JSONL: byte offset just past its last line (None: count lines)


def _parquet_pieces(path: Path, rows_per_partition: int) -> list[Piece]:
    import pyarrow.parquet as pq

    try:
        with path.open("rb") as fh:
            rows = pq.ParquetFile(fh).metadata.num_rows
    except Exception as exc:
        raise InputError(f"cannot read parquet file {str(path)!r}: {exc}. Is it corrupt or still "
                         "being written?") from None
    if rows == 0:
        return [Piece(str(path), "parquet", 0, 0)]
    return [Piece(str(path), "parquet", s, min(rows, s + rows_per_partition))
            for s in range(0, rows, rows_per_partition)]


def plain_schema(schema):
    """``schema`` with dictionary-encoded columns (pandas categoricals, as written to parquet)
    as their value type: a categorical text column is text like any other."""
    import pyarrow as pa

    return pa.schema([f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f
                      for f in schema])


def _read_parquet_rows(path: str, start: int, stop: int, columns=None):
    """Rows ``[start, stop)`` of a parquet file as an Arrow table (dictionary columns decoded),
    reading only the row groups that overlap them."""
    import pyarrow.parquet as pq

    with storage.as_path(path).open("rb") as fh:
        handle = pq.ParquetFile(fh)
        groups, first_row, offset = [], None, 0
        for group in range(handle.metadata.num_row_groups):
            n = handle.metadata.row_group(group).num_rows
            if offset < stop and offset + n > start:
                groups.append(group)
                first_row = offset if first_row is None else first_row
            offset += n
        if not groups:
            table = handle.schema_arrow.empty_table().select(columns or handle.schema_arrow.names)
        else:
            table = handle.read_row_groups(groups, columns=columns)
            table = table.slice(start - first_row, stop - start)
    plain = plain_schema(table.schema)
    return table if plain.equals(table.schema) else table.cast(plain)


@contextlib.contextmanager
def _open_at(path: str | Path, offset: int) -> Iterator[BinaryIO]:
    """A JSONL file's bytes from (decompressed) byte ``offset`` on; a ``.gz`` file read from its
    start saves a seek index for the pieces that start later (see ``gzindex``)."""
    location = storage.as_path(path)
    if str(path).lower().endswith(".gz"):
        if storage.is_remote(location):  # no seek index there: decompress from the start
            with location.open("rb") as raw, gzip.GzipFile(fileobj=raw) as fh:
                fh.seek(offset)
                yield fh
            return
        with (gzindex.scan(path) if offset == 0 else gzindex.open_at(path, offset)) as fh:
            yield fh
        return
    with location.open("rb") as fh:
        fh.seek(offset)
        yield fh


def _nonblank(raw: bytes, path, where: str) -> str | None:
    """A JSONL line's text, or None when it is blank. Partitioning and reading both use this
    (split on ``\\n``, decoded as UTF-8), so they agree. InputError naming ``path`` and
    ``where`` (the line) for bytes that are not UTF-8."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: {where} is not valid UTF-8 (byte {exc.start} of the line: "
                         f"{raw[max(0, exc.start - 8):exc.start + 8]!r}); re-encode the file as "
                         "UTF-8 or remove the line") from None
    line = line.removeprefix("\ufeff")  # a byte-order mark (files saved by Windows tools)
    return line if line.strip() else None


@contextlib.contextmanager
def _decompressing(path):
    """Name ``path`` in errors of a damaged or truncated gzip stream."""
    import zlib

    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{path}: the gzip stream is truncated or corrupt ({exc}); the file was "
                         "probably cut short while copying: copy or compress it again") from None


def _nonblank_lines(path: str | Path, offset: int = 0,
                    read: list | None = None) -> Iterator[tuple[int, int, str]]:
    """(byte offset, end offset, text) of each non-blank line of a JSONL file from byte
    ``offset`` on (``.gz`` files are decompressed; their offsets count decompressed bytes).
    ``read``, if given, gets the offset reached at the end of the file."""
    with _decompressing(path), _open_at(path, offset) as fh:
        for number, raw in enumerate(fh, start=1):
            where = f"line {number}" if offset == 0 or number > 1 else f"the line at byte {offset}"
            line = _nonblank(raw, path, where)
            if line is not None:
                yield offset, offset + len(raw), line
            offset += len(raw)
    if read is not None:
        read.append(offset)


def _read_block(path: str, offset: int, end: int) -> bytes:
    """Bytes ``[offset, end)`` of a JSONL file, decompressed for ``.gz`` (through the seek
    index where there is one), in one read."""
    with _decompressing(path):
        if str(path).lower().endswith(".gz") and not storage.is_remote(storage.as_path(path)):
            return gzindex.read_range(path, offset, end - offset)
        with _open_at(path, offset) as fh:
            return fh.read(end - offset)


def _jsonl_pieces(path: Path, rows_per_partition: int) -> list[Piece]:
    """Line ranges of ``rows_per_partition`` non-blank lines, each with the byte range from its
    first line to its last: one pass over the file here, and each piece reads only its bytes."""
    pieces, count, end, read = [], 0, 0, []
    for offset, end, _ in _nonblank_lines(path, read=read):
        if count % rows_per_partition == 0:
            if pieces:
                pieces[-1] = dataclasses.replace(pieces[-1], end=offset)
            pieces.append(Piece(str(path), "jsonl", count, count, offset))
        count += 1
    if str(path).lower().endswith(".gz") and not storage.is_remote(path):
        with _decompressing(path):
            gzindex.check_complete(path, read[0])
    if not pieces:
        return [Piece(str(path), "jsonl", 0, 0)]
    pieces[-1] = dataclasses.replace(pieces[-1], end=end)
    return [dataclasses.replace(p, stop=min(count, p.start + rows_per_partition)) for p in pieces]


def _piece_lines(piece: Piece) -> Iterator[str]:
    """The texts of a JSONL piece's lines: its byte range in one read, or (without ``end``) its
    first ``stop - start`` non-blank lines."""
    if piece.end is None:
        for _, _, line in itertools.islice(_nonblank_lines(piece.path, piece.offset),
                                           piece.stop - piece.start):
            yield line
        return
    changed = InputError(f"{piece.path} changed after it was partitioned (lines "
                         f"{piece.start + 1}-{piece.stop} are not where they were); rerun")
    before = min(piece.offset, 1)  # the byte before the first line must end a line
    block = _read_block(piece.path, piece.offset - before, piece.end)
    if before and block[:1] != b"\n":
        raise changed
    count = 0
    for raw in io_module.BytesIO(memoryview(block)[before:]):
        line = _nonblank(raw, piece.path, f"non-blank line {piece.start + count + 1} (or the "
                                          "blank line after it)")
        if line is not None:
            count += 1
            yield line
    if count != piece.stop - piece.start:
        raise changed


def read_piece(piece: Piece, columns: list[str] | None = None,
               types: dict[str, str] | None = None,
               text_fields: tuple[str, ...] = ()) -> pd.DataFrame:
    """Load one partition into pandas (only ``columns`` when given; values in the run's
    ``types``, see ``input_types.as_read``). InputError naming the file and rows for data that
    cannot be read (corrupt pages, invalid JSON or UTF-8, a truncated gzip stream)."""
    try:
        frame = _read_rows(piece, columns)
        if types and columns is None and list(frame.columns) != list(types) \
                and set(frame.columns) <= set(types):  # the run's types: every column
            frame = frame.reindex(columns=list(types))  # JSONL keys missing in this piece
        return input_types.as_read(frame, types, text_fields)
    except InputError:
        raise
    except (ValueError, TypeError, OSError, EOFError) as exc:
        if storage.is_remote(storage.as_path(piece.path)) and not isinstance(exc, ValueError):
            raise  # a transfer error, not the data
        raise InputError(f"cannot read rows {piece.start}-{piece.stop} of {piece.path}: "
                         f"{type(exc).__name__}: {exc}. Is the file damaged? Replace it or "
                         "remove it from the input") from None


def _read_rows(piece: Piece, columns: list[str] | None) -> pd.DataFrame:
    if piece.kind == "parquet":
        return _read_parquet_rows(piece.path, piece.start, piece.stop, columns).to_pandas()
    rows = []
    for i, line in enumerate(_piece_lines(piece), start=piece.start):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            hint = ("; the file looks like one pretty-printed JSON document, but every line "
                    "must be one document (JSONL): convert it with jq -c '.[]'"
                    if i == 0 and line.strip() in ("[", "{") else "")
            raise InputError(f"{piece.path}: non-blank line {i + 1} is not valid JSON{hint}"
                             ) from None
        if may_hold_surrogates(line):
            row = json_without_lone_surrogates(row)
        if not isinstance(row, dict):
            kind = {"NoneType": "null", "list": "array", "str": "string", "bool": "boolean"}.get(
                type(row).__name__, "number")
            raise InputError(f"{piece.path}: non-blank line {i + 1} is a JSON {kind}, not an "
                             'object ({"id": ..., "text": ...}); every line must be one document')
        rows.append(row)
    frame = pd.DataFrame(rows)
    if columns is not None:
        missing = [c for c in columns if c not in frame.columns]
        return frame.reindex(columns=columns) if missing else frame[columns]
    return frame


def _meta(pieces: list[Piece]) -> pd.DataFrame:
    first = pieces[0]
    if first.kind == "parquet":
        import pyarrow.parquet as pq

        with storage.as_path(first.path).open("rb") as fh:
            return plain_schema(pq.read_schema(fh)).empty_table().to_pandas()
    sample = read_piece(Piece(first.path, "jsonl", 0, min(first.stop, 100)))
    return sample.iloc[:0]


def column_type(pieces: list[Piece], name: str) -> str:
    """The type of column ``name`` as stored: the parquet schema's (``string``, ``int64``,
    ``list<item: string>``...; ``null`` for a file without rows), or for JSONL the Python types
    of the first rows' values."""
    first = pieces[0]
    if first.kind == "parquet":
        import pyarrow.parquet as pq

        with storage.as_path(first.path).open("rb") as fh:
            meta = pq.ParquetFile(fh).metadata
            if not meta.num_rows:  # an empty file says nothing about its columns' content
                return "null"
            return str(plain_schema(meta.schema.to_arrow_schema()).field(name).type)
    sample = read_piece(Piece(first.path, "jsonl", 0, min(first.stop, 100)))[name]
    kinds = sorted({type(v).__name__ for v in sample if v is not None and v == v})
    return "string" if kinds in ([], ["str"]) else "/".join(kinds)


def file_identities(paths) -> list[list]:
    """(full name, size, modification time) of every input file: what a cached partition map
    or id check is valid for."""
    return [[_full_name(f), f.stat().st_size, _mtime(f)] for f in input_files(paths)]


def cached_pieces(cache: dict | None, identities: list, rows_per_partition: int):
    """The pieces a cache (``InputCache.read``) holds for these files and partition size, or
    None."""
    if not cache or cache.get("files") != identities \
            or cache.get("rows_per_partition") != rows_per_partition:
        return None
    return [Piece(**piece) for piece in cache["pieces"]]


def partition_map(paths, rows_per_partition: int = DEFAULT_ROWS_PER_PARTITION) -> list[Piece]:
    """The pieces (one per partition) of parquet/JSONL files or folders, in a fixed order.

    A JSONL file without a document is no partition (it has no columns to compare). Raises
    InputError for a missing path, an unreadable/corrupt parquet file (named), files whose
    columns differ, or JSONL input without any document.
    """
    if rows_per_partition < 1:
        raise InputError(f"rows_per_partition must be >= 1 (got {rows_per_partition})")
    found = [(f, (_parquet_pieces if file_kind(f) == "parquet" else _jsonl_pieces)(
        f, rows_per_partition)) for f in input_files(paths)]
    with_rows = [(f, p) for f, p in found if file_kind(f) == "parquet" or p[0].stop]
    if not with_rows:  # JSONL without a document has no columns to check or read
        raise InputError(f"the input holds no documents: its {len(found)} JSONL file(s) "
                         f"({', '.join(str(f) for f, _ in found[:3])}) have no non-blank line")
    files = [f for f, _ in with_rows]  # an empty JSONL file among others is no partition
    pieces = [piece for _, file_pieces in with_rows for piece in file_pieces]
    meta = _meta(pieces)
    for f in files[1:]:
        other = _meta([Piece(str(f), file_kind(f), 0, 100)])
        if set(other.columns) != set(meta.columns):
            raise InputError(f"input file {str(f)!r} has columns {list(other.columns)}, but "
                             f"{pieces[0].path!r} has {list(meta.columns)}; all inputs need the "
                             "same columns")
    return pieces


def frame_from_pieces(pieces: list[Piece], columns: list[str] | None = None,
                      types: dict[str, str] | None = None, text_fields: tuple[str, ...] = ()):
    """A Dask DataFrame with one partition per piece (only ``columns`` when given; values in
    the run's ``types``, see ``read_piece``). Columns keep the values pandas reads (Dask's
    ``convert-string`` is off for them: it would turn nested columns, dicts and lists, and
    decimals into their Python repr)."""
    import dask
    import dask.dataframe as dd

    meta = _meta(pieces)
    if types and set(meta.columns) <= set(types):
        meta = meta.reindex(columns=list(types))
    meta = input_types.as_read(meta, types, text_fields)
    if columns is not None:
        meta = meta[columns]
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_map(read_piece, pieces, columns=columns, types=types,
                           text_fields=tuple(text_fields), meta=meta, enforce_metadata=False)


def read_input(paths, rows_per_partition: int = DEFAULT_ROWS_PER_PARTITION):
    """A Dask DataFrame over parquet/JSONL files or folders, one partition per ``Piece``."""
    return frame_from_pieces(partition_map(paths, rows_per_partition))


def input_fingerprint(paths, pieces: list[Piece]) -> dict:
    """The run identity of an input: (path, size, mtime) of every file and the partition map
    (each piece's file and row range). Changes when an input file or the partitioning changes."""
    files = file_identities(paths)
    return {"files": files,
            "partitions": [[_full_name(storage.as_path(p.path)), p.kind, p.start, p.stop]
                           for p in pieces]}


def _full_name(path) -> str:
    return str(path) if storage.is_remote(path) else str(path.resolve())


def _mtime(path) -> int:
    stat = path.stat()
    return getattr(stat, "st_mtime_ns", None) or int(stat.st_mtime * 1e9)
