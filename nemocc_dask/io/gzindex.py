"""Random access into ``.jsonl.gz`` files, so that partition k does not decompress partitions 0..k-1.

The driver's one pass over a gzip file (which finds each partition's first line) reads it through
``indexed_gzip``, which records a seek point (with its 32 KiB window) every ``SPACING`` decompressed
bytes, and saves that index to ``nemocc.gzip-index-dir`` (default: the system temp folder), named by
the file's path, size and modification time. A worker that finds the index reads its point table,
takes the one point before its partition's first line (reading only that point's window) and seeks
from there: at most ``SPACING`` bytes (or one deflate block) decompressed per partition. One that
does not (no shared index folder on a multi-node cluster, ``indexed_gzip`` missing) decompresses
from the start of the file, which is slower but gives the same rows. On multi-node clusters point ``DASK_NEMOCC__GZIP_INDEX_DIR`` at a shared folder.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from nemocc_dask.config import setting

SPACING = 1024 * 1024  # decompressed bytes between seek points (each costs 32 KiB of index)
_HEADER = struct.Struct("<5sBBQQIII")  # magic, version, flags, sizes, spacing, window, points
_POINT = struct.Struct("<QQBB")  # compressed offset, decompressed offset, bits, has window
READ_BUFFER = 256 * 1024


def index_path(path: str | os.PathLike) -> Path:
    """Where the index of ``path`` (as it is now: size and mtime) is kept."""
    stat = os.stat(path)
    folder = setting("gzip-index-dir", None) or os.path.join(
        tempfile.gettempdir(), "nemocc-gzip-index")
    key = f"{os.path.abspath(path)}\x1f{stat.st_size}\x1f{stat.st_mtime_ns}"
    return Path(folder) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.gzidx"


def _indexed_gzip():
    try:
        import indexed_gzip

        return indexed_gzip
    except ImportError:
        return None


@contextlib.contextmanager
def scan(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """``path`` opened for one sequential read from the start; on a clean exit the seek points
    gathered on the way are saved for ``open_at``."""
    igzip = _indexed_gzip()
    if igzip is None:
        with gzip.open(path, "rb") as fh:
            yield fh
        return
    raw = igzip.IndexedGzipFile(str(path), spacing=SPACING)
    try:
        yield io.BufferedReader(raw, buffer_size=READ_BUFFER)
        target = index_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        raw.export_index(str(partial))
        os.replace(partial, target)
    finally:
        raw.close()


def check_complete(path: str | os.PathLike, size: int) -> None:
    """EOFError when the gzip file ``path``, read to its end as ``size`` decompressed bytes,
    stops before its stream does (a file cut short: indexed_gzip then just ends early). The
    trailer's size field says so at once for one-member files; otherwise (several members, or
    a mismatch) the file is decompressed once more with ``gzip``, which raises on a cut."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() < 18:
            raise EOFError("shorter than a gzip header and trailer")
        fh.seek(-4, os.SEEK_END)
        if int.from_bytes(fh.read(4), "little") == size % 2**32:
            return
    with gzip.open(path, "rb") as fh:
        while fh.read(1 << 22):
            pass


def _one_point_index(index: Path, offset: int) -> bytes | None:
    """An index holding only the start of the file and the last seek point at or before
    ``offset`` (read from the full index: its point table and one window); None if unreadable."""
    with open(index, "rb") as fh:
        header = fh.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return None
        magic, version, flags, csize, usize, spacing, window, count = _HEADER.unpack(header)
        if magic != b"GZIDX" or version != 1:
            return None
        points = [_POINT.unpack(fh.read(_POINT.size)) for _ in range(count)]
        if not points:  # a file too small (or too compressible) to have seek points
            return None
        best = max((i for i, p in enumerate(points) if p[1] <= offset), default=0)
        if best == 0 or not points[best][3]:  # within the first SPACING bytes
            return _HEADER.pack(magic, version, flags, csize, usize, spacing, window, 1) + \
                _POINT.pack(*points[0])
        fh.seek(_HEADER.size + count * _POINT.size
                + sum(p[3] for p in points[:best]) * window)
        data = fh.read(window)
    return (_HEADER.pack(magic, version, flags, csize, usize, spacing, window, 2)
            + _POINT.pack(*points[0]) + _POINT.pack(*points[best]) + data)


@contextlib.contextmanager
def _indexed_at(path: str | os.PathLike, offset: int):
    """``path`` as an IndexedGzipFile positioned at decompressed byte ``offset`` from the nearest
    seek point of the saved index; None when there is no index to use."""
    igzip = _indexed_gzip()
    index = index_path(path) if igzip is not None and offset else None
    small = _one_point_index(index, offset) if index is not None and index.exists() else None
    if small is None:
        yield None
        return
    with tempfile.NamedTemporaryFile(suffix=".gzidx") as tmp:
        tmp.write(small)
        tmp.flush()
        raw = igzip.IndexedGzipFile(str(path), index_file=tmp.name, drop_handles=False)
    try:
        raw.seek(offset)
        yield raw
    finally:
        raw.close()


@contextlib.contextmanager
def open_at(path: str | os.PathLike, offset: int) -> Iterator[BinaryIO]:
    """``path`` decompressed and positioned at decompressed byte ``offset``: from the nearest
    seek point of the saved index when there is one, else by decompressing from the start."""
    with _indexed_at(path, offset) as raw:
        if raw is not None:
            yield io.BufferedReader(raw, buffer_size=READ_BUFFER)
            return
    with gzip.open(path, "rb") as fh:
        fh.seek(offset)
        yield fh


def read_range(path: str | os.PathLike, offset: int, length: int) -> bytes:
    """``length`` decompressed bytes from ``offset`` on (fewer at the end of the file), read
    past the read-ahead buffer: only those bytes are decompressed after the seek point."""
    with _indexed_at(path, offset) as raw:
        if raw is None:
            with gzip.open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read(length)
        chunks, left = [], length
        while left > 0:
            chunk = raw.raw.read(left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
