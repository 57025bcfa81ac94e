"""Dask-level pipeline: ``preprocess``, ``generate``, ``postprocess`` and ``run_task`` build lazy Dask
DataFrames from the partition functions; nothing is computed on the driver. Each checks the
columns its stages declare (``recipe.stages.contracts``) when the graph is built.
"""

from __future__ import annotations

import dataclasses

from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.recipe.presets import TaskPreset, get_preset
from nemocc_dask.recipe.stages.contracts import (check_contracts, generate_contract,
                                                 postprocess_contract, preprocess_contract,
                                                 task_contracts)
from nemocc_dask.recipe.stages.postprocess import postprocess_partition, resolve_steps
from nemocc_dask.recipe.stages.preprocess import preprocess_partition
from nemocc_dask.run.generate import generate_partition


def resolve_task(task: str | TaskPreset, text_field: str | None = None,
                 **overrides) -> TaskPreset:
    """The preset for ``task`` with overrides; ``text_field`` becomes the preset's input field."""
    preset = get_preset(task, **overrides)
    if text_field and text_field != preset.input_field:
        preset = dataclasses.replace(preset, input_field=text_field)
    resolve_steps(preset.postprocess_steps)
    return preset


def preprocess(ddf, task: str | TaskPreset, *, tokenizer=None, text_field: str | None = None,
               id_field: str = "id", **overrides):
    """Segments ready for prompting (lazy, partition-wise, no shuffle).

    Reads columns: the text field (``text``) and ``id_field``. Writes columns: every input column
    plus ``document_token_count``, ``segment_id`` and ``segment_token_count``; one row per
    segment."""
    preset = resolve_task(task, text_field, **overrides)
    check_contracts(ddf.columns, [preprocess_contract(preset, id_field)])
    kwargs = dict(preset=preset, tokenizer=tokenizer, text_field=preset.input_field,
                  id_field=id_field)
    meta = preprocess_partition(ddf._meta, **kwargs)
    return ddf.map_partitions(preprocess_partition, **kwargs, meta=meta)


def generate(ddf, task: str | TaskPreset, llm: LLMConfig, *, tokenizer=None,
             text_field: str | None = None, journal_dir=None, check_endpoint: bool = True,
             **overrides):
    """Send one request per row (lazy).

    Reads columns: the task's input field (``text``). Writes columns: the task's output field,
    ``llm_finish_reason``, ``llm_prompt_tokens``, ``llm_completion_tokens``, ``llm_error``,
    ``llm_model`` and ``task``, on every row. Building the graph sends nothing: the
    endpoint is checked (``GET /models``) once per worker process when the first partition
    runs, unless ``check_endpoint=False``. With ``journal_dir`` (a local path or URL) every
    answer is journaled per partition there, so computing the result again (or a Dask retry of
    a lost partition) reuses the answers instead of paying for them twice. On a distributed
    cluster the workers share ``llm.max_in_flight`` through the scheduler.
    """
    preset = resolve_task(task, text_field, **overrides)
    check_contracts(ddf.columns, [generate_contract(preset, llm.return_all_choices)])
    kwargs = dict(preset=preset, llm=llm, tokenizer=tokenizer, check_endpoint=check_endpoint)
    meta = generate_partition(ddf._meta, **kwargs)
    if journal_dir is not None:
        kwargs["journal_dir"] = str(journal_dir)
    return ddf.map_partitions(generate_partition, **kwargs, meta=meta)


def postprocess(ddf, task: str | TaskPreset, *, tokenizer=None, text_field: str | None = None,
                id_field: str = "id", seed: int = 0, **overrides):
    """The task's post-processing chain (lazy).

    Reads columns: the task's output field, ``id_field``, ``llm_error``/``llm_finish_reason``
    when present (and ``text``, ``segment_id`` for the tasks that need them). Writes columns: the
    cleaned output field, ``response_token_count``, ``output_token_count`` (re-joined Wikipedia
    documents also ``segments_total``/``segments_kept``); one row per kept result. Rows removed
    by a step are dropped here; ``run_to_parquet`` keeps them as rejects with their reason."""
    preset = resolve_task(task, text_field, **overrides)
    check_contracts(ddf.columns, [postprocess_contract(preset, id_field)])
    kwargs = dict(preset=preset, tokenizer=tokenizer, id_field=id_field, seed=seed)
    meta = postprocess_partition(ddf._meta, **kwargs)
    return ddf.map_partitions(postprocess_partition, **kwargs, meta=meta)


def run_task(ddf, task: str | TaskPreset, llm: LLMConfig, *, tokenizer=None,
             text_field: str | None = None, id_field: str = "id", seed: int = 0,
             journal_dir=None, **overrides):
    """preprocess -> generate -> postprocess, lazy. Reads columns ``id_field`` and the text
    field; writes what ``postprocess`` writes. Truncated and failed rows are not in the result
    (use ``run_to_parquet`` to keep them as rejects). Without ``journal_dir`` each
    compute of the result sends every request again; with it, answers are reused."""
    preset = resolve_task(task, text_field, **overrides)
    check_contracts(ddf.columns, task_contracts(preset, id_field,
                                                all_choices=llm.return_all_choices))
    segments = preprocess(ddf, preset, tokenizer=tokenizer, id_field=id_field)
    generated = generate(segments, preset, llm, tokenizer=tokenizer, journal_dir=journal_dir)
    return postprocess(generated, preset, tokenizer=tokenizer, id_field=id_field, seed=seed)
