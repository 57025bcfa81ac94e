"""Driver side of a lossless run: check everything before the first request and before the output
folder changes (``run.start``), lock the folder, skip finished partitions (or redo those with
failed requests under ``retry_failed``), run the rest on the cluster with a live progress line,
and write the report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from typing import Any

import dask

from nemocc_dask import io
from nemocc_dask.config import setting
from nemocc_dask.errors import Preempted, RunError
from nemocc_dask.io.storage import as_path
from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.recipe.presets import TaskPreset
from nemocc_dask.recipe.tokenizer import tokenizer_name
from nemocc_dask.run.execution import compute, register_pool_plugin
from nemocc_dask.run.ledger import ledger
from nemocc_dask.run.output_folder import MANIFEST, LockLost, OutputError
from nemocc_dask.run.partition_job import finished_stats, process_partition, read_stats
from nemocc_dask.run.pipeline import resolve_task
from nemocc_dask.run.progress import Progress, endpoint_series, endpoint_statuses
from nemocc_dask.run.report import aggregate, this_run, with_history
from nemocc_dask.run.report_html import read_plan, write_report_html
from nemocc_dask.run.start import Job, partition_plans, prepare, start_checks, taken_folders

logger = logging.getLogger(__name__)
__all__ = ["Job", "OutputError", "run_jobs", "run_to_parquet", "start_checks"]


def _needs_retry(stats: dict) -> bool:
    """Whether a finished partition has requests that failed at the LLM."""
    return bool(stats.get("failed_requests"))


def _schedule(jobs: list[Job], parts: list, plans: dict, retry_failed: bool):
    """(delayed partition tasks, the output folder of each, partitions to run per task,
    partitions redone per task)."""
    tasks, out_dirs, pending, redone = [], [], Counter(), Counter()
    for job in jobs:
        for index, part in enumerate(parts):
            done = finished_stats(job.out_dir, index)
            redo = done is not None and retry_failed and _needs_retry(done)
            if done is not None and not redo:
                continue
            key = f"nemocc-{job.preset.name}-{index}-{io.digest(str(job.out_dir))[:8]}"
            tasks.append(dask.delayed(process_partition)(part, index, plans[job.preset.name],
                                                         redo, dask_key_name=key))
            out_dirs.append(job.out_dir)
            pending[job.preset.name] += 1
            redone[job.preset.name] += redo
    return tasks, out_dirs, pending, redone


def run_jobs(data, jobs: list[Job], *, tokenizer: str | None = None, id_field: str = "id",
             seed: int = 0, overwrite: bool = False, retry_failed: bool = False,
             rows_per_partition: int = io.DEFAULT_ROWS_PER_PARTITION,
             show_progress: bool = True, gpu: bool = False,
             wait_for_lock: float = 0.0, casts=None,
             metrics_port: int | None = None) -> dict[str, dict]:
    """Run several tasks over one input read once; returns each job's report by task name.

    Everything that can be checked is checked before the first request and before any output
    folder changes (``prepare``). A refused run (StartError) leaves every output
    folder as it was. Finished partitions are skipped; with ``retry_failed`` those with failed
    requests are redone, resending only the failed requests. Raises RunError when a partition
    fails (e.g. the failure budget stopped an endpoint) or the counts do not add up, LockLost
    when another run takes an output folder meanwhile (this run stops sending at once).
    ``wait_for_lock``: seconds to wait for another run to release an output folder.
    ``casts``: {column: "string" | "int64" | "double"} (or ``["id=string"]``), one declared type
    for a column whose input files disagree; other columns get one type decided from the files
    (``input_types``), and every part is written in those types. ``metrics_port``: serve
    the run's live figures for Prometheus on 127.0.0.1 at that port (0: a free one; see
    ``run.metrics``).
    """
    with contextlib.ExitStack() as servers:
        started = time.time()
        run = prepare(data, jobs, servers, tokenizer=tokenizer, id_field=id_field, seed=seed,
                      overwrite=overwrite, rows_per_partition=rows_per_partition, gpu=gpu,
                      wait_for_lock=wait_for_lock, casts=casts)
        with taken_folders(run) as lost:
            register_pool_plugin()
            plans = partition_plans(run, id_field, seed, retry_failed, started)
            tasks, out_dirs, pending, redone = _schedule(run.jobs, run.ddf.to_delayed(), plans,
                                                         retry_failed)
            if any(redone.values()):
                logger.info("retrying failed requests in %d finished partition(s)",
                            sum(redone.values()))
            def live_pages(progress: Progress) -> None:
                for job in run.jobs:
                    live_report(job, started, progress.samples)

            with Progress([j.out_dir for j in run.jobs], len(tasks), show_progress,
                          endpoint_statuses, metrics_port,
                          every=(setting("report-refresh-seconds"), live_pages)) as progress:
                try:
                    compute(tasks, out_dirs, progress)
                except (Preempted, RunError):
                    if lost:
                        raise LockLost(lost[0]) from None
                    raise
            if lost:
                raise LockLost(lost[0])
            series = endpoint_series(started)
            served = run.served_status() if run.served_status else None
            reports = {job.preset.name: _write_report(job, run.tokenizers[job.preset.name],
                                                      run.n_parts, pending[job.preset.name],
                                                      run.input_rows, time.time() - started,
                                                      series, served,
                                                      run.output_columns[job.preset.name])
                       for job in run.jobs}
            for job in run.jobs:
                page(job, reports[job.preset.name], progress.samples, final=True)
            return reports


def page(job: Job, report: dict, samples: list[dict], final: bool) -> None:
    """Write the job's report.html (a page that cannot be written is warned about: the run's
    files and report.json are what count)."""
    try:
        write_report_html(job.out_dir, report, samples, job.preset.input_field,
                          job.preset.output_field, final)
    except Exception as exc:
        logger.warning("report.html of %s not written: %s", job.out_dir, exc)


def live_report(job: Job, started: float, samples: list[dict]) -> None:
    """The job's report.html from the partitions finished so far (while the run goes)."""
    report = aggregate(read_stats(job.out_dir, skip_unreadable=True), time.time() - started)
    report["task"] = job.preset.name
    report["endpoint_series"] = {name: points for name, points in
                                 endpoint_series(started).items() if name in job.llm.endpoints}
    page(job, report, samples, final=False)


def _write_report(job: Job, tokenizer: Any, n_parts: int, ran: int, input_rows: int,
                  seconds: float, series: dict[str, list[dict]],
                  served: list[dict] | None = None,
                  output_columns: list[str] | None = None) -> dict:
    """Sum the job's partition stats into ``report.json`` with the per-endpoint ``series``
    (shared by the tasks of a run that use the same endpoint); RunError if the counts do not
    add up."""
    stats = read_stats(job.out_dir)
    report = aggregate(stats, seconds, n_parts - ran, expected_rows=input_rows,
                       expected_partitions=n_parts)
    report["this_run"] = this_run(stats, time.time() - seconds, seconds)
    previous = None  # the report of the runs before this one into the same folder
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads((job.out_dir / "report.json").read_text())
    report = with_history(report, previous)
    report["task"] = job.preset.name
    report["fingerprint"] = json.loads((job.out_dir / MANIFEST).read_text())["fingerprint"]
    report["tokenizer"] = tokenizer_name(tokenizer)
    report["served_context"] = job.llm.max_model_len
    report["max_in_flight"] = job.llm.max_in_flight
    report["request_timeout"] = job.llm.timeout  # "auto": each endpoint's in endpoints[...]
    report["endpoint_series"] = {name: series[name] for name in job.llm.endpoints
                                 if name in series}
    report["output_columns"] = output_columns  # declared by the stages (stages.contracts)
    report["ledger"] = ledger(report, len(job.llm.endpoints), read_plan(job.out_dir))
    if served is not None:
        report["served"] = {"command": job.llm.serve.command,
                            "backend": job.llm.serve.backend, "servers": served,
                            "restarts": sum(s["restarts"] for s in served)}
    io.atomic_write_bytes(job.out_dir / "report.json", json.dumps(report, indent=1).encode())
    if not report["accounted"]:
        raise RunError(f"task {job.preset.name}: the counts in {job.out_dir / 'report.json'} do "
                       "not add up: " + "; ".join(report["accounting_errors"]))
    return report


def run_to_parquet(data, output, task: str | TaskPreset, llm: LLMConfig, *,
                   tokenizer: str | None = None, text_field: str | None = None,
                   id_field: str = "id", seed: int = 0,
                   overwrite: bool = False, retry_failed: bool = False,
                   rows_per_partition: int = io.DEFAULT_ROWS_PER_PARTITION,
                   show_progress: bool = True, gpu: bool = False,
                   wait_for_lock: float = 0.0, casts=None, metrics_port: int | None = None,
                   **overrides) -> dict:
    """Run one task over ``data`` (paths or a Dask DataFrame) into ``output``, resumably.

    Layout: ``parts/`` (kept rows, one parquet file per input partition), ``rejects/`` (removed
    rows with ``reject_reason``), ``stats/``, ``journal/``, ``run.json`` and ``report.json``.
    Rerunning the same call resumes; ``retry_failed=True`` also resends the requests that failed
    in finished partitions and rewrites those partitions. Returns the report. ``gpu=True`` runs
    the stages on cuDF partitions (GPUError at once where there is no usable GPU).
    ``wait_for_lock``: seconds to wait while another run holds ``output`` (a requeued job that
    starts while the old one drains) before refusing. ``casts``, ``metrics_port``: see
    ``run_jobs``.
    """
    with start_checks():
        preset = resolve_task(task, text_field, **overrides)
    job = Job(preset, llm, as_path(output))
    return run_jobs(data, [job], tokenizer=tokenizer, id_field=id_field, seed=seed,
                    overwrite=overwrite, retry_failed=retry_failed,
                    rows_per_partition=rows_per_partition, show_progress=show_progress,
                    gpu=gpu, wait_for_lock=wait_for_lock, casts=casts,
                    metrics_port=metrics_port)[preset.name]
