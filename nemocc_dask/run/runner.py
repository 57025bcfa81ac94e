"""Driver side of a lossless run: check everything before the first request and before the output
folder changes, lock the folder, skip finished partitions (or redo those with failed requests under
``retry_failed``), run the rest on the cluster with a live progress line, and write the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask

from nemocc_dask import io
from nemocc_dask.errors import ConfigError, Preempted, RunError, StartError
from nemocc_dask.io import types as input_types
from nemocc_dask.io.gpu import require_gpu, to_gpu
from nemocc_dask.io.storage import as_path, is_remote, refresh
from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.llm.preflight import preflight
from nemocc_dask.llm.served_tokenizer import FORCE as SERVED
from nemocc_dask.llm.served_tokenizer import find_served_tokenizer
from nemocc_dask.recipe.presets import TaskPreset
from nemocc_dask.recipe.stages.route import Route
from nemocc_dask.recipe.tokenizer import (BUNDLED, load_tokenizer, prompt_overhead_tokens,
                                          tokenizer_name)
from nemocc_dask.run import output_folder
from nemocc_dask.run.execution import (compute, distributed_client, drain_everywhere,
                                       register_pool_plugin)
from nemocc_dask.run.generate import prompt_limit
from nemocc_dask.run.inputs import (INPUT_CACHE, checked_input, load_input, read_input_cache,
                                    refuse_output_inside_input, stored_type)
from nemocc_dask.run.output_folder import (MANIFEST, SERVE_LOGS, LockLost, OutputError, OutputLock,
                                           check_output, prepare_output)
from nemocc_dask.run.partition_job import PartitionPlan, finished_stats, process_partition
from nemocc_dask.run.pipeline import require_columns, resolve_task
from nemocc_dask.run.progress import Progress, endpoint_series, endpoint_statuses
from nemocc_dask.run.report import aggregate, this_run, with_history

logger = logging.getLogger(__name__)
__all__ = ["Job", "OutputError", "run_jobs", "run_to_parquet"]


@contextlib.contextmanager
def start_checks():
    """Turn a ValueError raised while checking a run into a ConfigError (a run that could not
    start), keeping StartErrors as they are."""
    try:
        yield
    except StartError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


@dataclass(frozen=True)
class Job:
    """One task of a run: its preset, endpoint, optional quality route and output folder."""

    preset: TaskPreset
    llm: LLMConfig
    out_dir: Path
    route: Route | None = None


def fingerprint(job: Job, inputs, tokenizer, seed: int, id_field: str) -> dict:
    """Everything that changes results or which rows land in which partition (not throughput
    knobs such as in-flight or workers)."""
    return {"inputs": inputs, "task": job.preset.describe(), "llm": job.llm.fingerprint_fields(),
            "settings": job.llm.request_settings(job.preset),
            "tokenizer": tokenizer_name(tokenizer), "served_context": job.llm.max_model_len,
            "seed": seed, "id_field": id_field,
            "route": None if job.route is None else vars(job.route)}


def _with_served_context(job: Job, context: int | None) -> Job:
    """``job`` with the served context in its LLMConfig (prompts that cannot fit are then not
    sent), warning when the context is smaller than the task needs; ConfigError for a model
    this run serves itself (``--serve``: the command is the user's to fix)."""
    if not context:
        return job
    max_tokens = job.llm.request_settings(job.preset).get("max_tokens") or 0
    limit, _ = prompt_limit(job.preset.max_input_tokens, context, max_tokens)
    needed = job.preset.max_input_tokens + max_tokens
    if limit < job.preset.max_input_tokens and job.llm.serve is not None:
        raise ConfigError(f"task {job.preset.name} needs a context of {needed} tokens per "
                          f"request (max input {job.preset.max_input_tokens} + max_tokens "
                          f"{max_tokens}), but the model this run serves has {context}: give it "
                          f"a larger one in --serve (llama.cpp: -c {needed} or more; vLLM: "
                          f"--max-model-len {needed}) or lower the task's max_input_tokens / "
                          "--max-tokens")
    if limit < job.preset.max_input_tokens:
        logger.warning("task %s needs a context of %d tokens (max input %d + max output) but the "
                       "model is served with %d: prompts over %d tokens are not sent "
                       "(prompt_too_long in rejects/); serve it with a larger context or lower "
                       "max_input_tokens", job.preset.name,
                       job.preset.max_input_tokens + max_tokens, job.preset.max_input_tokens,
                       context, limit)
    return dataclasses.replace(job, llm=dataclasses.replace(job.llm, max_model_len=context))


def _tokenizers(jobs: list[Job], tokenizer: str | None,
                documents: int | None) -> dict[str, Any]:
    """Each job's tokenizer: the user's, else the served model's (``find_served_tokenizer``,
    once per model and endpoint set, so a missing one is warned about once; ``documents``:
    the input's, to project what counting through the server would cost; ``--tokenizer
    served`` accepts that cost whatever it is)."""
    if tokenizer is not None and tokenizer != SERVED:
        return {job.preset.name: None if tokenizer == BUNDLED else tokenizer for job in jobs}
    found: dict[tuple, Any] = {}
    chosen = {}
    for job in jobs:
        key = (job.llm.model, job.llm.endpoints)
        if key not in found:
            found[key] = find_served_tokenizer(job.llm, documents, force=tokenizer == SERVED)
        chosen[job.preset.name] = found[key]
    return chosen


def _warn_without_chat_template(tokenizer: Any, presets: list[TaskPreset]) -> None:
    """Say so when the tokenizer has no chat template: prompt overheads are then estimated from
    the plain prompt text, which misses the template's tokens."""
    if tokenizer is None:  # the bundled default: counted as the reference counts
        return
    tok = load_tokenizer(tokenizer)
    if getattr(tok, "chat_template", None):
        return
    estimates = ", ".join(f"{p.name} {prompt_overhead_tokens(tok, p)}" for p in presets)
    logger.warning("tokenizer %s has no chat template: each prompt's overhead is estimated from "
                   "its plain text (%s tokens), without the tokens the model's chat template "
                   "adds; point --tokenizer at the model's folder (with tokenizer_config.json) "
                   "to count them", tokenizer_name(tokenizer), estimates)


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


def _serve(jobs: list[Job], stack: contextlib.ExitStack):
    """Start the served model on every worker if the jobs ask for one (stopped when ``stack``
    closes). Returns the jobs with the servers' URLs, and a callable giving every server's URL,
    PIDs and restarts (None without a served model)."""
    specs = [job.llm.serve for job in jobs if job.llm.serve is not None]
    if not specs:
        return jobs, None
    if any(spec != specs[0] for spec in specs):
        raise ConfigError("all tasks of a run must use the same served model (--serve)")
    from nemocc_dask.serve import serving

    client = distributed_client()
    if client is None:
        raise ConfigError("serving the model needs a Dask cluster: create one (make_client() "
                          "or a LocalCluster) before run_to_parquet, or use the nemocc-dask CLI")
    spec = specs[0]
    if spec.log_dir is None:
        root = jobs[0].out_dir if len(jobs) == 1 else jobs[0].out_dir.parent
        local = not is_remote(root)
        spec = dataclasses.replace(spec, log_dir=str(root / SERVE_LOGS) if local
                                   else tempfile.mkdtemp(prefix="nemocc-serve-logs-"))
    status = stack.enter_context(serving(client, spec))
    urls = tuple(sorted(s["url"] for s in status()))
    logger.info("served model up on %d server(s): %s", len(urls), ", ".join(urls))
    return [dataclasses.replace(job, llm=dataclasses.replace(job.llm, base_url=urls, serve=spec))
            for job in jobs], status


def run_jobs(data, jobs: list[Job], *, tokenizer: str | None = None, id_field: str = "id",
             seed: int = 0, overwrite: bool = False, retry_failed: bool = False,
             rows_per_partition: int = io.DEFAULT_ROWS_PER_PARTITION,
             show_progress: bool = True, gpu: bool = False,
             wait_for_lock: float = 0.0, casts=None,
             metrics_port: int | None = None) -> dict[str, dict]:
    """Run several tasks over one input read once; returns each job's report by task name.

    Everything that can be checked is checked before the first request and before any output
    folder changes: input paths and files, the GPU (with ``gpu``), columns, output folders (run
    identity, locks), endpoints, duplicate ids. A refused run (StartError) leaves every output
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
        with start_checks():
            refuse_output_inside_input(data, jobs)
            casts = input_types.parse_casts(casts)
            cache = read_input_cache(jobs[0].out_dir)
            ddf, inputs, n_parts, pieces, cache = load_input(data, rows_per_partition,
                                                              id_field, cache)
            if casts:
                inputs = dict(inputs, casts=casts)
            if gpu:
                require_gpu()
            for job in jobs:
                needed = {"id": id_field, "text": job.preset.input_field}
                if job.route is not None:
                    needed["quality"] = job.route.field
                require_columns(ddf.columns, needed)
                input_types.require_text(stored_type(pieces, ddf, job.preset.input_field),
                                         job.preset.input_field)
            for job in jobs:  # before any server starts: is the folder free and this run's?
                output_folder.wait_for_lock(job.out_dir, wait_for_lock)
                if job.llm.serve is not None:
                    check_output(job.out_dir, fingerprint(job, inputs, None, seed, id_field),
                                 overwrite, unknown=("tokenizer", "served_context"))
            jobs, served_status = _serve(jobs, servers)
            jobs = [_with_served_context(job, preflight(job.llm)) for job in jobs]
            tokenizers = _tokenizers(jobs, tokenizer, None if pieces is None else
                                     sum(p.stop - p.start for p in pieces))
            for name in {tokenizer_name(t) for t in tokenizers.values()}:
                same = [job for job in jobs if tokenizer_name(tokenizers[job.preset.name]) == name]
                _warn_without_chat_template(tokenizers[same[0].preset.name],
                                            [job.preset for job in same])
            materials = {job.preset.name: fingerprint(job, inputs, tokenizers[job.preset.name],
                                                      seed, id_field) for job in jobs}
            modes = {job.preset.name: check_output(job.out_dir, materials[job.preset.name],
                                                   overwrite) for job in jobs}
            text_fields = tuple(dict.fromkeys(job.preset.input_field for job in jobs))
            input_rows, types = checked_input(ddf, pieces, id_field, cache, casts, text_fields,
                                               read_all="replace" in modes.values())
            if types is not None:
                ddf = io.frame_from_pieces(pieces, types=types, text_fields=text_fields)
            if gpu:
                ddf = to_gpu(ddf)
        for job in jobs:
            logger.info("task %s: %d partitions, endpoint(s) %s, model %r, tokenizer %s, "
                        "output %s", job.preset.name, n_parts, ", ".join(job.llm.endpoints),
                        job.llm.model,
                        tokenizer_name(tokenizers[job.preset.name]), job.out_dir)
        lost: list[str] = []

        def stop_sending(message: str) -> None:
            lost.append(message)
            drain_everywhere(message)

        with contextlib.ExitStack() as locks:
            for job in jobs:
                locks.enter_context(OutputLock(job.out_dir, on_lost=stop_sending))
                prepare_output(job.out_dir, materials[job.preset.name], modes[job.preset.name])
            if cache is not None:  # the folder is ours now: keep what the next start can reuse
                io.atomic_write_bytes(jobs[0].out_dir / INPUT_CACHE, json.dumps(cache).encode())
            register_pool_plugin()
            parts = ddf.to_delayed()
            plans = {job.preset.name: PartitionPlan(job.preset, job.llm, str(job.out_dir),
                                                    tokenizers[job.preset.name], id_field, seed,
                                                    retry_failed, job.route, types, started)
                     for job in jobs}
            tasks, out_dirs, pending, redone = _schedule(jobs, parts, plans, retry_failed)
            if any(redone.values()):
                logger.info("retrying failed requests in %d finished partition(s)",
                            sum(redone.values()))
            with Progress([j.out_dir for j in jobs], len(tasks), show_progress,
                          endpoint_statuses, metrics_port) as progress:
                try:
                    compute(tasks, out_dirs, progress)
                except (Preempted, RunError):
                    if lost:
                        raise LockLost(lost[0]) from None
                    raise
            if lost:
                raise LockLost(lost[0])
            series = endpoint_series(started)
            served = served_status() if served_status else None
            return {job.preset.name: _write_report(job, tokenizers[job.preset.name], n_parts,
                                                   pending[job.preset.name], input_rows,
                                                   time.time() - started, series, served)
                    for job in jobs}


def _write_report(job: Job, tokenizer: Any, n_parts: int, ran: int, input_rows: int,
                  seconds: float, series: dict[str, list[dict]],
                  served: list[dict] | None = None) -> dict:
    """Sum the job's partition stats into ``report.json`` with the per-endpoint ``series``
    (shared by the tasks of a run that use the same endpoint); RunError if the counts do not
    add up."""
    refresh(job.out_dir)
    stats = [json.loads(p.read_text()) for p in sorted((job.out_dir / "stats").glob("*.json"))]
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
    if served is not None:
        report["served"] = {"command": job.llm.serve.command, "servers": served,
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
