"""The few places where pandas and cuDF partitions need different code: host round trips.

Everything else in ``nemocc_dask.recipe.stages`` uses operations both libraries share. A step that must
run Python per row calls ``map_strings``/``to_host_list``, which move one column to the host once,
work on the whole batch and move the result back.
"""

from __future__ import annotations

from typing import Any, Callable

import pandas as pd
import pyarrow as pa

STRING_DTYPE = pd.StringDtype()


def is_cudf(obj: Any) -> bool:
    """True for cuDF DataFrames/Series (checked by module name, so cuDF is never imported here)."""
    return type(obj).__module__.split(".")[0] == "cudf"


def to_host_list(s) -> list:
    """The values of a pandas or cuDF Series as a Python list (one device-to-host copy)."""
    return s.to_arrow().to_pylist() if is_cudf(s) else s.tolist()


def series_like(values: list, like, dtype=STRING_DTYPE):
    """A Series of ``values`` with the index and backend of ``like`` (one host-to-device copy)."""
    if is_cudf(like):
        import cudf

        series = cudf.Series.from_arrow(pa.array(values, type=_arrow_type(dtype)))
        series.index = like.index
        return series
    return pd.Series(values, index=like.index, dtype=dtype)


def _arrow_type(dtype) -> pa.DataType:
    """The Arrow type of a pandas dtype; strings (object or StringDtype) map to ``pa.string()``
    (cuDF's string handling of pandas extension dtypes differs between releases; Arrow does not)."""
    dtype = pd.api.types.pandas_dtype(dtype)
    if dtype == object or isinstance(dtype, pd.StringDtype):
        return pa.string()
    return pa.from_numpy_dtype(getattr(dtype, "numpy_dtype", dtype))


def map_strings(s, fn: Callable[[str], str]):
    """Apply ``fn`` to every string of ``s`` in one host batch; non-strings become missing."""
    values = [fn(v) if isinstance(v, str) else None for v in to_host_list(s)]
    return series_like(values, s)


def frame_from_records(records: list[dict], like, columns: list[str]):
    """A DataFrame (same backend as ``like``) from row dicts, with the dtypes of ``like``."""
    host = pd.DataFrame.from_records(records, columns=columns) if records else None
    dtypes = like.dtypes.to_dict() if not is_cudf(like) else like.head(0).to_pandas().dtypes.to_dict()
    if host is None:
        host = pd.DataFrame({c: pd.Series([], dtype=dtypes.get(c, object)) for c in columns})
    else:
        host = host.astype({c: dtypes[c] for c in columns if c in dtypes}, errors="ignore")
    if is_cudf(like):
        import cudf

        return cudf.DataFrame.from_pandas(host)
    return host


def concat(frames: list, like):
    """Concatenate partitions of the backend of ``like`` (returns an empty copy of it if none)."""
    frames = [f for f in frames if f is not None]
    if not frames:
        return like.iloc[:0]
    if is_cudf(like):
        import cudf

        return cudf.concat(frames)
    return pd.concat(frames)
