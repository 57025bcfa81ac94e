"""Writing files so that a crash never leaves half a file under its final name: a temporary
name unique across hosts, fsync, a rename (one PUT on an object store), and errors that name
the path."""

from __future__ import annotations

import contextlib
import hashlib
import io as io_module
import json
import os
import secrets
import socket
from pathlib import Path

from nemocc_dask.io import storage
from nemocc_dask.io import types as input_types


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file or object, read in 1 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


TMP_SUFFIX = ".nemocc-tmp"


def temp_name(path: Path) -> Path:
    """A temporary name beside ``path``, unique across hosts and processes (host, pid, random)."""
    host = socket.gethostname().split(".")[0]
    return path.with_name(f".{path.name}.{host}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def naming(path):
    """Name ``path`` in an OSError that names no file (a full disk, an I/O error), so that the
    message says where."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        if exc.errno is None:  # e.g. pyarrow's, with the errno in its text
            raise type(exc)(f"{exc} (writing {path})") from exc
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and a rename (on an object
    store: one PUT)."""
    with naming(path):
        if storage.is_remote(path):
            path.write_bytes(data)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(path)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def atomic_write_parquet(frame, path: Path, types: dict[str, str] | None = None) -> None:
    """Write a pandas/cuDF frame as parquet (its input columns in the run's ``types``, see
    ``input_types.as_written``) via a temporary file, fsync and a rename (on an object store:
    serialised in memory, then one PUT)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with naming(path):
        table = frame.to_arrow(preserve_index=False) if hasattr(frame, "to_arrow") else \
            pa.Table.from_pandas(frame, preserve_index=False)
        table = input_types.as_written(table, types)
        if storage.is_remote(path):
            buffer = io_module.BytesIO()
            pq.write_table(table, buffer)
            path.write_bytes(buffer.getvalue())
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(path)
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def remove_stale_temps(folder: Path) -> int:
    """Delete temporary files left under ``folder`` by killed writers; returns how many.

    Call only while holding the output folder's lock (no other writer can be running)."""
    removed = 0
    if not storage.is_remote(folder) and folder.exists():
        for tmp in folder.rglob(f".*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def digest(obj) -> str:
    """sha256 of the JSON form of ``obj`` (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
