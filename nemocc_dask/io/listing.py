"""Which files an input names: files, folders (searched recursively) and local glob patterns,
each checked to exist and to be parquet or JSONL, in a fixed order."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from nemocc_dask.errors import StartError
from nemocc_dask.io import storage


class InputError(StartError, ValueError):
    """The input cannot be used; the message names the file or column and what to do."""


def _expanded(paths) -> list:
    """``paths`` with each local glob pattern (``data/*.parquet``, ``data/**/*.jsonl``) replaced
    by the folders and input files it matches, sorted (other files left out); InputError for a
    pattern that matches none."""
    expanded = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        text = str(p)
        if storage.is_remote(storage.as_path(p)) or not any(c in text for c in "*?[") \
                or os.path.exists(text):
            expanded.append(p)
            continue
        matches = [m for m in sorted(glob.glob(text, recursive=True))
                   if os.path.isdir(m) or file_kind(Path(m)) is not None]
        if not matches:
            raise InputError(f"input pattern {text!r} matches no .parquet or .jsonl file (nor a "
                             "folder)")
        expanded += matches
    return expanded


def input_files(paths) -> list[Path]:
    """The input files of ``paths`` (files, folders searched recursively, local glob
    patterns), in a fixed order."""
    files: list[Path] = []
    for p in _expanded(paths):
        path = storage.as_path(p)
        storage.require_bucket(path, "input path")
        if not path.exists():
            raise InputError(f"input path {str(path)!r} does not exist")
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and file_kind(f) is not None)
            if not found:
                raise InputError(f"input folder {str(path)!r} holds no .parquet or .jsonl files")
            files.extend(found)
        elif file_kind(path) is None:
            raise InputError(f"input file {str(path)!r} is neither .parquet nor .jsonl/.json")
        else:
            files.append(path)
    return files


def file_kind(path: Path) -> str | None:
    """``parquet`` or ``jsonl`` by the file's suffix (``.jsonl.gz`` too), or None."""
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() in (".parquet", ".pq"):
        return "parquet"
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson") or suffixes == ".jsonl.gz":
        return "jsonl"
    return None
