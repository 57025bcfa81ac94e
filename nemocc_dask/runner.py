"""Driver side of a lossless run: check everything before the first request, skip finished
partitions, run the rest on the cluster with a live progress line, and write the report.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import dask

from nemocc_dask import io
from nemocc_dask.gpu import to_gpu
from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.llm.preflight import preflight
from nemocc_dask.partition_job import PartitionPlan, part_path, process_partition
from nemocc_dask.pipeline import require_columns, resolve_task, worker_window
from nemocc_dask.presets import TaskPreset
from nemocc_dask.report import aggregate
from nemocc_dask.stages.route import Route
from nemocc_dask.tokenizer import tokenizer_name

logger = logging.getLogger(__name__)
MANIFEST = "run.json"
_OWNED = ("parts", "rejects", "stats", "journal", MANIFEST, "report.json")


class OutputError(ValueError):
    """The output folder cannot be used for this run; the message says why and what to do."""


@dataclass(frozen=True)
class Job:
    """One task of a run: its preset, endpoint, optional quality route and output folder."""

    preset: TaskPreset
    llm: LLMConfig
    out_dir: Path
    route: Route | None = None


def fingerprint(job: Job, inputs, tokenizer, seed: int, id_field: str) -> dict:
    """Everything that changes results (not throughput knobs such as in-flight or workers)."""
    return {"inputs": inputs, "task": job.preset.describe(), "llm": job.llm.fingerprint_fields(),
            "settings": job.llm.request_settings(job.preset), "tokenizer": tokenizer_name(tokenizer),
            "seed": seed, "id_field": id_field,
            "route": None if job.route is None else vars(job.route)}


def prepare_output(out_dir: Path, material: dict, overwrite: bool) -> None:
    """Create or resume ``out_dir``; raise OutputError if it holds another run or other files."""
    digest = io.digest(material)
    manifest = out_dir / MANIFEST
    if out_dir.exists() and any(out_dir.iterdir()):
        if not manifest.exists():
            foreign = sorted(p.name for p in out_dir.iterdir())[:5]
            raise OutputError(f"output folder {str(out_dir)!r} is not empty and holds no "
                              f"nemocc-dask run (found {foreign}); choose an empty or new folder")
        previous = json.loads(manifest.read_text()).get("fingerprint")
        if previous != digest and not overwrite:
            raise OutputError(f"output folder {str(out_dir)!r} holds a run with different settings "
                              "or inputs (fingerprint mismatch); rerun with the same command to "
                              "resume it, or pass --overwrite to start over")
        if previous != digest or overwrite:
            for name in _OWNED:
                target = out_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not manifest.exists():
        io.atomic_write_bytes(manifest, json.dumps({"fingerprint": digest, "material": material},
                                                   indent=1, default=str).encode())


class Progress:
    """A live status line: partitions done, answers received (journal lines), req/s, tokens/s,
    errors. Reads the journals, so it works whatever the cluster."""

    def __init__(self, out_dirs: list[Path], total_parts: int, enabled: bool = True):
        self.out_dirs, self.total = out_dirs, total_parts
        self.done = 0
        self.enabled = enabled
        self._offsets: dict[Path, int] = {}
        self._answers = self._errors = self._tokens = 0
        self._stop = threading.Event()
        self._started = time.time()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _scan(self) -> None:
        for out in self.out_dirs:
            for path in sorted((out / "journal").glob("*.jsonl")):
                with open(path, "rb") as fh:
                    fh.seek(self._offsets.get(path, 0))
                    data = fh.read()
                end = data.rfind(b"\n") + 1
                self._offsets[path] = self._offsets.get(path, 0) + end
                for line in data[:end].splitlines():
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    self._answers += 1
                    self._errors += bool(record.get("error"))
                    self._tokens += record.get("completion_tokens") or 0

    def line(self) -> str:
        elapsed = max(1e-9, time.time() - self._started)
        return (f"partitions {self.done}/{self.total} | answers {self._answers} | "
                f"{self._answers / elapsed:.1f} req/s | {self._tokens / elapsed:.0f} tok/s | "
                f"errors {self._errors} | {elapsed:.0f} s")

    def _loop(self) -> None:
        tty = sys.stderr.isatty()
        last = 0.0
        while not self._stop.wait(0.5):
            self._scan()
            if tty:
                print("\r" + self.line(), end="", file=sys.stderr, flush=True)
            elif time.time() - last >= 10:
                print(self.line(), file=sys.stderr, flush=True)
                last = time.time()

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()
            self._scan()
            print(("\r" if sys.stderr.isatty() else "") + self.line(), file=sys.stderr, flush=True)


def _load_input(data, rows_per_partition: int):
    if isinstance(data, (str, Path, list, tuple)):
        return io.read_input(data, rows_per_partition), io.input_fingerprint(data)
    return data, {"dask_token": dask.base.tokenize(data)}


def _compute(tasks: list, progress: Progress) -> None:
    """Run the partition tasks on the distributed client if there is one, else locally."""
    try:
        from distributed import as_completed, get_client

        client = get_client()
    except (ImportError, ValueError):
        dask.compute(*tasks)
        progress.done += len(tasks)
        return
    for future in as_completed(client.compute(tasks)):
        future.result()
        progress.done += 1


def run_jobs(data, jobs: list[Job], tokenizer: str | None = None, id_field: str = "id",
             seed: int = 0, overwrite: bool = False, retry_failed: bool = False,
             rows_per_partition: int = io.DEFAULT_ROWS_PER_PARTITION,
             show_progress: bool = True, gpu: bool = False) -> dict[str, dict]:
    """Run several tasks over one input read once; returns each job's report by task name.

    Everything that can be checked is checked before the first request: input paths and files,
    the GPU (with ``gpu``), columns, duplicate ids, output folders, endpoints. Finished partitions
    are skipped. With ``gpu`` the partitions are cuDF DataFrames (``nemocc_dask.gpu.to_gpu``).
    """
    started = time.time()
    ddf, inputs = _load_input(data, rows_per_partition)
    if gpu:
        ddf = to_gpu(ddf)
    needed = {"id": id_field}
    for job in jobs:
        needed["text"] = job.preset.input_field
        if job.route is not None:
            needed["quality"] = job.route.field
        require_columns(ddf.columns, needed)
    for job in jobs:
        prepare_output(job.out_dir, fingerprint(job, inputs, tokenizer, seed, id_field), overwrite)
        preflight(job.llm)
    io.check_ids(ddf, id_field)
    parts = ddf.to_delayed()
    tasks, pending = [], Counter()
    for job in jobs:
        plan = PartitionPlan(job.preset, job.llm, worker_window(job.llm), str(job.out_dir),
                             tokenizer, id_field, seed, retry_failed, job.route)
        for index, part in enumerate(parts):
            if not part_path(job.out_dir, index).exists():
                key = f"nemocc-{job.preset.name}-{index}-{io.digest(str(job.out_dir))[:8]}"
                tasks.append(dask.delayed(process_partition)(part, index, plan,
                                                             dask_key_name=key))
                pending[job.preset.name] += 1
    with Progress([j.out_dir for j in jobs], len(tasks), show_progress) as progress:
        _compute(tasks, progress)
    reports = {}
    for job in jobs:
        stats = [json.loads(p.read_text()) for p in sorted((job.out_dir / "stats").glob("*.json"))]
        skipped = len(parts) - pending[job.preset.name]
        report = aggregate(stats, time.time() - started, skipped)
        report["task"] = job.preset.name
        report["fingerprint"] = json.loads((job.out_dir / MANIFEST).read_text())["fingerprint"]
        io.atomic_write_bytes(job.out_dir / "report.json", json.dumps(report, indent=1).encode())
        reports[job.preset.name] = report
    return reports


def run_to_parquet(data, output, task: str | TaskPreset, llm: LLMConfig, tokenizer: str | None = None,
                   text_field: str | None = None, id_field: str = "id", seed: int = 0,
                   overwrite: bool = False, retry_failed: bool = False,
                   rows_per_partition: int = io.DEFAULT_ROWS_PER_PARTITION,
                   show_progress: bool = True, gpu: bool = False, **overrides) -> dict:
    """Run one task over ``data`` (paths or a Dask DataFrame) into ``output``, resumably.

    Layout: ``parts/`` (kept rows, one parquet file per input partition), ``rejects/`` (removed
    rows with ``reject_reason``), ``stats/``, ``journal/``, ``run.json`` and ``report.json``.
    Rerunning the same call resumes; returns the report. ``gpu=True`` runs the stages on cuDF
    partitions (GPUError at once where there is no usable GPU).
    """
    preset = resolve_task(task, text_field, **overrides)
    job = Job(preset, llm, Path(output))
    return run_jobs(data, [job], tokenizer, id_field, seed, overwrite, retry_failed,
                    rows_per_partition, show_progress, gpu)[preset.name]
