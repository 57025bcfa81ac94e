"""One type per input column for the whole run, so that every part of the output reads back as one
dataset: decided once from what the files hold (parquet footers; the Python types of every JSONL
value, gathered by the input check), or declared by the user (``casts``), then applied to every
piece read and to every part and reject file written.

Types are Arrow type names (``int64``, ``double``, ``string``, ``bool``...). A column whose files
disagree is widened where nothing is lost (null to anything, narrower ints to int64, ints to
double, string to large_string, nested shapes to ``nested``: nested columns are written as their
JSON text); otherwise the run is refused naming the files, except for a JSONL column that mixes
text with other values outside the id column: it is kept as text. Mixed id types need a declared
cast (``--cast id=string``), because 1 and "1" are different ids.
"""

from __future__ import annotations

import json
import logging

import pandas as pd

from nemocc_dask.errors import StartError

logger = logging.getLogger(__name__)

STRING_LIKE = ("string", "large_string", "string_view")
_INTS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32")
_PYTHON = {"str": "string", "int": "int64", "float": "double", "bool": "bool"}
CASTABLE = ("string", "int64", "double")


class InputTypeError(StartError, ValueError):
    """Input columns whose types cannot be made one; the message names the files and column."""


def parse_casts(items) -> dict[str, str]:
    """``["id=string", ...]`` (or a dict) as {column: type}; ValueError for another form."""
    if isinstance(items, dict):
        casts = dict(items)
    else:
        casts = {}
        for item in items or ():
            column, sep, kind = str(item).partition("=")
            if not sep or not column:
                raise ValueError(f"--cast {item!r}: write COLUMN=TYPE, e.g. --cast id=string")
            casts[column.strip()] = kind.strip()
    for column, kind in casts.items():
        if kind not in CASTABLE:
            raise ValueError(f"cannot cast column {column!r} to {kind!r}: choose one of "
                             f"{', '.join(CASTABLE)}")
    return casts


def python_kinds(frame: pd.DataFrame) -> dict[str, list[str]]:
    """The Python type names of the non-missing values of each column of a JSONL piece."""
    return {str(name): sorted({type(v).__name__ for v in frame[name]
                               if v is not None and not (isinstance(v, float) and v != v)})
            for name in frame.columns}


def _from_python(names: set[str]) -> str | None:
    """The Arrow type for a set of Python type names, or None where they do not agree."""
    if not names:
        return "null"
    if names <= {"int", "float"}:
        return "double" if "float" in names else "int64"
    if names <= {"dict", "list"}:
        return "nested"
    if len(names) == 1:
        return _PYTHON.get(next(iter(names)), "nested")
    return None


def _widen(a: str, b: str) -> str | None:
    """The one type both ``a`` and ``b`` fit in without loss, or None."""
    if a == b or b == "null":
        return a
    if a == "null":
        return b
    if a in _INTS and b in _INTS:
        return "int64"
    if {a, b} <= set(_INTS) | {"double", "float"}:
        return "double"
    if a in STRING_LIKE and b in STRING_LIKE:
        return "large_string"
    if is_nested(a) and is_nested(b):  # written as JSON text whatever their shapes
        return "nested"
    return None


def decide(observed: list[tuple[str, dict]], id_field: str, text_fields: tuple[str, ...],
           casts: dict[str, str]) -> dict[str, str]:
    """The run's type per column from ``observed`` ((file, {column: Arrow type name or a list of
    JSONL Python type names}) per file or piece); ``casts`` win. Raises InputTypeError naming the
    files of a column whose types cannot be made one."""
    seen: dict[str, list[tuple[str, str]]] = {}
    warned: set[str] = set()
    for path, columns in observed:
        for name, kind in columns.items():
            arrow = _from_python(set(kind)) if isinstance(kind, list) else str(kind)
            if arrow is None and name not in casts and name != id_field:
                arrow = "string"  # JSONL text mixed with numbers: kept as text
                if name not in warned and name not in text_fields:
                    warned.add(name)
                    logger.warning("column %r of %s mixes %s values: it is written as text",
                                   name, path, "/".join(kind))
            if arrow is None:
                raise InputTypeError(
                    f"id column {name!r} of {path} holds values of several types "
                    f"({', '.join(kind)}); 1 and \"1\" would be different ids: declare one type (--cast "
                    f"{name}=string, casts={{{name!r}: 'string'}}) or fix the file")
            seen.setdefault(name, []).append((path, arrow))
    types: dict[str, str] = {}
    for name, found in seen.items():
        if name in casts:
            types[name] = casts[name]
            continue
        kind, first = found[0][1], found[0][0]
        for path, other in found[1:]:
            wider = _widen(kind, other)
            if wider is None:
                raise InputTypeError(
                    f"column {name!r} is {kind} in {first} but {other} in {path}; all input "
                    f"files must agree: declare one type (--cast {name}=string) or fix the files")
            kind = wider
        types[name] = kind
    for name in text_fields:
        if name in types:
            require_text(types[name], name)
    return types


def require_text(kind: str, name: str) -> None:
    """InputTypeError when column ``name`` (of type ``kind``: an Arrow type, or the Python types
    of a JSONL sample) cannot hold text (numbers, booleans, dates, lists): such a run would
    write no rows, or pay for prompts made of stringified lists."""
    if kind not in STRING_LIKE + ("null", "str", "object"):
        raise InputTypeError(f"text column {name!r} holds {kind}, not text; pass the column "
                             "with the documents' text (--text-field / text_field=)")


def as_read(frame: pd.DataFrame, types: dict[str, str] | None,
            text_fields: tuple[str, ...] = ()) -> pd.DataFrame:
    """``frame`` (one piece as read) with its values in the run's types where pandas would keep
    them apart: string columns hold only strings or missing values, declared casts applied.
    ``text_fields`` keep their values (a number there is an ``invalid_text`` reject)."""
    if not types:
        return frame
    out = frame
    for name, kind in types.items():
        if name in frame.columns and name not in text_fields:
            converted = _in_type(frame[name], kind)
            if converted is not None:
                out = frame.copy() if out is frame else out
                out[name] = converted
    return out


def is_nested(kind: str) -> bool:
    """Whether a run type is a nested one: JSONL objects or arrays (``nested``), or a parquet
    struct, list or map."""
    return kind == "nested" or kind.split("<", 1)[0] in (
        "struct", "list", "large_list", "fixed_size_list", "list_view", "map")


def _json_value(value):
    """A nested value as plain Python (numpy arrays, as pandas reads parquet lists, as lists)."""
    if hasattr(value, "tolist"):  # a numpy array (or scalar)
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _as_json_text(value):
    """A nested value as its JSON text (missing stays missing)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return json.dumps(_json_value(value), ensure_ascii=False)


def _in_type(column: pd.Series, kind: str) -> pd.Series | None:
    """``column`` with its values in type ``kind``, or None when they already are. Nested
    values become their JSON text and decimals their text: one string type in every part,
    whatever each partition's values would let pandas infer."""
    if is_nested(kind):
        return column.astype(object).map(_as_json_text)
    if kind.startswith("decimal"):
        return column.astype(object).map(lambda v: None if v is None or v != v else str(v))
    if kind in STRING_LIKE and column.dtype == object:
        odd = column.map(lambda v: v is not None and v == v and not isinstance(v, str))
        return column.where(~odd, column.map(str)) if odd.any() else None
    if kind in STRING_LIKE:
        return column.astype(object).where(column.notna(), None).map(
            lambda v: v if v is None else str(v))
    if kind == "int64" and column.dtype == object:
        return pd.to_numeric(column).astype("Int64")
    if kind == "double" and column.dtype == object:
        return pd.to_numeric(column).astype("float64")
    return None


def as_written(table, types: dict[str, str] | None):
    """An Arrow table with the input columns in the run's types (nested and decimal columns,
    read as text by ``as_read``, as strings)."""
    import pyarrow as pa

    if not types:
        return table
    for i, field in enumerate(table.schema):
        kind = types.get(field.name)
        if kind is not None and (is_nested(kind) or kind.startswith("decimal")):  # as_read's
            kind = "string"
        if kind in (None, "null") or str(field.type) == kind:
            continue
        try:
            target = pa.type_for_alias(kind)
        except (ValueError, KeyError):
            continue  # a parquet type without an alias (timestamps, lists): kept as read
        table = table.set_column(i, field.name, table.column(i).cast(target))
    return table
