"""Checks of the whole input before any request: every id present and unique across all
partitions, and what the columns hold (for ``types.decide``)."""

from __future__ import annotations

import json

import pandas as pd

from nemocc_dask.io import storage
from nemocc_dask.io import types as input_types
from nemocc_dask.io.frames import to_host_list
from nemocc_dask.io.readers import InputError, Piece, plain_schema

IDS_PER_OUTPUT_PARTITION = 10_000_000  # id hashes per partition of the duplicate count


def check_input(ddf, id_field: str, kinds: bool = False,
                rows: int | None = None) -> tuple[int, list[dict]]:
    """Raise InputError if an id is missing or repeats anywhere in the input; returns the number
    of input rows and, with ``kinds``, each partition's ``input_types.python_kinds`` (JSONL: the
    lines are parsed whole anyway). Reads the columns of ``ddf`` in one pass: per partition its
    row and null counts and a 64-bit hash per id, then the hashes that repeat, then the ids
    behind them, so a hash collision is never taken for a duplicate. ``rows`` (when known from
    the partition map) sizes the count: a tree reduction up to ``IDS_PER_OUTPUT_PARTITION`` ids,
    a shuffle into that many ids per partition above."""
    import dask

    def host_ids(part) -> pd.Series:
        return pd.Series(to_host_list(part[id_field]), dtype="object")

    def summary(part):
        ids = host_ids(part)
        missing = ids.isna()
        return pd.DataFrame({"rows": [len(ids)], "nulls": [int(missing.sum())],
                             "first_null": [int(missing.values.argmax()) if missing.any()
                                            else -1],
                             "kinds": [json.dumps(input_types.python_kinds(part)) if kinds
                                       else "{}"]})

    def hashes(part):
        return pd.DataFrame({"h": _id_hashes(host_ids(part))})

    table, counts = dask.compute(
        ddf.map_partitions(summary, meta={"rows": "int64", "nulls": "int64",
                                          "first_null": "int64", "kinds": "object"}),
        ddf.map_partitions(hashes, meta={"h": "uint64"})["h"].value_counts(
            split_out=max(1, ddf.npartitions // 64) if rows is None
            else max(1, min(ddf.npartitions, -(-rows // IDS_PER_OUTPUT_PARTITION)))))
    table = table.reset_index(drop=True)
    nulls = table[table["nulls"] > 0]
    if len(nulls):
        raise InputError(f"id column {id_field!r} has {int(nulls['nulls'].sum())} missing "
                         f"(null) id(s), e.g. row {int(nulls['first_null'].iloc[0])} of "
                         f"partition {int(nulls.index[0])}; every document needs an id. Fill "
                         "them in or pass another --id-field")
    repeated = set(counts[counts > 1].index)
    if repeated:
        _raise_duplicates(ddf[[id_field]], id_field, repeated, host_ids)
    return int(table["rows"].sum()), [json.loads(k) for k in table["kinds"]]


def parquet_types(pieces: list[Piece]) -> list[tuple[str, dict[str, str]]]:
    """(file, {column: Arrow type name}) of every parquet file among ``pieces``, from its footer
    (a file without rows says ``null`` for every column: it tells nothing about their values)."""
    import pyarrow.parquet as pq

    found = []
    for path in dict.fromkeys(p.path for p in pieces if p.kind == "parquet"):
        with storage.as_path(path).open("rb") as fh:
            meta = pq.ParquetFile(fh).metadata
            schema = plain_schema(meta.schema.to_arrow_schema())
        found.append((path, {f.name: str(f.type) if meta.num_rows else "null" for f in schema}))
    return found


def _id_hashes(ids: pd.Series):
    """A 64-bit hash of each id, by its type and value (1 and "1" are different ids)."""
    return pd.util.hash_pandas_object(ids.map(lambda v: f"{type(v).__name__}:{v}"),
                                      index=False).values


def _raise_duplicates(columns, id_field: str, repeated: set, host_ids) -> None:
    """InputError naming ids that really repeat (among those whose hash does), with where."""
    import dask

    def suspects(part, partition_info=None):
        ids = host_ids(part)
        hit = pd.Series(_id_hashes(ids)).isin(repeated).values
        return pd.DataFrame({"id": ids[hit].map(repr).values,
                             "partition": (partition_info or {}).get("number", -1)})

    found = dask.compute(columns.map_partitions(suspects, meta={"id": "object",
                                                                "partition": "int64"}))[0]
    dupes = found[found["id"].duplicated(keep=False)]
    if not len(dupes):
        return  # a hash collision, not a duplicate
    examples = dupes.groupby("id")["partition"].apply(lambda p: sorted(set(p)))
    shown = "; ".join(f"{ident} in partition(s) {parts[:5]}"
                      for ident, parts in list(examples.items())[:3])
    raise InputError(f"id column {id_field!r} has {len(examples)} duplicate id(s), each used by "
                     f"more than one document ({shown}); ids must be unique across the input. "
                     "Deduplicate the input or pass another --id-field")
