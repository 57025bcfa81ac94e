"""The ``nemocc-dask`` command: run, nemotron-cc, plan, demo, serve-mock, presets, verify.

Exit status: 0 when a run finished (even with failed rows, which the summary shows); 2 when it could
not start (bad input, settings, prompt file, output folder, endpoint, cluster, GPU), with the fix in
the message and the output folder unchanged; 75 when SIGTERM stopped it cleanly (answers in flight
journaled; requeue or rerun to resume); 1 when it started and then stopped (a broken
endpoint or client, an error in a post-processing step, counts that do not add up), with one line
and a hint (the traceback with ``-v``): rerunning the same command resumes.

One module because the command line is one surface: its parser and the commands that map the
options onto the config objects are read and changed together.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import dask.config

from nemocc_dask import io
from nemocc_dask.config import setting
from nemocc_dask.errors import ConfigError, Preempted, StartError
from nemocc_dask.io.gpu import require_gpu
from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.options import add_field_options, given
from nemocc_dask.recipe.presets import HIGH_QUALITY_TASKS, LOW_QUALITY_TASKS, PRESETS, TaskPreset
from nemocc_dask.run.cluster import make_client, parse_adapt
from nemocc_dask.run.plan import PROBE_REQUESTS, SAMPLE_DOCUMENTS
from nemocc_dask.run.report import combine, render_table
from nemocc_dask.run.start import start_checks
from nemocc_dask.serve.process import ServeSpec


def _at_least(minimum, kind=int):
    """An argparse type: a ``kind`` number of at least ``minimum`` (a usage error, exit 2,
    otherwise: ``--workers 0`` would start a cluster that never runs anything)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} (got {text})")
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_endpoint_options(p: argparse.ArgumentParser) -> None:
    """Every LLMConfig field but the key and the Python-only ones, the served model's options,
    and every TaskPreset field a run may override (built from the dataclasses: ``options``)."""
    g = p.add_argument_group("endpoint (LLMConfig; the key comes from --api-key-env)")
    add_field_options(g, LLMConfig, skip=LLM_SKIPPED)
    served = p.add_argument_group("served model (start the server next to each worker)")
    served.add_argument("--serve", metavar="COMMAND|PRESET:MODEL",
                        help="command template with {port} ({host}, {gpu} optional), e.g. "
                             "'vllm serve /models/llama --host {host} --port {port}', or "
                             "a preset vllm:MODEL, sglang:MODEL, llamacpp:MODEL.gguf, followed by "
                             "extra arguments if any ('vllm:/models/llama --max-num-seqs 512')")
    add_field_options(served, ServeSpec, skip=SERVE_SKIPPED, prefix="serve-")
    task = p.add_argument_group("task settings (each defaults to the task's own value: "
                                "`nemocc-dask presets`; TaskPreset)")
    add_field_options(task, TaskPreset, skip=TASK_SKIPPED, rename=TASK_RENAMED,
                      show_defaults=False)


LLM_SKIPPED = ("api_key", "client_factory", "serve")  # a secret; Python objects
TASK_SKIPPED = ("name", "prompt_template", "output_field",  # the task itself (--prompt-file)
                "input_field")  # --text-field
TASK_RENAMED = {"seed": "--generation-seed"}  # --seed is the run's sampling seed
SERVE_SKIPPED = ("command", "model", "backend")  # --serve gives them


def _add_run_options(p: argparse.ArgumentParser, planning: bool = False) -> None:
    """The input, output, tokenizer and cluster options (``planning``: without the options
    that only a run has)."""
    p.add_argument("--input", action="append", required=True,
                   help="parquet/JSONL file, folder (searched recursively) or local glob "
                        "pattern in quotes ('data/*.parquet'); repeatable")
    p.add_argument("--output", required=True, help="output folder (resumed when rerun)")
    p.add_argument("--tokenizer", help="HF name in the local cache, folder, tokenizer.json, "
                                       ".gguf or 'bundled' (default: the served model's, found "
                                       "through the server's /tokenize or locally; else the "
                                       "bundled Qwen2.5); 'served': as the default, and count "
                                       "through the server's /tokenize even when that would "
                                       "take long")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument("--cast", action="append", metavar="COLUMN=TYPE",
                   help="one declared type (string, int64 or double) for an input column whose "
                        "files disagree, e.g. --cast id=string (repeatable; other columns get "
                        "one type decided from the files)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-row sampling (diverse_qa)")
    p.add_argument("--wait-for-lock", type=_at_least(0, float), default=0.0, metavar="SECONDS",
                   help="wait this long for another run to release --output (a requeued job "
                        "that starts while the old one drains) before refusing (default 0)")
    p.add_argument("--rows-per-partition", type=_at_least(1), default=io.DEFAULT_ROWS_PER_PARTITION)
    if not planning:
        _add_run_only_options(p)
    c = p.add_argument_group("cluster")
    c.add_argument("--cluster", choices=["local", "local-cuda", "slurm"])
    c.add_argument("--gpu", action="store_true",
                   help="cuDF partitions: filters, splits, joins and cleanups run on the GPU "
                        "(implies --cluster local-cuda unless a cluster or scheduler is given)")
    c.add_argument("--scheduler", help="address of a running scheduler (tcp://host:8786)")
    c.add_argument("--scheduler-file", help="scheduler file of a running scheduler")
    c.add_argument("--workers", type=_at_least(1), help="local worker processes (default 2)")
    c.add_argument("--threads-per-worker", type=_at_least(1), help="partitions in flight per worker")
    c.add_argument("--slurm-jobs", type=_at_least(1), help="SLURM worker jobs")
    c.add_argument("--adapt", metavar="MIN:MAX",
                   help="SLURM worker jobs scaled with the work between MIN and MAX")
    c.add_argument("--slurm-queue")
    c.add_argument("--slurm-account")
    c.add_argument("--slurm-walltime")


def _add_run_only_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="discard an earlier run in --output")
    p.add_argument("--retry-failed", action="store_true",
                   help="resend requests that failed in an earlier run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--metrics-port", type=_at_least(0), metavar="PORT",
                   help="serve the run's live figures (partitions, answers, errors, tokens, ETA, "
                        "each endpoint's window, in flight and queue) in the Prometheus format "
                        "at http://127.0.0.1:PORT/metrics (0: a free port, printed)")


def _add_quality_options(p: argparse.ArgumentParser) -> None:
    """The quality route's options (the nemotron-cc pipeline)."""
    p.add_argument("--quality-field", default="bucketed_results",
                   help="the column with each document's quality bucket (0-19 in "
                        "Nemotron-CC); documents at or below --threshold are low quality "
                        "(paraphrased), the others high quality (the four other tasks)")
    p.add_argument("--threshold", type=float, default=11,
                   help="buckets > threshold are high quality (default 11)")
    p.add_argument("--tasks", help="comma-separated subset of: "
                                   + ",".join(LOW_QUALITY_TASKS + HIGH_QUALITY_TASKS))


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan")
    g.add_argument("--sample-documents", type=_at_least(1), default=SAMPLE_DOCUMENTS, metavar="N",
                   help="count the requests of about N input rows, evenly spread over the "
                        f"partitions (default {SAMPLE_DOCUMENTS:,}); the rest is projected")
    g.add_argument("--exact", action="store_true", help="count every input row")
    g.add_argument("--probe-requests", type=_at_least(0), default=PROBE_REQUESTS, metavar="N",
                   help="requests in the probe's first round (shared among the tasks by their "
                        "requests), doubled each round until the answer rate stops rising "
                        f"(default {PROBE_REQUESTS}; journaled: the run reuses them; 0: no "
                        "probe, counts only)")
    g.add_argument("--endpoints", type=_at_least(1), metavar="N",
                   help="endpoints the run will have (default: the ones given; the probe's "
                        "rate is scaled to them)")
    g.add_argument("--gpus-per-endpoint", type=_at_least(0, float), default=1.0,
                   help="GPUs behind each endpoint, for GPU-hours (default 1)")
    g.add_argument("--price-input", type=_at_least(0, float), metavar="PRICE",
                   help="price per million prompt tokens (for the cost)")
    g.add_argument("--price-output", type=_at_least(0, float), metavar="PRICE",
                   help="price per million completion tokens (for the cost)")
    g.add_argument("--plan-file", help="where to write the plan as JSON (default "
                                       "OUTPUT/plan.json)")


def _serve_from_args(args):
    """The ServeSpec of --serve and its --serve-* options, or None."""
    return ServeSpec.parse(args.serve, **given(args, ServeSpec)) if args.serve else None


def _llm_from_args(args) -> LLMConfig:
    with start_checks():
        fields = given(args, LLMConfig)
        if args.serve and fields.get("base_url"):
            raise ValueError("give --serve or --base-url, not both")
        return LLMConfig(**fields, serve=_serve_from_args(args))


def _task_overrides(args) -> dict:
    """The TaskPreset fields given on the command line (--temperature, --max-input-tokens ...)."""
    return given(args, TaskPreset)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _client(args):
    cluster = args.cluster
    if args.gpu:
        require_gpu()
        if not (cluster or args.scheduler or args.scheduler_file):
            cluster = "local-cuda"
    if args.adapt:
        parse_adapt(args.adapt)
        if (cluster or setting("cluster")) != "slurm" or args.scheduler \
                or args.scheduler_file:
            raise ConfigError("--adapt scales SLURM worker jobs: use it with --cluster slurm")
    # Worker processes (and the servers they start) inherit an ignored SIGINT: Ctrl-C in the
    # terminal reaches the whole process group, and only the driver should act on it (drain,
    # one message, then stop the cluster), not every worker with a traceback.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
    try:
        client = make_client(cluster, args.scheduler, args.scheduler_file, args.workers,
                             args.threads_per_worker,
                             worker_log_level=logging.WARNING if args.verbose else
                             logging.CRITICAL, jobs=args.slurm_jobs, adapt=args.adapt,
                             queue=args.slurm_queue, account=args.slurm_account,
                             walltime=args.slurm_walltime)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    try:
        yield client
    finally:
        cluster = client.cluster
        # a slow shutdown on a busy machine ("Worker process still alive after 4.0 seconds,
        # killing") is Dask's business, not the user's: only -v shows it
        chatter = logging.getLogger("distributed")
        level = chatter.level
        if not args.verbose:
            chatter.setLevel(logging.ERROR)
        try:
            client.close()
            if cluster is not None:
                cluster.close()
        finally:
            chatter.setLevel(level)


def _print_reports(reports: dict, out) -> None:
    for name, report in reports.items():
        print(render_table(report, f"task {name}"))
        print()
    print(f"output: {out}")
    failed = sum(r.get("failed_requests", 0) for r in reports.values())
    if failed:
        classes = sorted({c for r in reports.values() for c in r.get("failed_by_class", {})})
        print(f"{failed} request(s) failed at the LLM ({', '.join(classes)}); their rows are in "
              "rejects/. Once the cause is fixed, rerun the same command with --retry-failed "
              "to resend only those", file=sys.stderr)


def _task_from_args(args, alternative: str | None = None):
    """The task of --task or --prompt-file; ConfigError naming the choices (and
    ``alternative``, another way to give one) when neither is given."""
    from nemocc_dask.recipe.task_file import load_task_file

    if not args.task and not args.prompt_file:
        others = f", --prompt-file, or {alternative}" if alternative else " or --prompt-file"
        raise ConfigError(f"give --task NAME (one of {', '.join(PRESETS)}){others}")
    return load_task_file(args.prompt_file) if args.prompt_file else args.task


def _tasks_from_args(args) -> list[str] | None:
    """The pipeline's tasks of --tasks (None: all)."""
    return [t for t in (args.tasks or "").split(",") if t] or None


def cmd_run(args) -> int:
    from nemocc_dask.run.runner import run_to_parquet

    task = _task_from_args(args)
    llm = _llm_from_args(args)
    with _client(args):
        report = run_to_parquet(args.input, args.output, task, llm, tokenizer=args.tokenizer,
                                text_field=args.text_field, id_field=args.id_field,
                                seed=args.seed, overwrite=args.overwrite,
                                retry_failed=args.retry_failed,
                                rows_per_partition=args.rows_per_partition,
                                show_progress=not args.no_progress, gpu=args.gpu,
                                wait_for_lock=args.wait_for_lock, casts=args.cast,
                                metrics_port=args.metrics_port, **_task_overrides(args))
    _print_reports({report["task"]: report}, args.output)
    return 0


def cmd_nemotron_cc(args) -> int:
    from nemocc_dask.run.nemotron_cc import run_nemotron_cc_to_parquet

    tasks = _tasks_from_args(args)
    llm = _llm_from_args(args)
    with _client(args):
        reports = run_nemotron_cc_to_parquet(
            args.input, args.output, llm, quality_field=args.quality_field,
            threshold=args.threshold, tasks=tasks, tokenizer=args.tokenizer,
            text_field=args.text_field, id_field=args.id_field, seed=args.seed,
            overwrite=args.overwrite, retry_failed=args.retry_failed,
            rows_per_partition=args.rows_per_partition, show_progress=not args.no_progress,
            gpu=args.gpu, wait_for_lock=args.wait_for_lock, casts=args.cast,
            metrics_port=args.metrics_port, overrides=_task_overrides(args))
    _print_reports(reports, args.output)
    combined = combine(reports)
    print(json.dumps({"total": combined["total"]}, indent=1))
    return 0


def cmd_plan(args) -> int:
    from nemocc_dask.run.plan import plan, plan_nemotron_cc, render_plan

    options = dict(tokenizer=args.tokenizer, text_field=args.text_field, id_field=args.id_field,
                   seed=args.seed, rows_per_partition=args.rows_per_partition, casts=args.cast,
                   sample_documents=None if args.exact else args.sample_documents,
                   probe_requests=args.probe_requests, endpoints=args.endpoints,
                   gpus_per_endpoint=args.gpus_per_endpoint, price_input=args.price_input,
                   price_output=args.price_output, wait_for_lock=args.wait_for_lock,
                   gpu=args.gpu, plan_file=args.plan_file)
    if args.pipeline == "nemotron-cc":
        if args.task or args.prompt_file:
            raise ConfigError("--pipeline nemotron-cc plans its own tasks: choose them with "
                              "--tasks, not --task or --prompt-file")
        tasks = _tasks_from_args(args)
        llm = _llm_from_args(args)
        with _client(args):
            result = plan_nemotron_cc(args.input, args.output, llm,
                                      quality_field=args.quality_field,
                                      threshold=args.threshold, tasks=tasks,
                                      overrides=_task_overrides(args), **options)
    else:
        task = _task_from_args(args, "--pipeline nemotron-cc")
        llm = _llm_from_args(args)
        with _client(args):
            result = plan(args.input, args.output, task, llm,
                          overrides=_task_overrides(args), **options)
    print(render_plan(result))
    print(f"plan: {args.plan_file or Path(args.output) / 'plan.json'}")
    return 0


def cmd_demo(args) -> int:
    from nemocc_dask.run.runner import run_to_parquet
    from nemocc_dask.testing.mock import MockLLMServer

    out = Path(args.output or tempfile.mkdtemp(prefix="nemocc-dask-demo-"))
    with MockLLMServer(latency=0.05, per_token_latency=0.0005, tokenizer="bundled") as server:
        llm = LLMConfig(base_url=server.base_url, model="mock")
        print(f"mock LLM server on {server.base_url}; sample corpus {io.SAMPLE_PATH}",
              file=sys.stderr)
        with _client(args):
            report = run_to_parquet(str(io.SAMPLE_PATH), out, args.task, llm, overwrite=True,
                                    rows_per_partition=50, show_progress=not args.no_progress,
                                    gpu=args.gpu)
    _print_reports({args.task: report}, out)
    _print_example_row(out, PRESETS[args.task].output_field)
    print(f"rows are in {out / 'parts'}; rejects in {out / 'rejects'}; "
          f"report {out / 'report.json'}")
    print("The mock server writes made-up answers shaped like the task's, and cuts some of them "
          "at max_tokens on purpose, so that the truncated and too-short rejects show up.")
    return 0


def _print_example_row(out: Path, column: str) -> None:
    """The first written row's output column, shortened."""
    import pandas as pd

    parts = sorted((out / "parts").glob("*.parquet"))
    rows = next((frame for frame in (pd.read_parquet(p) for p in parts) if len(frame)), None)
    if rows is not None:
        text = str(rows[column].iloc[0])
        print(f"example row ({column}): {text[:400]}{' ...' if len(text) > 400 else ''}")


def cmd_serve_mock(args) -> int:
    from nemocc_dask.testing.mock import serve_forever

    serve_forever(port=args.port, host=args.host, models=tuple(args.model or ["mock"]),
                  latency=args.latency,
                  per_token_latency=args.per_token_latency, max_concurrency=args.max_concurrency,
                  rate_429=args.rate_429, rate_500=args.rate_500, rate_drop=args.rate_drop,
                  api_key=os.environ.get(args.api_key_env) if args.api_key_env else None,
                  max_model_len=args.max_model_len, tokenizer=args.tokenizer,
                  tokenize_route=not args.no_tokenize_route, capacity=args.capacity,
                  knee=args.knee, metrics=not args.no_metrics, retry_after=args.retry_after,
                  noise_sigma=args.noise_sigma, overflow=args.overflow)
    return 0


def cmd_verify(args) -> int:
    from nemocc_dask.run.verify import verify

    return verify(args.output)


def cmd_presets(args) -> int:
    header = ("task", "output", "min doc", "min seg", "max in", "max out", "post max", "post min",
              "prefix")
    rows = [header] + [(p.name, p.output_field, p.min_document_tokens, p.min_segment_tokens,
                        p.max_input_tokens, p.max_output_tokens, p.effective_postprocess_max_tokens,
                        p.postprocess_min_tokens, p.response_prefix or "-")
                       for p in PRESETS.values()]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    print("\ngeneration defaults: temperature 0.5, top_p 0.9, max_tokens = max out, no stop, "
          "no top_k")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemocc-dask", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: the package's own INFO lines (window changes, retries, "
                             "tracebacks); -vv: Dask's too")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one task over parquet/JSONL input")
    run.add_argument("--task", choices=list(PRESETS))
    run.add_argument("--prompt-file", help="custom task as TOML, YAML or JSON")
    _add_run_options(run)
    _add_endpoint_options(run)
    run.set_defaults(fn=cmd_run)

    full = sub.add_parser("nemotron-cc", help="the quality-routed five-task pipeline")
    _add_quality_options(full)
    _add_run_options(full)
    _add_endpoint_options(full)
    full.set_defaults(fn=cmd_nemotron_cc)

    planned = sub.add_parser("plan", help="what a run will take (requests, tokens, rows, disk, "
                                           "wall time, GPU-hours, cost), from a counted "
                                           "sample and a short probe of the endpoint")
    planned.add_argument("--task", choices=list(PRESETS))
    planned.add_argument("--prompt-file", help="custom task as TOML, YAML or JSON")
    planned.add_argument("--pipeline", choices=["nemotron-cc"],
                         help="plan the quality-routed five-task pipeline instead of one task")
    _add_quality_options(planned)
    _add_run_options(planned, planning=True)
    _add_endpoint_options(planned)
    _add_plan_options(planned)
    planned.set_defaults(fn=cmd_plan)

    demo = sub.add_parser("demo", help="bundled sample + in-process mock server + LocalCluster "
                                       "(LocalCUDACluster with --gpu)")
    demo.add_argument("--task", default="diverse_qa", choices=list(PRESETS))
    demo.add_argument("--output", help="output folder (default: a temp folder)")
    demo.add_argument("--workers", type=_at_least(1), default=2)
    demo.add_argument("--threads-per-worker", type=_at_least(1), default=2)
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--gpu", action="store_true", help="cuDF partitions on a LocalCUDACluster")
    demo.set_defaults(fn=cmd_demo, cluster=None, scheduler=None, scheduler_file=None,
                      slurm_jobs=None, adapt=None, slurm_queue=None, slurm_account=None,
                      slurm_walltime=None)

    mock = sub.add_parser("serve-mock", help="serve the mock OpenAI-compatible LLM")
    mock.add_argument("--port", type=int, default=8000)
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--model", action="append")
    mock.add_argument("--latency", type=float, default=0.2, help="fixed seconds per request")
    mock.add_argument("--per-token-latency", type=float, default=0.002)
    mock.add_argument("--max-concurrency", type=int, default=2048)
    mock.add_argument("--max-model-len", type=int, help="served context reported by /v1/models")
    mock.add_argument("--tokenizer", default="bundled",
                      help="the served model's tokenizer (tokenizer.json, folder or .gguf; "
                           "default: the bundled Qwen2.5): counts prompts, serves POST /tokenize")
    mock.add_argument("--no-tokenize-route", action="store_true",
                      help="with --tokenizer, do not serve POST /tokenize")
    mock.add_argument("--capacity", type=int,
                      help="decode like a continuous-batching server: at most this many "
                           "sequences at once, the rest queued (per token: per-token-latency * "
                           "(1 + decoding / knee))")
    mock.add_argument("--knee", type=float, help="with --capacity (default: the capacity)")
    mock.add_argument("--no-metrics", action="store_true",
                      help="do not serve GET /metrics (vLLM's running/waiting gauges)")
    mock.add_argument("--noise-sigma", type=float, default=0.0,
                      help="multiply every service time by exp(N(0, sigma))")
    mock.add_argument("--overflow", choices=["queue", "429"], default="queue",
                      help="what a request finds when every slot is busy: a FIFO queue "
                           "(default) or an immediate 429")
    mock.add_argument("--rate-429", type=float, default=0.0)
    mock.add_argument("--retry-after", type=float, default=0.05,
                      help="Retry-After seconds sent with injected 429s")
    mock.add_argument("--rate-500", type=float, default=0.0)
    mock.add_argument("--rate-drop", type=float, default=0.0)
    mock.add_argument("--api-key-env", help="require the key in this environment variable")
    mock.set_defaults(fn=cmd_serve_mock)

    presets = sub.add_parser("presets", help="print the task defaults table")
    presets.set_defaults(fn=cmd_presets)
    check = sub.add_parser("verify", help="check an output folder's parts against their stats "
                                          "(size, sha256, rows) without running anything")
    check.add_argument("output", help="the --output of a run (a task's or nemotron-cc's)")
    check.set_defaults(fn=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "gpu"):
        args.gpu = args.gpu or bool(setting("gpu"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:  # read when distributed is first imported; its default is INFO
        # A failed partition is reported once, by this command (the worker would also log it
        # with a traceback); -v adds the package's INFO lines, -vv Dask's too (its "Run
        # out-of-band function" lines alone would drown the rest).
        quiet = {"distributed": "warning",
                 "distributed.worker": "warning" if args.verbose else "critical"}
        dask.config.set({"logging": {**dask.config.get("logging", {}), **quiet}})
    try:
        return args.fn(args)
    except StartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:  # SIGTERM (75) or Ctrl-C (130), after a drain
        print(f"stopped: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # the run started and stopped: say why, keep the traceback for -v
        if args.verbose:
            traceback.print_exc()
        print(f"error: the run stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        if not args.verbose:
            print("hint: rerun with -v for the traceback; rerunning the same command resumes "
                  "where this run stopped", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
