"""The input of a run, checked once: its files and partition map, one type per column and the id
check, kept in the output folder (``input-cache.json``) for a resume that finds the files
unchanged."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import dask

from nemocc_dask import io
from nemocc_dask.io import types as input_types
from nemocc_dask.io.listing import named_folder
from nemocc_dask.io.storage import is_remote
from nemocc_dask.run.output_folder import OutputError

if TYPE_CHECKING:  # run.start imports this module
    from nemocc_dask.run.start import Job


def refuse_output_inside_input(data, jobs: list[Job]) -> None:
    """OutputError when an output folder lies inside an input folder: its parts would be read as
    input by the next run (resume would be impossible)."""
    if not isinstance(data, (str, Path, list, tuple)):
        return
    for item in ([data] if isinstance(data, (str, Path)) else data):
        folder = named_folder(item)
        if folder is None:
            continue
        for job in jobs:
            if not is_remote(job.out_dir) and \
                    Path(job.out_dir).resolve().is_relative_to(folder.resolve()):
                raise OutputError(
                    f"output folder {str(job.out_dir)!r} is inside the input folder "
                    f"{str(folder)!r}: its parts would be read as input by the next run (and "
                    "resume would be impossible); choose an output folder outside the input")


def stored_type(pieces, ddf, column: str) -> str:
    """How ``column`` is stored in the input files (``pieces``), or the frame's dtype."""
    if pieces is not None:
        return io.column_type(pieces, column)
    dtype = ddf.dtypes[column]
    return "string" if str(dtype) in ("string", "object", "str") else str(dtype)


INPUT_CACHE = "input-cache.json"  # the partition map and id check of unchanged input files


def read_input_cache(out_dir: Path) -> dict | None:
    """The input cache an earlier run left in ``out_dir`` (read only), if any."""
    try:
        return json.loads((out_dir / INPUT_CACHE).read_text())
    except (OSError, ValueError):
        return None


def load_input(data, rows_per_partition: int, id_field: str, cache: dict | None):
    """(frame, run identity of the input, number of partitions, the pieces of input files or
    None for a DataFrame, the input cache to keep). Input files that have not
    changed since ``cache`` was written are not read again to partition them."""
    if isinstance(data, (str, Path, list, tuple)):
        identities = io.file_identities(data)
        pieces = io.cached_pieces(cache, identities, rows_per_partition)
        if pieces is None:
            pieces = io.partition_map(data, rows_per_partition)
            cache = {"files": identities, "rows_per_partition": rows_per_partition,
                     "pieces": [dataclasses.asdict(p) for p in pieces]}
        ddf = io.frame_from_pieces(pieces)
        return ddf, io.input_fingerprint(data, pieces), len(pieces), pieces, cache
    return data, {"dask_token": dask.base.tokenize(data)}, data.npartitions, None, None


def checked_input(ddf, pieces, id_field: str, cache: dict | None, casts: dict[str, str],
                   text_fields: tuple[str, ...], read_all: bool):
    """(the input's row count, the run's column types or None for a DataFrame input) after
    checking its ids (``io.check_input``) and deciding one type per column
    (``input_types.decide``), unless the cache says these very files passed for ``id_field``
    and ``casts``. ``read_all``: read every column's every page (before ``--overwrite``
    deletes an earlier run), cache or not."""
    if pieces is None:
        return io.check_input(ddf[[id_field]], id_field)[0], None
    checked = (cache or {}).get("ids") or {}
    if not read_all and checked.get("field") == id_field and checked.get("casts") == casts \
            and "observed" in checked:
        rows, observed = int(checked["rows"]), checked["observed"]
    else:
        jsonl = any(p.kind == "jsonl" for p in pieces)  # parsed whole anyway: types as well
        columns = None if read_all or jsonl else [id_field]
        frame = io.frame_from_pieces(pieces, columns, types=casts, text_fields=text_fields)
        rows, kinds = io.check_input(frame, id_field, kinds=jsonl,
                                     rows=sum(p.stop - p.start for p in pieces))
        observed = io.parquet_types(pieces) + [
            (f"{p.path} (lines {p.start + 1}-{p.stop})", k)
            for p, k in zip(pieces, kinds) if p.kind == "jsonl"]
        if cache is not None:
            cache["ids"] = {"field": id_field, "rows": rows, "casts": casts,
                            "observed": observed}
    return rows, input_types.decide([tuple(o) for o in observed], id_field, text_fields, casts)
