"""``plan``: what a run will take, before it is launched. Makes the run's own start checks, counts
the requests and prompt tokens of a deterministic sample of partitions (or all of them) exactly
with the run's tokenizer, sends a short probe through the run's own pools (journaled in the
output folder, so that the run reuses the answers), and projects requests, tokens, rows, bytes,
wall time, GPU-hours and cost over the input (``run.projection``). Writes ``plan.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time

import dask

from nemocc_dask import io
from nemocc_dask.io.storage import as_path
from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.run.execution import distributed_client, register_pool_plugin
from nemocc_dask.run.nemotron_cc import nemotron_cc_jobs
from nemocc_dask.run.output_folder import LockLost
from nemocc_dask.run.pipeline import resolve_task
from nemocc_dask.run.projection import answer_rate, run_projection, task_projection
from nemocc_dask.run.sample import count_partition, probe_partition
from nemocc_dask.run.start import Job, partition_plans, prepare, start_checks, taken_folders

logger = logging.getLogger(__name__)

SAMPLE_DOCUMENTS = 10_000  # documents counted by default (every one under --exact)
PROBE_REQUESTS = 200


def spread(n_parts: int, count: int) -> list[int]:
    """``count`` evenly spaced partition numbers out of ``n_parts`` (all when fewer)."""
    if count >= n_parts:
        return list(range(n_parts))
    if count <= 1:
        return [0]
    return sorted({round(i * (n_parts - 1) / (count - 1)) for i in range(count)})


def sample_partitions(n_parts: int, input_rows: int, documents: int | None) -> list[int]:
    """Evenly spaced partition numbers holding about ``documents`` rows (all for None)."""
    if documents is None or n_parts == 0:
        return list(range(n_parts))
    return spread(n_parts, math.ceil(documents / max(input_rows / n_parts, 1)))


def _worker_slots() -> int:
    """Partitions the cluster runs at once: its worker threads (this host's cores without one)."""
    client = distributed_client()
    if client is None:
        return os.cpu_count() or 1
    return max(sum(client.nthreads().values()), 1)


def _probe_shares(projected: dict[str, float], requests: int) -> dict[str, int]:
    """The probe's requests per task, in proportion to each task's projected requests."""
    total = sum(projected.values())
    if not total or requests <= 0:
        return {name: 0 for name in projected}
    return {name: max(1, round(requests * n / total)) if n else 0
            for name, n in projected.items()}


PROBE_ROUNDS = 4  # each round sends twice the requests of the one before
STEADY = 1.2       # the probe stops once a round's answer rate rose less than this


def _probe(parts: list, plans: dict, probed: list[int], shares: dict[str, int]) -> list[dict]:
    """Rounds of probe requests on the ``probed`` partitions (all at once, as the run has them),
    ``shares`` per task in the first round and twice as many in each next one, until the answer
    rate stops rising (the window is learned), a partition has no more to send, or after
    ``PROBE_ROUNDS``. Returns every probe's
    result, with its ``round``."""
    results: list[dict] = []
    previous = None
    pairs = [(name, i) for name in plans if shares[name] for i in probed]
    for number in range(PROBE_ROUNDS):
        wanted = [math.ceil(shares[name] * 2 ** number / len(probed)) for name, _ in pairs]
        tasks = [dask.delayed(probe_partition)(parts[i], i, plans[name], want,
                                               dask_key_name=f"nemocc-plan-probe-{number}-{name}-{i}")
                 for want, (name, i) in zip(wanted, pairs)]
        if not tasks:
            break
        done = [dict(p, round=number) for p in dask.compute(*tasks)]
        results += done
        rate = answer_rate(done)
        exhausted = any(len(p["answer_times"]) < want for p, want in zip(done, wanted))
        if rate is None or exhausted or (previous is not None and rate < previous * STEADY):
            break
        previous = rate
    return results


def plan_jobs(data, jobs: list[Job], plan_file, *, tokenizer: str | None = None,
              id_field: str = "id", seed: int = 0,
              rows_per_partition: int = io.DEFAULT_ROWS_PER_PARTITION, casts=None,
              sample_documents: int | None = SAMPLE_DOCUMENTS,
              probe_requests: int = PROBE_REQUESTS, endpoints: int | None = None,
              gpus_per_endpoint: float = 1.0, price_input: float | None = None,
              price_output: float | None = None, wait_for_lock: float = 0.0,
              gpu: bool = False) -> dict:
    """Plan ``jobs`` over ``data`` and write the plan as JSON to ``plan_file``; returns it.

    ``sample_documents``: about how many input rows to count (None: all, exact). ``probe_requests``:
    requests per task in the probe's first round, doubled each round until the answer rate
    stops rising (0: no probe; then no time, tokens or rows are projected).
    ``endpoints``: endpoints the run will have (default: the ones given); ``gpus_per_endpoint``
    for GPU-hours; ``price_input``/``price_output``: per million prompt/completion tokens.
    The output folders get their ``run.json`` and the probe's answers in their journals: the run
    with the same settings reuses them (another run's folder is refused, as by the run).
    """
    with contextlib.ExitStack() as servers:
        started = time.time()
        run = prepare(data, jobs, servers, tokenizer=tokenizer, id_field=id_field, seed=seed,
                      overwrite=False, rows_per_partition=rows_per_partition, gpu=gpu,
                      wait_for_lock=wait_for_lock, casts=casts)
        startup = time.time() - started
        chosen = sample_partitions(run.n_parts, run.input_rows, sample_documents)
        with taken_folders(run) as lost:
            register_pool_plugin()
            plans = partition_plans(run, id_field, seed, False, started)
            parts = run.ddf.to_delayed()
            pairs = [(name, i) for name in plans for i in chosen]
            counted = dask.compute(*[
                dask.delayed(count_partition)(parts[i], i, plans[name],
                                              dask_key_name=f"nemocc-plan-count-{name}-{i}")
                for name, i in pairs])
            counts = {name: [c for c, (n, _) in zip(counted, pairs) if n == name]
                      for name in plans}
            slots = _worker_slots()
            scale = run.input_rows / max(sum(c["input_rows"] for c in counts[jobs[0].preset.name]),
                                         1)
            shares = _probe_shares({name: sum(c["requests"] for c in counts[name]) * scale
                                    for name in plans}, probe_requests)
            probes = _probe(parts, plans, spread(run.n_parts, slots), shares)
        if lost:
            raise LockLost(lost[0])
    result = _projection(run, counts, probes, chosen, slots, startup, endpoints,
                         gpus_per_endpoint, price_input, price_output)
    result["settings"] = {"sample_documents": sample_documents, "probe_requests": probe_requests,
                          "rows_per_partition": rows_per_partition,
                          "price_input": price_input, "price_output": price_output,
                          "gpus_per_endpoint": gpus_per_endpoint,
                          "output": [str(job.out_dir) for job in run.jobs]}
    result["planned_at"] = time.time()
    io.atomic_write_bytes(as_path(plan_file), json.dumps(result, indent=1).encode())
    return result


def _projection(run, counts: dict[str, list[dict]], probes: list[dict], chosen: list[int],
                slots: int, startup: float, endpoints: int | None, gpus_per_endpoint: float,
                price_input: float | None, price_output: float | None) -> dict:
    """The plan document: the input's sample, each task's projection, the run's total."""
    tasks = {}
    for job in run.jobs:
        name = job.preset.name
        max_tokens = job.llm.request_settings(job.preset).get("max_tokens") or 0
        tasks[name] = task_projection(counts[name], [p for p in probes if p["task"] == name],
                                      run.input_rows, max_tokens, job.preset.max_input_tokens,
                                      job.llm.max_model_len)
        tasks[name]["probe"] = {"answers": sum(p["answers"] for p in probes
                                               if p["task"] == name),
                                "failed": sum(p["failed"] for p in probes if p["task"] == name)}
    probed_endpoints = len(run.jobs[0].llm.endpoints)
    total = run_projection(tasks, [c for name in counts for c in counts[name]], probes,
                           total_rows=run.input_rows, partitions=run.n_parts, slots=slots,
                           startup_seconds=startup, endpoints_probed=probed_endpoints,
                           endpoints=endpoints or probed_endpoints,
                           gpus_per_endpoint=gpus_per_endpoint, price_input=price_input,
                           price_output=price_output)
    sampled_rows = sum(c["input_rows"] for c in counts[run.jobs[0].preset.name])
    return {"input": {"rows": run.input_rows, "partitions": run.n_parts,
                      "sampled_partitions": len(chosen), "sampled_rows": sampled_rows,
                      "exact": sampled_rows == run.input_rows, "worker_slots": slots},
            "tasks": tasks, "total": total}


def plan(data, output, task, llm: LLMConfig, *, text_field: str | None = None,
         plan_file=None, overrides: dict | None = None, **options) -> dict:
    """Plan one task's run (the arguments of ``run_to_parquet``, its preset ``overrides`` as a
    dict, and ``plan_jobs``' options); the plan is written to ``plan_file`` (default
    ``output/plan.json``)."""
    with start_checks():
        job = Job(resolve_task(task, text_field, **(overrides or {})), llm, as_path(output))
    return plan_jobs(data, [job], plan_file or job.out_dir / "plan.json", **options)


def plan_nemotron_cc(data, output, llm, *, text_field: str | None = None,
                     quality_field: str = "bucketed_results", threshold: float = 11, tasks=None,
                     plan_file=None, overrides: dict | None = None, **options) -> dict:
    """Plan the quality-routed pipeline (the arguments of ``run_nemotron_cc_to_parquet``); the
    plan is written to ``plan_file`` (default ``output/plan.json``)."""
    with start_checks():
        jobs = nemotron_cc_jobs(output, llm, text_field, quality_field, threshold, tasks,
                                overrides=overrides)
    return plan_jobs(data, jobs, plan_file or as_path(output) / "plan.json", **options)


def _number(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}{unit}"
    return f"{int(value):,}{unit}"


def render_plan(result: dict) -> str:
    """The plan as a short text table."""
    source = result["input"]
    sample = ("every row counted" if source["exact"] else
              f"{source['sampled_rows']:,} of {source['rows']:,} rows counted "
              f"({source['sampled_partitions']} of {source['partitions']} partitions)")
    lines = [f"plan: {source['rows']:,} input rows in {source['partitions']} partitions; {sample}"]
    for name, t in result["tasks"].items():
        interval = "" if t["requests_interval"][0] == t["requests_interval"][1] else \
            f" (95%: {t['requests_interval'][0]:,.0f}-{t['requests_interval'][1]:,.0f})"
        lines.append(f"task {name}: {t['requests']:,} requests{interval}, "
                     f"{t['requests_to_send']:,} still to send; "
                     f"prompt tokens {_number(t['prompt_tokens'])}, completion tokens "
                     f"{_number(t['completion_tokens'])}; rows expected "
                     f"{_number(t['rows_expected'])}")
        context = t["context"]
        if not context["fits"]:
            lines.append(f"  context: the task needs {context['task_needs']} tokens per request, "
                         f"the model is served with {context['served']}; "
                         f"{context['prompts_too_long']:,} prompts would not be sent")
    total = result["total"]
    lines.append(f"total: {total['requests']:,} requests, "
                 f"{_number(total['completion_tokens'])} completion tokens, output "
                 f"{_number(total['output_bytes'] and total['output_bytes'] / 1e6, ' MB')}")
    if total["wall_seconds"] is not None:
        lines.append(f"at {total['answers_per_second']:,} answers/s on {total['endpoints']} "
                     f"endpoint(s): about {_number(total['wall_seconds'], ' s')} "
                     f"({_number(total['wall_hours'], ' h')}), "
                     f"{_number(total['gpu_hours'])} GPU-hours")
    if total["cost"] is not None:
        lines.append(f"cost: {total['cost']:,.2f}")
    return "\n".join(lines)
