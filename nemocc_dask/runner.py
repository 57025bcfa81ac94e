"""Driver side of a lossless run: check everything before the first request and before the output
folder changes, lock the folder, skip finished partitions (or redo those with failed requests under
``retry_failed``), run the rest on the cluster with a live progress line, and write the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask

from nemocc_dask import input_types, io, output_folder
from nemocc_dask.errors import ConfigError, Interrupted, Preempted, RunError, StartError
from nemocc_dask.gpu import require_gpu, to_gpu
from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.llm.generate import prompt_limit
from nemocc_dask.llm.preflight import preflight
from nemocc_dask.llm.telemetry import describe_endpoints, merge_series
from nemocc_dask.output_folder import (MANIFEST, SERVE_LOGS, LockLost, OutputError, OutputLock,
                                       check_output, prepare_output)
from nemocc_dask.partition_job import (PartitionPlan, finished_stats, journal_path,
                                       process_partition)
from nemocc_dask.pipeline import require_columns, require_text_column, resolve_task
from nemocc_dask.presets import TaskPreset
from nemocc_dask.report import aggregate, this_run, with_history
from nemocc_dask.stages.route import Route
from nemocc_dask.storage import as_path, is_remote, refresh
from nemocc_dask.served_tokenizer import FORCE as SERVED, find_served_tokenizer
from nemocc_dask.tokenizer import BUNDLED, load_tokenizer, prompt_overhead_tokens, tokenizer_name

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


STATUS_SECONDS = 2.0  # how often the progress line asks for the endpoints' status


class Progress:
    """A live status line: partitions done, answers received, req/s, tokens/s, errors.

    Answers of running partitions are read from their journals (so it works whatever the
    cluster); a finished partition counts what its stats say (its journal may be gone)."""

    def __init__(self, out_dirs: list[Path], total_parts: int, enabled: bool = True,
                 endpoint_statuses=None):
        """``endpoint_statuses``: a callable returning every pool's endpoint statuses (see
        ``telemetry.describe_endpoints``), asked every ``STATUS_SECONDS``."""
        self.out_dirs, self.total = out_dirs, total_parts
        self._statuses = endpoint_statuses
        self._endpoints = ""
        self.done = 0
        self.enabled = enabled
        self._live: dict[Path, list[int]] = {}  # journal -> [offset, answers, errors, tokens]
        self._finished: dict[Path, tuple[int, int, int]] = {}
        self._stop = threading.Event()
        self._started = time.time()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _scan(self) -> None:
        for out in self.out_dirs:
            if is_remote(out):  # journals there are chunks; finished partitions still count
                continue
            for path in sorted((out / "journal").glob("*.jsonl")):
                if path not in self._finished:
                    self._read_journal(path)

    def _read_journal(self, path: Path) -> None:
        counts = self._live.setdefault(path, [0, 0, 0, 0])
        try:
            with open(path, "rb") as fh:
                fh.seek(counts[0])
                data = fh.read()
        except FileNotFoundError:  # finished meanwhile
            return
        end = data.rfind(b"\n") + 1
        counts[0] += end
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            counts[1] += 1
            counts[2] += bool(record.get("error"))
            counts[3] += record.get("completion_tokens") or 0

    def finished(self, out_dir: Path, stats: dict) -> None:
        """Count partition ``stats["partition"]`` of ``out_dir`` as done with its own numbers
        (once, however often it is reported)."""
        path = journal_path(out_dir, stats["partition"])
        if path in self._finished:
            return
        self.done += 1
        self._finished[path] = (stats["requests"], stats["failed_requests"],
                                stats["completion_tokens"])
        self._live.pop(path, None)

    def line(self) -> str:
        elapsed = max(1e-9, time.time() - self._started)
        rows = [tuple(c[1:]) for p, c in list(self._live.items()) if p not in self._finished]
        rows += list(self._finished.values())
        answers, errors, tokens = (sum(column) for column in zip((0, 0, 0), *rows))
        line = (f"partitions {self.done}/{self.total} | answers {answers} | "
                f"{answers / elapsed:.1f} req/s | {tokens / elapsed:.0f} tok/s | "
                f"errors {errors} | {elapsed:.0f} s")
        return line + (f" || {self._endpoints}" if self._endpoints else "")

    def _refresh_endpoints(self) -> None:
        if self._statuses is None:
            return
        try:  # idle pools stop reporting: the line keeps the last status seen
            self._endpoints = describe_endpoints(self._statuses()) or self._endpoints
        except Exception as exc:  # a status is nice to have; the run goes on without it
            logger.debug("no endpoint status: %s", exc)

    def _loop(self) -> None:
        tty = sys.stderr.isatty()
        last = asked = 0.0
        while not self._stop.wait(0.5):
            self._scan()
            if time.time() - asked >= STATUS_SECONDS:
                self._refresh_endpoints()
                asked = time.time()
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


def _endpoint_statuses() -> dict[str, list[dict]]:
    """Every pool's endpoint status: from the scheduler's budget allocator (the pools report
    there), or from this process's pools without a cluster."""
    client = _distributed_client()
    if client is None:
        from nemocc_dask.llm.pool import endpoint_statuses_here

        return endpoint_statuses_here()
    from nemocc_dask.llm.budget import endpoint_statuses

    return client.run_on_scheduler(endpoint_statuses)


def _endpoint_series(since: float) -> dict[str, list[dict]]:
    """Per endpoint, the merged per-interval series of every worker's pools since ``since``
    (workers that left took theirs with them)."""
    from nemocc_dask.llm.pool import endpoint_series

    client = _distributed_client()
    try:
        per_process = ([endpoint_series(since)] if client is None
                       else list(client.run(endpoint_series, since).values()))
    except Exception as exc:
        logger.warning("no per-endpoint series for the report: %s", exc)
        return {}
    pools: dict[str, list[dict]] = {}
    for series in per_process:
        for name, buckets in series.items():
            pools.setdefault(name, []).extend(buckets)
    return {name: merge_series(buckets) for name, buckets in pools.items()}


def _refuse_output_inside_input(data, jobs: list[Job]) -> None:
    """OutputError when an output folder lies inside an input folder: its parts would be read as
    input by the next run (resume would be impossible)."""
    if not isinstance(data, (str, Path, list, tuple)):
        return
    for item in ([data] if isinstance(data, (str, Path)) else data):
        text = str(item)
        root = text[:min((text.index(c) for c in "*?[" if c in text), default=len(text))]
        if is_remote(as_path(root)) or not root:
            continue
        folder = Path(root) if text == root else Path(root).parent
        if not folder.is_dir():
            continue
        for job in jobs:
            if not is_remote(job.out_dir) and \
                    Path(job.out_dir).resolve().is_relative_to(folder.resolve()):
                raise OutputError(
                    f"output folder {str(job.out_dir)!r} is inside the input folder "
                    f"{str(folder)!r}: its parts would be read as input by the next run (and "
                    "resume would be impossible); choose an output folder outside the input")


def _stored_type(pieces, ddf, column: str) -> str:
    """How ``column`` is stored in the input files (``pieces``), or the frame's dtype."""
    if pieces is not None:
        return io.column_type(pieces, column)
    dtype = ddf.dtypes[column]
    return "string" if str(dtype) in ("string", "object", "str") else str(dtype)


INPUT_CACHE = "input-cache.json"  # the partition map and id check of unchanged input files


def _read_input_cache(out_dir: Path) -> dict | None:
    """The input cache an earlier run left in ``out_dir`` (read only), if any."""
    try:
        return json.loads((out_dir / INPUT_CACHE).read_text())
    except (OSError, ValueError):
        return None


def _load_input(data, rows_per_partition: int, id_field: str, cache: dict | None):
    """(frame, run identity of the input, number of partitions, the pieces of input files or
    None for a DataFrame, the input cache to keep). Input files that have not
    changed since ``cache`` was written are not read again to partition them."""
    if isinstance(data, (str, Path, list, tuple)):
        identities = io.file_identities(data)
        pieces = io.cached_pieces(cache, identities, rows_per_partition)
        if pieces is None:
            pieces = io.partition_map(data, rows_per_partition)
            cache = {"files": identities, "rows_per_partition": rows_per_partition,
                     "pieces": [dataclasses.asdict(p) for p in pieces]}
        ddf = io.frame_from_pieces(pieces)
        return ddf, io.input_fingerprint(data, pieces), len(pieces), pieces, cache
    return data, {"dask_token": dask.base.tokenize(data)}, data.npartitions, None, None


def _checked_input(ddf, pieces, id_field: str, cache: dict | None, casts: dict[str, str],
                   text_fields: tuple[str, ...], read_all: bool):
    """(the input's row count, the run's column types or None for a DataFrame input) after
    checking its ids (``io.check_input``) and deciding one type per column
    (``input_types.decide``), unless the cache says these very files passed for ``id_field``
    and ``casts``. ``read_all``: read every column's every page (before ``--overwrite``
    deletes an earlier run), cache or not."""
    if pieces is None:
        return io.check_input(ddf[[id_field]], id_field)[0], None
    checked = (cache or {}).get("ids") or {}
    if not read_all and checked.get("field") == id_field and checked.get("casts") == casts \
            and "observed" in checked:
        rows, observed = int(checked["rows"]), checked["observed"]
    else:
        jsonl = any(p.kind == "jsonl" for p in pieces)  # parsed whole anyway: types as well
        columns = None if read_all or jsonl else [id_field]
        frame = io.frame_from_pieces(pieces, columns, types=casts, text_fields=text_fields)
        rows, kinds = io.check_input(frame, id_field, kinds=jsonl,
                                     rows=sum(p.stop - p.start for p in pieces))
        observed = io.parquet_types(pieces) + [
            (f"{p.path} (lines {p.start + 1}-{p.stop})", k)
            for p, k in zip(pieces, kinds) if p.kind == "jsonl"]
        if cache is not None:
            cache["ids"] = {"field": id_field, "rows": rows, "casts": casts,
                            "observed": observed}
    return rows, input_types.decide([tuple(o) for o in observed], id_field, text_fields, casts)


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


def _distributed_client():
    """The current ``distributed`` client, or None (no distributed, or no client)."""
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _register_pool_plugin() -> None:
    """Have every worker (also ones that join later) close its client pools when it closes."""
    client = _distributed_client()
    if client is not None:
        from nemocc_dask.llm.pool import PLUGIN_NAME
        from nemocc_dask.llm.pool_plugin import PoolsPlugin

        client.register_plugin(PoolsPlugin(), name=PLUGIN_NAME)


class StopRequested(BaseException):
    """Raised in the driver's main thread by SIGTERM or Ctrl-C (SIGINT) while partitions run."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(self.signum).name

    def stopped(self, message: str) -> Preempted:
        """The error the run ends with: exit 130 for Ctrl-C, 75 (requeue) for SIGTERM."""
        kind = Interrupted if self.signum == signal.SIGINT else Preempted
        return kind(f"{self.name}: {message}")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def signals_stop_the_run():
    """While partitions run, SIGTERM or Ctrl-C raises StopRequested in the main thread (a
    second Ctrl-C, once the handlers are restored, interrupts the drain itself). Elsewhere, or
    off the main thread, signals keep their handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise StopRequested(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _drain(client, futures, progress: Progress, where: dict, stop: StopRequested) -> Preempted:
    """Stop every worker's pools from sending more, let what is on the wire be answered and
    journaled (at most ``nemocc.drain-seconds``), then cancel what is left. Returns the error
    that ends the run, saying what was kept."""
    from distributed import wait

    from nemocc_dask.llm.pool import requests_in_flight

    grace = float(dask.config.get("nemocc.drain-seconds"))
    logger.warning("%s: stopping; waiting up to %.0f s for the requests in flight", stop.name,
                   grace)
    in_flight = _drain_workers(client, f"the run is stopping ({stop.name})")
    with contextlib.suppress(Exception):
        wait(futures, timeout=grace)
    for future in futures:
        if future.status == "finished":
            progress.finished(where[future.key], future.result())
    left = in_flight
    with contextlib.suppress(Exception):
        left = sum(client.run(requests_in_flight).values())
    client.cancel(futures)
    return stop.stopped(_what_was_kept(progress, in_flight, left))


def _what_was_kept(progress: Progress, in_flight: int, left: int) -> str:
    kept = f"{progress.done} of {progress.total} partitions finished"
    if in_flight:
        kept += (f"; of the {in_flight} requests in flight, {in_flight - left} were answered "
                 "and journaled")
        if left:
            kept += f" and {left} were not (they are sent again on resume)"
    else:
        kept += "; no request was in flight"
    return kept + ". Rerun the same command (or requeue the job) to resume"


def _drain_workers(client, reason: str) -> int:
    """Stop every worker's pools from sending (a failure to reach them is logged); returns the
    requests in flight on the workers at that moment."""
    from nemocc_dask.llm.pool import drain_pools

    try:
        return sum(client.run(drain_pools, reason).values())
    except Exception as exc:
        logger.warning("could not drain the workers' pools: %s: %s", type(exc).__name__, exc)
        return 0


def _drain_everywhere(reason: str) -> None:
    """Stop every pool of the run from sending (the workers' and this process's)."""
    from nemocc_dask.llm.pool import drain_pools

    drain_pools(reason)
    client = _distributed_client()
    if client is not None:
        _drain_workers(client, reason)


def _compute_here(tasks: list, out_dirs: list[Path], progress: Progress) -> None:
    """Without a distributed client: Dask's local scheduler in a thread, each partition counted
    as it finishes. SIGTERM (or Ctrl-C) drains this process's pools: nothing more is sent, what
    is on the wire is answered and journaled (at most ``nemocc.drain-seconds``)."""
    from dask.callbacks import Callback

    from nemocc_dask.llm.pool import drain_pools, requests_in_flight

    where = {task.key: out_dir for task, out_dir in zip(tasks, out_dirs)}

    class CountFinished(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if key in where:
                progress.finished(where[key], result)

    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            with CountFinished():
                dask.compute(*tasks)
        except BaseException as exc:  # raised again in the caller's thread
            outcome["error"] = exc

    drain_pools(None)  # pools left drained by a stopped run in this process send again
    thread = threading.Thread(target=run, daemon=True, name="nemocc-compute")
    thread.start()
    try:
        with signals_stop_the_run():
            while thread.is_alive():
                thread.join(0.2)
    except BaseException as exc:
        grace = float(dask.config.get("nemocc.drain-seconds"))
        logger.warning("%s: stopping; waiting up to %.0f s for the requests in flight",
                       exc.name if isinstance(exc, StopRequested) else type(exc).__name__,
                       grace)
        in_flight = drain_pools("the run is stopping")
        thread.join(grace)
        if isinstance(exc, StopRequested):
            raise exc.stopped(_what_was_kept(progress, in_flight, requests_in_flight())
                              ) from None
        raise
    if "error" in outcome:
        raise outcome["error"]


def _compute(tasks: list, out_dirs: list[Path], progress: Progress) -> None:
    """Run the partition tasks (task i writes into ``out_dirs[i]``) on the distributed client if
    there is one, else locally (``_compute_here``). On the first failed partition the others are
    cancelled and its exception is raised. SIGTERM drains the run (see ``_drain``) and raises
    Preempted."""
    client = _distributed_client()
    if client is None:
        _compute_here(tasks, out_dirs, progress)
        return
    from distributed import as_completed

    from nemocc_dask.llm.pool import drain_pools

    with contextlib.suppress(Exception):
        client.run(drain_pools, None)  # workers kept from a stopped run send again
    futures = client.compute(tasks)
    where = {future.key: out_dir for future, out_dir in zip(futures, out_dirs)}
    try:
        with signals_stop_the_run():
            for future in as_completed(futures):
                progress.finished(where[future.key], future.result())
    except StopRequested as stop:
        raise _drain(client, futures, progress, where, stop) from None
    except BaseException:
        client.cancel(futures)
        raise


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

    client = _distributed_client()
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
             wait_for_lock: float = 0.0, casts=None) -> dict[str, dict]:
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
    (``input_types``), and every part is written in those types.
    """
    with contextlib.ExitStack() as servers:
        started = time.time()
        with start_checks():
            _refuse_output_inside_input(data, jobs)
            casts = input_types.parse_casts(casts)
            cache = _read_input_cache(jobs[0].out_dir)
            ddf, inputs, n_parts, pieces, cache = _load_input(data, rows_per_partition,
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
                require_text_column(_stored_type(pieces, ddf, job.preset.input_field),
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
            input_rows, types = _checked_input(ddf, pieces, id_field, cache, casts, text_fields,
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
            _drain_everywhere(message)

        with contextlib.ExitStack() as locks:
            for job in jobs:
                locks.enter_context(OutputLock(job.out_dir, on_lost=stop_sending))
                prepare_output(job.out_dir, materials[job.preset.name], modes[job.preset.name])
            if cache is not None:  # the folder is ours now: keep what the next start can reuse
                io.atomic_write_bytes(jobs[0].out_dir / INPUT_CACHE, json.dumps(cache).encode())
            _register_pool_plugin()
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
                          _endpoint_statuses) as progress:
                try:
                    _compute(tasks, out_dirs, progress)
                except (Preempted, RunError):
                    if lost:
                        raise LockLost(lost[0]) from None
                    raise
            if lost:
                raise LockLost(lost[0])
            series = _endpoint_series(started)
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
                   wait_for_lock: float = 0.0, casts=None, **overrides) -> dict:
    """Run one task over ``data`` (paths or a Dask DataFrame) into ``output``, resumably.

    Layout: ``parts/`` (kept rows, one parquet file per input partition), ``rejects/`` (removed
    rows with ``reject_reason``), ``stats/``, ``journal/``, ``run.json`` and ``report.json``.
    Rerunning the same call resumes; ``retry_failed=True`` also resends the requests that failed
    in finished partitions and rewrites those partitions. Returns the report. ``gpu=True`` runs
    the stages on cuDF partitions (GPUError at once where there is no usable GPU).
    ``wait_for_lock``: seconds to wait while another run holds ``output`` (a requeued job that
    starts while the old one drains) before refusing. ``casts``: see ``run_jobs``.
    """
    with start_checks():
        preset = resolve_task(task, text_field, **overrides)
    job = Job(preset, llm, as_path(output))
    return run_jobs(data, [job], tokenizer=tokenizer, id_field=id_field, seed=seed,
                    overwrite=overwrite, retry_failed=retry_failed,
                    rows_per_partition=rows_per_partition, show_progress=show_progress,
                    gpu=gpu, wait_for_lock=wait_for_lock, casts=casts)[preset.name]
