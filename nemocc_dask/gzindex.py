"""Random access into ``.jsonl.gz`` files, so that partition k does not decompress partitions 0..k-1.

The driver's one pass over a gzip file (which finds each partition's first line) reads it through
``indexed_gzip``, which records a seek point every ``SPACING`` decompressed bytes, and saves that
index to ``nemocc.gzip-index-dir`` (default: the system temp folder), named by the file's path, size
and modification time. A worker that finds the index seeks straight to its partition's first line
(at most ``SPACING`` bytes decompressed); one that does not (no shared index folder on a multi-node
cluster, ``indexed_gzip`` missing) decompresses from the start of the file, which is slower but gives
the same rows. On multi-node clusters point ``DASK_NEMOCC__GZIP_INDEX_DIR`` at a shared folder.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

import dask.config

SPACING = 32 * 1024 * 1024  # decompressed bytes between seek points (each costs 32 KiB of index)
READ_BUFFER = 1024 * 1024


def index_path(path: str | os.PathLike) -> Path:
    """Where the index of ``path`` (as it is now: size and mtime) is kept."""
    stat = os.stat(path)
    folder = dask.config.get("nemocc.gzip-index-dir", None) or os.path.join(
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


@contextlib.contextmanager
def open_at(path: str | os.PathLike, offset: int) -> Iterator[BinaryIO]:
    """``path`` decompressed and positioned at decompressed byte ``offset``: through the saved
    index when there is one, else by decompressing from the start."""
    igzip = _indexed_gzip()
    index = index_path(path) if igzip is not None and offset else None
    if index is not None and index.exists():
        raw = igzip.IndexedGzipFile(str(path), index_file=str(index))
        try:
            raw.seek(offset)
            yield io.BufferedReader(raw, buffer_size=READ_BUFFER)
        finally:
            raw.close()
        return
    with gzip.open(path, "rb") as fh:
        fh.seek(offset)
        yield fh
