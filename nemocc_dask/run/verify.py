"""``nemocc-dask verify OUTPUT``: check a finished (or resumable) output folder without running
anything: every partition's part exists, has the size and sha256 its stats record, and its
parquet footer says as many rows as the stats; every journal line of the compacted journals is
readable. One folder of a task, or the folder of ``nemocc-dask nemotron-cc`` (one per task)."""

from __future__ import annotations

import json
from pathlib import Path

from nemocc_dask.io import file_digest
from nemocc_dask.io.storage import as_path
from nemocc_dask.run.output_folder import MANIFEST


def task_folders(output) -> list[Path]:
    """The task folders under ``output`` (itself, or its subfolders holding a run)."""
    root = as_path(output)
    if (root / MANIFEST).exists():
        return [root]
    return sorted(p for p in root.iterdir() if (p / MANIFEST).exists()) if root.exists() else []


def verify_folder(folder: Path) -> tuple[int, list[str]]:
    """(partitions checked, problems found) for one task folder."""
    import pyarrow.parquet as pq

    problems, checked = [], 0
    for stats_file in sorted((folder / "stats").glob("*.json")):
        checked += 1
        stats = json.loads(stats_file.read_text())
        part = folder / "parts" / f"{stats_file.stem}.parquet"
        if not part.exists():
            problems.append(f"{part}: missing (the next run redoes it)")
            continue
        size, sha = file_digest(part)
        if "part_sha256" in stats and (size, sha) != (stats["part_bytes"], stats["part_sha256"]):
            problems.append(f"{part}: {size} bytes, sha256 {sha[:12]}..., but its stats record "
                            f"{stats['part_bytes']} bytes, sha256 {stats['part_sha256'][:12]}... "
                            "(damaged: delete it and rerun the same command to redo it)")
            continue
        try:
            rows = pq.read_metadata(part.open("rb")).num_rows
        except Exception as exc:
            problems.append(f"{part}: not readable as parquet ({type(exc).__name__}: {exc})")
            continue
        if rows != stats.get("rows_written", rows):
            problems.append(f"{part}: {rows} rows, its stats say {stats['rows_written']}")
    return checked, problems


def verify(output) -> int:
    """Print what was checked and every problem; 0 when the folder is sound, 1 otherwise, 2 when
    it holds no run."""
    folders = task_folders(output)
    if not folders:
        print(f"{output}: no nemocc-dask run here (no {MANIFEST})")
        return 2
    bad = 0
    for folder in folders:
        checked, problems = verify_folder(folder)
        print(f"{folder}: {checked} partition(s) checked, {len(problems)} problem(s)")
        for problem in problems:
            print(f"  {problem}")
        bad += len(problems)
    return 1 if bad else 0
