"""The full Nemotron-CC recipe: documents routed by quality bucket before preprocessing, low
quality (``<= threshold``) to Wikipedia-style paraphrasing, high quality to the four other tasks,
all in one graph so the input is read once and all tasks share each worker's pool and window.
"""

from __future__ import annotations

import json

from nemocc_dask import io
from nemocc_dask.io.storage import as_path
from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.recipe.presets import HIGH_QUALITY_TASKS, LOW_QUALITY_TASKS
from nemocc_dask.recipe.stages.route import Route, select_route
from nemocc_dask.recipe.stages.contracts import check_contracts, route_contract
from nemocc_dask.run.pipeline import resolve_task, run_task
from nemocc_dask.run.report import combine
from nemocc_dask.run.runner import run_jobs
from nemocc_dask.run.start import Job, start_checks


def _routes(tasks, high_tasks, low_tasks) -> dict[str, bool]:
    """task -> True for the high-quality route, False for the low one."""
    high_tasks, low_tasks = tuple(high_tasks), tuple(low_tasks)
    chosen = list(tasks) if tasks else list(low_tasks + high_tasks)
    unknown = [t for t in chosen if t not in high_tasks + low_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the pipeline runs "
                         f"{', '.join(low_tasks + high_tasks)}")
    return {t: t in high_tasks for t in chosen}


def _llm_for(task: str, llm: LLMConfig | dict) -> LLMConfig:
    if isinstance(llm, LLMConfig):
        return llm
    if task not in llm and "default" not in llm:
        raise ValueError(f"no LLMConfig for task {task!r}; give one per task or a 'default'")
    return llm.get(task, llm.get("default"))


def run_nemotron_cc(ddf, llm: LLMConfig | dict, *, tokenizer=None, text_field: str | None = None,
                    id_field: str = "id", seed: int = 0, quality_field: str = "bucketed_results",
                    threshold: float = 11, tasks=None, high_tasks=HIGH_QUALITY_TASKS,
                    low_tasks=LOW_QUALITY_TASKS, **overrides) -> dict:
    """One lazy frame per task (a dict). ``llm`` is one LLMConfig or a dict task -> LLMConfig (with
    an optional ``"default"``). Documents with a missing or non-numeric quality are in no task."""
    check_contracts(ddf.columns, [route_contract(Route(quality_field, float(threshold), True))])
    frames = {}
    for task, high in _routes(tasks, high_tasks, low_tasks).items():
        routed = ddf.map_partitions(select_route, Route(quality_field, float(threshold), high),
                                    meta=ddf._meta)
        frames[task] = run_task(routed, task, _llm_for(task, llm), tokenizer=tokenizer,
                                text_field=text_field, id_field=id_field, seed=seed, **overrides)
    return frames


def nemotron_cc_jobs(output, llm: LLMConfig | dict, text_field: str | None = None,
                     quality_field: str = "bucketed_results", threshold: float = 11, tasks=None,
                     high_tasks=HIGH_QUALITY_TASKS, low_tasks=LOW_QUALITY_TASKS,
                     overrides: dict | None = None) -> list[Job]:
    """One Job per task of the pipeline, each into ``output/<task>/`` on its quality route;
    ``overrides``: preset fields set for every task (e.g. ``{"temperature": 0.7}``)."""
    return [Job(resolve_task(task, text_field, **(overrides or {})), _llm_for(task, llm),
                as_path(output) / task,
                Route(quality_field, float(threshold), high))
            for task, high in _routes(tasks, high_tasks, low_tasks).items()]


def run_nemotron_cc_to_parquet(data, output, llm: LLMConfig | dict, *, tokenizer=None,
                               text_field: str | None = None, id_field: str = "id", seed: int = 0,
                               quality_field: str = "bucketed_results", threshold: float = 11,
                               tasks=None, high_tasks=HIGH_QUALITY_TASKS,
                               low_tasks=LOW_QUALITY_TASKS,
                               overwrite: bool = False, retry_failed: bool = False,
                               rows_per_partition: int = io.DEFAULT_ROWS_PER_PARTITION,
                               show_progress: bool = True, gpu: bool = False,
                               wait_for_lock: float = 0.0, casts=None,
                               metrics_port: int | None = None,
                               overrides: dict | None = None) -> dict:
    """Write ``output/<task>/`` for every task (same layout and resume as ``run_to_parquet``) and
    ``output/report.json`` (per task and total). Returns the per-task reports. ``casts``,
    ``metrics_port``: see ``runner.run_jobs``; ``overrides``: preset fields for every task
    (generation settings such as ``{"temperature": 0.7}``)."""
    with start_checks():
        jobs = nemotron_cc_jobs(output, llm, text_field, quality_field, threshold, tasks,
                                high_tasks, low_tasks, overrides)
    reports = run_jobs(data, jobs, tokenizer=tokenizer, id_field=id_field, seed=seed,
                       overwrite=overwrite, retry_failed=retry_failed,
                       rows_per_partition=rows_per_partition, show_progress=show_progress,
                       gpu=gpu, wait_for_lock=wait_for_lock, casts=casts,
                       metrics_port=metrics_port)
    io.atomic_write_bytes(as_path(output) / "report.json",
                          json.dumps(combine(reports), indent=1).encode())
    return reports
