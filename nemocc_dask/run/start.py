"""The start of a run, before its first request: every check (input, columns, types, GPU, output
folders, endpoints, the served model, tokenizers, duplicate ids) gathered into one ``Prepared``
run, then the output folders taken (locked and set up). Used by the runner and by ``plan``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemocc_dask import io
from nemocc_dask.errors import ConfigError, StartError
from nemocc_dask.io import types as input_types
from nemocc_dask.io.gpu import require_gpu, to_gpu
from nemocc_dask.io.storage import is_remote
from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.llm.preflight import preflight
from nemocc_dask.llm.served_tokenizer import FORCE as SERVED
from nemocc_dask.llm.served_tokenizer import find_served_tokenizer
from nemocc_dask.recipe.presets import TaskPreset
from nemocc_dask.recipe.stages.contracts import check_contracts, task_contracts
from nemocc_dask.recipe.stages.route import Route
from nemocc_dask.recipe.tokenizer import (BUNDLED, load_tokenizer, prompt_overhead_tokens,
                                          tokenizer_name)
from nemocc_dask.run import output_folder
from nemocc_dask.run.execution import distributed_client, drain_everywhere
from nemocc_dask.run.generate import prompt_limit
from nemocc_dask.run.inputs import (INPUT_CACHE, checked_input, load_input, read_input_cache,
                                    refuse_output_inside_input, stored_type)
from nemocc_dask.run.output_folder import (SERVE_LOGS, OutputLock, check_output,
                                           prepare_output)
from nemocc_dask.run.partition_job import PartitionPlan
from nemocc_dask.serve.backends import backend

logger = logging.getLogger(__name__)


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
                          f"{max_tokens}), but the model this run serves has {context}: "
                          f"{backend(job.llm.serve.backend).context_hint(needed)}, or lower the "
                          "task's max_input_tokens / --max-tokens")
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


@dataclass
class Prepared:
    """A run that passed every start check: the input (``ddf`` and its partition count, rows and
    decided column ``types``), the jobs (with served URLs and context), each job's tokenizer, run
    identity (``materials``) and folder mode, the input cache to keep, and each task's output
    columns (``recipe.stages.contracts``)."""

    ddf: Any
    n_parts: int
    jobs: list[Job]
    tokenizers: dict[str, Any]
    materials: dict[str, dict]
    modes: dict[str, str]
    input_rows: int
    types: dict | None
    cache: dict | None
    served_status: Any
    output_columns: dict[str, list[str]]  # each task's, from its stages' declared contracts


def prepare(data, jobs: list[Job], servers: contextlib.ExitStack, *, tokenizer: str | None,
            id_field: str, seed: int, overwrite: bool, rows_per_partition: int, gpu: bool,
            wait_for_lock: float, casts) -> Prepared:
    """Every check a run makes before its first request and before any output folder changes
    (input paths, files and types, the GPU, columns, output folders, endpoints, duplicate ids),
    starting the served model into ``servers`` when the jobs ask for one. ConfigError (or another
    StartError) when the run cannot start; nothing is written."""
    with start_checks():
        for job in jobs:
            output_folder.require_usable(job.out_dir)
        refuse_output_inside_input(data, jobs)
        casts = input_types.parse_casts(casts)
        cache = read_input_cache(jobs[0].out_dir)
        ddf, inputs, n_parts, pieces, cache = load_input(data, rows_per_partition, id_field,
                                                          cache)
        if casts:
            inputs = dict(inputs, casts=casts)
        if gpu:
            require_gpu()
        output_columns: dict[str, list[str]] = {}
        for job in jobs:
            output_columns[job.preset.name] = check_contracts(
                ddf.columns, task_contracts(job.preset, id_field, job.route,
                                            job.llm.return_all_choices))
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
                    job.llm.model, tokenizer_name(tokenizers[job.preset.name]), job.out_dir)
    return Prepared(ddf, n_parts, jobs, tokenizers, materials, modes, input_rows, types, cache,
                    served_status, output_columns)


@contextlib.contextmanager
def taken_folders(run: Prepared):
    """Hold every job's output folder and set it up for the run: the earlier run deleted under
    ``overwrite``, ``run.json`` written, the input cache kept for the next start. Yields a list
    that gets the message when another run takes a folder meanwhile (every worker then stops
    sending at once); the caller raises LockLost for it."""
    lost: list[str] = []

    def stop_sending(message: str) -> None:
        lost.append(message)
        drain_everywhere(message)

    with contextlib.ExitStack() as locks:
        for job in run.jobs:
            locks.enter_context(OutputLock(job.out_dir, on_lost=stop_sending))
            prepare_output(job.out_dir, run.materials[job.preset.name],
                           run.modes[job.preset.name])
        if run.cache is not None:  # the folder is ours now: keep what the next start can reuse
            io.atomic_write_bytes(run.jobs[0].out_dir / INPUT_CACHE,
                                  json.dumps(run.cache).encode())
        yield lost


def partition_plans(run: Prepared, id_field: str, seed: int, retry_failed: bool,
                    started: float) -> dict[str, PartitionPlan]:
    """Each job's PartitionPlan (what a worker needs for one partition), by task name."""
    return {job.preset.name: PartitionPlan(job.preset, job.llm, str(job.out_dir),
                                           run.tokenizers[job.preset.name], id_field, seed,
                                           retry_failed, job.route, run.types, started)
            for job in run.jobs}


