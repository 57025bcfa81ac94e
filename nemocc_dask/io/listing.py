"""Which files an input names: files, folders (searched recursively) and local glob patterns,
each checked to exist and to be parquet or JSONL, in a fixed order."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from nemocc_dask.errors import StartError
from nemocc_dask.io import storage


GLOB_CHARS = "*?["


class InputError(StartError, ValueError):
    """The input cannot be used; the message names the file or column and what to do."""


def is_pattern(text: str) -> bool:
    """Whether an input is a local glob pattern: it has ``*``, ``?`` or ``[`` and names no
    existing path."""
    return any(c in text for c in GLOB_CHARS) and not os.path.exists(text)


def named_folder(path) -> Path | None:
    """The local folder an input names: a folder itself, or a pattern's folder (``data`` of
    ``data/*.parquet`` and of ``data/docs-*.parquet``); None for a file, a remote path or a
    pattern without one."""
    text = str(path)
    if is_pattern(text):
        root = text[:min(text.index(c) for c in GLOB_CHARS if c in text)]
        if not root:
            return None
        text = root if root.endswith(("/", os.sep)) else str(Path(root).parent)
    if storage.is_remote(storage.as_path(text)):
        return None
    folder = Path(text)
    return folder if folder.is_dir() else None


def _expanded(paths) -> list:
    """``paths`` with each local glob pattern (``data/*.parquet``, ``data/**/*.jsonl``) replaced
    by the folders and input files it matches, sorted (other files left out); InputError for a
    pattern that matches none."""
    expanded = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        text = str(p)
        if storage.is_remote(storage.as_path(p)) or not is_pattern(text):
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
