"""Where a run reads and writes: local paths, or any fsspec URL (``s3://``, ``gs://``, ``abfs://``,
``file://``) through universal_pathlib, which gives both the ``pathlib`` API.

Local files are written atomically (temporary name, fsync, rename, see ``io``). On an object store
each object is written in one PUT, which is atomic by itself, and nothing can be appended: the
answer journal is written there in chunks (see ``llm.generate.Journal``). Credentials come from the
backend's usual sources (environment, config files, instance roles) and are never logged or written.
"""

from __future__ import annotations

import contextlib

import os
import shutil
from pathlib import Path

from nemocc_dask.errors import ConfigError


def as_path(location) -> Path:
    """A ``pathlib.Path`` for a local path or ``file://`` URL, a ``UPath`` for other URLs."""
    if is_remote(location):
        return location
    text = os.fspath(location)
    if "://" not in text:
        return Path(text)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    try:
        from upath import UPath
    except ImportError:
        raise ConfigError(f"{text!r} is a URL: install universal_pathlib and the fsspec backend "
                          "for it (pip install 'nemocc_dask[s3]', '[gcs]' or '[azure]')") from None
    try:
        return UPath(text)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"cannot open {text!r}: {exc} (install the fsspec backend for this "
                          "protocol, e.g. s3fs for s3://, gcsfs for gs://, adlfs for abfs://)"
                          ) from None


def is_remote(path) -> bool:
    """Whether ``path`` is a UPath on a filesystem other than the local one."""
    return getattr(path, "protocol", "") not in ("", "file", "local")


def require_bucket(path, what: str) -> None:
    """ConfigError when ``path`` is on an object store whose bucket (container) does not exist
    or cannot be seen with these credentials; nothing for local paths."""
    if not is_remote(path):
        return
    bucket = path.path.split("/")[0]
    if not path.fs.exists(bucket):
        raise ConfigError(f"{what} {str(path)!r}: bucket {bucket!r} does not exist or these "
                          "credentials cannot see it; create it, or check the URL and the "
                          "credentials/endpoint settings (e.g. AWS_ENDPOINT_URL, AWS_PROFILE)")


def refresh(path) -> None:
    """Forget cached listings of a remote filesystem (other processes wrote to it meanwhile)."""
    if is_remote(path):
        path.fs.invalidate_cache()


def remove_tree(path) -> None:
    """Delete a file or a folder with everything in it; nothing if it does not exist. On an
    object store the listing is read afresh (a cached one can miss objects written since, and
    leave them behind)."""
    if is_remote(path):
        path.fs.invalidate_cache()
        with contextlib.suppress(FileNotFoundError):
            path.fs.rm(path.path, recursive=True)
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
