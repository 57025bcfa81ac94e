"""Rebuild ``sample.parquet``: the bundled demo corpus (run with ``python -m nemocc_dask.data.build_sample``).

The documents are the longer docstrings of the Python standard library: real English prose under the
Python Software Foundation License (permissive). Paragraphs are unwrapped to one line each, like text
extracted from web pages. ``bucketed_results`` is a stand-in quality bucket (0-19) derived from a hash
of the text, so both routes of the full pipeline get documents.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
import re
import sys
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

MODULES_SKIPPED = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test",
                   "lib2to3", "ensurepip", "venv", "pydoc_data"}


def _unwrap(doc: str) -> str:
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", inspect.cleandoc(doc))]
    return "\n".join(p for p in paragraphs if p)


def collect(limit: int = 300, min_chars: int = 400) -> list[str]:
    docs, seen = [], set()
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names
                   and not m.name.startswith("_") and m.name not in MODULES_SKIPPED)
    warnings.simplefilter("ignore")
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        objects = [module] + [v for _, v in sorted(vars(module).items())
                              if inspect.isclass(v) or inspect.isfunction(v)]
        for obj in objects:
            doc = inspect.getdoc(obj) if obj is not module else module.__doc__
            if not doc or len(doc) < min_chars or ">>>" in doc:
                continue
            text = _unwrap(doc)
            if text not in seen:
                seen.add(text)
                docs.append(text)
            if len(docs) >= limit:
                return docs
    return docs


def main() -> None:
    texts = collect()
    buckets = [int(hashlib.sha256(t.encode()).hexdigest(), 16) % 20 for t in texts]
    frame = pd.DataFrame({"id": range(len(texts)), "text": texts, "bucketed_results": buckets})
    table = pa.Table.from_pandas(frame, preserve_index=False)
    out = Path(__file__).with_name("sample.parquet")
    pq.write_table(table, out, row_group_size=40)
    print(f"wrote {len(texts)} documents to {out}")


if __name__ == "__main__":
    main()
