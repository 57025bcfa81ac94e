"""Generation for one partition: build prompts, reuse journaled answers, stream the rest through the
worker's pool, journal each answer as it arrives, and add the result columns.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator

from nemocc_dask.config import setting
from nemocc_dask.io import atomic_write_bytes, naming, storage
from nemocc_dask.io.frames import series_like, to_host_list
from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.llm.pool import Request, Result
from nemocc_dask.llm.pools import get_pool
from nemocc_dask.llm.preflight import preflight_once
from nemocc_dask.recipe.presets import TaskPreset
from nemocc_dask.recipe.stages.contracts import result_columns
from nemocc_dask.recipe.tokenizer import count_tokens_list, load_tokenizer, prompt_overhead_tokens

logger = logging.getLogger(__name__)


def request_key(messages: list[dict], settings: dict) -> str:
    """Hash of everything that determines an answer: model, messages, generation settings."""
    material = json.dumps([messages, settings], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(material.encode()).hexdigest()


class Journal:
    """Append-only JSON-lines record of finished requests for one partition, keyed by request
    hash. Locally one file, appended and flushed per answer. On an object store (no appends) the
    answers go to numbered chunk objects in ``<name>.d/``, each written in one PUT once it holds
    ``nemocc.journal.chunk-records`` answers or is ``nemocc.journal.chunk-seconds`` old: a crash
    there loses at most that many answers (they are sent again on resume)."""

    def __init__(self, path):
        self.path = storage.as_path(path)
        self.chunks = self.path.parent / f"{self.path.name}.d"
        self.compacted = self.path.parent / f"{self.path.name}.gz"  # a finished partition's

    def _chunk_files(self) -> list:
        """The chunk objects written so far (object stores), in order."""
        storage.refresh(self.chunks)
        return sorted(self.chunks.glob("*.jsonl")) if self.chunks.exists() else []

    def _lines(self) -> Iterator[bytes]:
        """The journal's lines as bytes (decoding is per line, so one bad byte spoils one): the
        compacted copy of a finished partition first, then what was added since."""
        if self.compacted.exists():
            try:
                yield from gzip.decompress(self.compacted.read_bytes()).splitlines()
            except (OSError, EOFError) as exc:  # damaged: its answers are sent again
                logger.warning("journal %s cannot be read (%s); its answers are sent again",
                               self.compacted, exc)
        if storage.is_remote(self.path):
            for chunk in self._chunk_files():
                yield from chunk.read_bytes().splitlines()
            return
        if self.path.exists():
            with open(self.path, "rb") as fh:
                yield from fh

    def load(self) -> dict[str, dict]:
        """Records by key. A line that cannot be used (torn by a killed process or a full disk,
        invalid UTF-8, not a JSON object with a string key) is skipped and counted in
        ``skipped`` (its request is sent again), never fatal; a journal that cannot be read at
        all raises an OSError naming it."""
        records: dict[str, dict] = {}
        self.skipped = 0
        try:
            for line in self._lines():
                record = _journal_record(line)
                if record is None:
                    self.skipped += line.strip() != b""
                    continue
                records[record["key"]] = record
        except OSError as exc:
            raise OSError(f"cannot read the journal {self.path}: {exc}") from exc
        if self.skipped:
            logger.warning("journal %s: %d unreadable line(s) skipped (a write torn by a crash "
                           "or a full disk?); their requests are sent again", self.path,
                           self.skipped)
        return records

    def open(self):
        """A sink for new records (``write`` a line, ``flush``, ``close``). Locally the file
        opened for appending, a torn last line first ended so that the next record starts on a
        line of its own."""
        if storage.is_remote(self.path):
            taken = [int(c.stem) for c in self._chunk_files()]
            return _ChunkSink(self.chunks, max(taken, default=0) + 1,
                              setting("journal.chunk-records"), setting("journal.chunk-seconds"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                torn = fh.read(1) != b"\n"
        sink = open(self.path, "a", encoding="utf-8")
        if torn:
            sink.write("\n")
        return sink

    def compact(self) -> None:
        """Keep a finished partition's answers as one gzip file (``<name>.gz``), so that a part
        found damaged or missing later is redone without paying again; the live journal goes."""
        lines = [line.rstrip(b"\r\n") for line in self._lines() if line.strip()]
        if lines:
            data = gzip.compress(b"\n".join(lines) + b"\n", mtime=0)
            atomic_write_bytes(self.compacted, data)
        if storage.is_remote(self.path):
            storage.remove_tree(self.chunks)
        else:
            self.path.unlink(missing_ok=True)


class _ChunkSink:
    """Buffers journal lines and writes them as numbered chunk objects (object stores)."""

    def __init__(self, folder, first: int, records: int, seconds: float):
        self.folder, self.next = folder, first
        self.records, self.seconds = records, seconds
        self.lines: list[str] = []
        self.since = time.monotonic()

    def write(self, line: str) -> None:
        self.lines.append(line)

    def flush(self, force: bool = False) -> None:
        if self.lines and (force or len(self.lines) >= self.records
                           or time.monotonic() - self.since >= self.seconds):
            (self.folder / f"{self.next:06d}.jsonl").write_text("".join(self.lines),
                                                                 encoding="utf-8")
            self.next += 1
            self.lines = []
            self.since = time.monotonic()

    def close(self) -> None:
        self.flush(force=True)


def _journal_record(line: bytes) -> dict | None:
    """One journal line as a record, or None when it is not one."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        return None
    text, error = record.get("text"), record.get("error")
    if not isinstance(text, (str, type(None))) or not isinstance(error, (str, type(None))) \
            or (text is None and error is None):
        return None
    return record


PLAN_TAG = "plan"  # journal records of ``plan``'s probe carry {"by": "plan"}


def _record(result: Result, answered_by: str | None = None) -> dict:
    """The journal record of one result (``answered_by``: a tag, e.g. the plan's probe); an
    answer without content becomes ``empty_response``."""
    c = result.completion
    error, error_class = result.error, result.error_class
    if error is None and c is not None and c.text is None:
        error, error_class = "empty_response: the answer has no content", "empty_response"
    return {"key": result.key, "text": c.text if c else None,
            "finish_reason": c.finish_reason if c else None,
            "prompt_tokens": c.prompt_tokens if c else None,
            "completion_tokens": c.completion_tokens if c else None,
            "choices": c.choices if c and c.choices else None,
            "error": error, "error_class": error_class,
            "endpoint": result.endpoint, "latency": round(result.latency, 4),
            "attempts": result.attempts, "failed_endpoints": result.failed_endpoints,
            "retried": dict(collections.Counter(result.retried)),
            "at": round(time.time(), 3), **({"by": answered_by} if answered_by else {})}


def _answered_at(record: dict) -> float:
    """When a journaled answer arrived (epoch seconds; 0 for records without the time)."""
    try:
        return float(record.get("at") or 0)
    except (TypeError, ValueError):
        return 0.0


def new_stats() -> dict:
    return {"requests": 0, "attempts": 0, "retries": 0, "reused_answers": 0, "duplicate_prompts": 0,
            "journal_lines_skipped": 0, "lost_attempt_answers": 0, "plan_answers": 0,
            "failed_requests": 0, "recovered": 0, "failed_by_class": collections.Counter(),
            "retries_by_class": collections.Counter(), "endpoints": {}}


def _count_endpoint(stats: dict, record: dict) -> None:
    for name in record["failed_endpoints"]:
        ep = stats["endpoints"].setdefault(name, {"requests": 0, "errors": 0, "latency_sum": 0.0})
        ep["errors"] += 1
    if record["endpoint"]:
        ep = stats["endpoints"].setdefault(record["endpoint"],
                                           {"requests": 0, "errors": 0, "latency_sum": 0.0})
        ep["requests"] += 1
        ep["latency_sum"] += record["latency"]


def generate_partition(df, preset: TaskPreset, llm: LLMConfig, tokenizer=None,
                       journal_path: str | None = None, retry_failed: bool = False,
                       return_stats: bool = False, check_endpoint: bool = False,
                       journal_dir: str | None = None, partition_info: dict | None = None,
                       run_started: float | None = None, answered_by: str | None = None):
    """Add the task's output field and the ``llm_*`` columns to one partition of segments.

    Reads the preset's input field. A prompt longer than ``max_input_tokens``, or than the served
    context (``llm.max_model_len``) minus ``max_tokens``, is not sent (error ``prompt_too_long``);
    identical prompts are sent once. With ``journal_path``, answers already
    journaled are reused (failed ones only without ``retry_failed``) and new ones are appended as
    they arrive (``journal_dir``: one journal per partition number there, for ``generate``).
    ``check_endpoint``: check the endpoint once in this process before the first request.
    ``run_started``: when the run began (epoch seconds): journaled answers from after it were
    paid by an attempt of this run that died (a killed worker), counted as
    ``lost_attempt_answers``; reused answers of ``plan``'s probe count as ``plan_answers``.
    ``answered_by``: a tag written into the new journal records. Returns the frame, or (frame,
    stats) with ``return_stats``.
    """
    if journal_dir is not None and partition_info is not None:
        journal_path = f"{journal_dir.rstrip('/')}/part-{partition_info['number']:05d}.jsonl"
    context = llm.max_model_len
    if check_endpoint and len(df):
        context = preflight_once(llm)
    prompts = build_prompts(df, preset, llm, load_tokenizer(tokenizer), context)
    stats = new_stats()
    records: dict[str, dict] = {}
    pending: dict[str, Request] = {}
    journal = Journal(journal_path) if journal_path else None
    known = journal.load() if journal else {}
    stats["journal_lines_skipped"] = journal.skipped if journal else 0
    for key in prompts.row_keys:
        request = prompts.requests.get(key)
        if request is None:  # not sent: the key is the reason
            continue
        old = known.get(key)
        if old is not None and not (retry_failed and old.get("error")):
            records[key] = old
            stats["reused_answers"] += 1
            stats["plan_answers"] += old.get("by") == PLAN_TAG
            if run_started is not None and _answered_at(old) >= run_started:
                stats["lost_attempt_answers"] += 1  # paid in this run, by an attempt that died
        elif key in pending:
            stats["duplicate_prompts"] += 1
        else:
            pending[key] = request
    if pending:
        pool = get_pool(llm)
        _send(pending, pool, journal, records, stats, known, answered_by)
        for name, seconds in pool.timeouts().items():  # the automatic timeout, for the report
            stats["endpoints"].setdefault(name, {"requests": 0, "errors": 0, "latency_sum": 0.0})[
                "timeout_seconds"] = seconds
    stats["failed_requests"] = sum(1 for r in records.values() if r.get("error"))
    stats["retries"] = stats["attempts"] - stats["requests"]
    out = _with_results(df, preset, llm, prompts.row_keys, records, stats)
    return (out, stats) if return_stats else out


@dataclass
class Prompts:
    """The requests of one partition: per row, its request key or the reason it is not sent
    (``prompt_too_long: ...``, ``invalid_text: ...``); the distinct requests by key, and each
    one's prompt tokens (text plus the prompt's overhead, as counted by the run's tokenizer)."""

    row_keys: list[str]
    requests: dict[str, Request]
    prompt_tokens: dict[str, int]


def build_prompts(df, preset: TaskPreset, llm: LLMConfig, tokenizer,
                  context: int | None) -> Prompts:
    """The requests ``df``'s rows (segments, the preset's input field) make under ``llm``'s
    settings and the served ``context``; ``tokenizer``: a loaded tokenizer."""
    texts = to_host_list(df[preset.input_field])
    settings = llm.request_settings(preset)
    limit, why = prompt_limit(preset.max_input_tokens, context, settings.get("max_tokens"))
    overhead = prompt_overhead_tokens(tokenizer, preset)
    lengths = count_tokens_list(tokenizer, texts, add_special_tokens=False)
    prompts = Prompts([], {}, {})
    for text, n_tokens in zip(texts, lengths):
        if not isinstance(text, str) or not text:
            prompts.row_keys.append("invalid_text: the input text is missing or empty")
            continue
        if n_tokens + overhead > limit:
            prompts.row_keys.append(f"prompt_too_long: {n_tokens + overhead} tokens > {why}")
            continue
        messages = preset.messages(text)
        key = request_key(messages, settings)
        prompts.row_keys.append(key)
        prompts.requests.setdefault(key, Request(key, messages, settings))
        prompts.prompt_tokens[key] = n_tokens + overhead
    return prompts


def prompt_limit(max_input_tokens: int, context: int | None,
                 max_tokens: int | None) -> tuple[int, str]:
    """The most tokens a prompt may have, and the reason: the task's ``max_input_tokens``, or
    less when the served context minus the answer's ``max_tokens`` is smaller."""
    if context and context - (max_tokens or 0) < max_input_tokens:
        limit = context - (max_tokens or 0)
        return limit, (f"{limit} (the served context {context} minus max_tokens "
                       f"{max_tokens or 0})")
    return max_input_tokens, f"max_input_tokens {max_input_tokens}"


def _send(pending: dict[str, Request], pool, journal: Journal | None, records: dict,
          stats: dict, known: dict[str, dict], answered_by: str | None = None) -> None:
    """Stream ``pending`` through ``pool``, journaling each answer as it arrives (aborted requests
    are not journaled: they were never answered). A pending key already in the journal
    (``known``) is a failure being retried; its success counts as ``recovered``. Raises EndpointsBroken after journaling when
    the failure budget stopped the pool."""
    sink = journal.open() if journal else None
    try:
        with contextlib.closing(pool.stream(list(pending.values()))) as results:
            for result in results:
                if result.aborted:
                    continue
                record = _record(result, answered_by)
                records[result.key] = record
                stats["requests"] += 1
                stats["attempts"] += record["attempts"]
                stats["retries_by_class"].update(record["retried"])
                stats["recovered"] += result.key in known and not record["error"]
                _count_endpoint(stats, record)
                if sink is not None:
                    with naming(journal.path):
                        sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                        sink.flush()
    finally:
        if sink is not None:
            with naming(journal.path):
                sink.close()


def _with_results(df, preset, llm, row_keys, records, stats):
    columns = {name: [] for name in result_columns(preset)}
    choices = []
    for key in row_keys:
        record = records.get(key)
        if record is None:  # the key holds the reason the row was not sent
            record = {"error": key, "error_class": key.split(":", 1)[0]}
        error = record.get("error")
        if error:
            stats["failed_by_class"][record.get("error_class") or "error"] += 1
        columns[preset.output_field].append(None if error else record.get("text"))
        columns["llm_finish_reason"].append(record.get("finish_reason"))
        columns["llm_prompt_tokens"].append(record.get("prompt_tokens"))
        columns["llm_completion_tokens"].append(record.get("completion_tokens"))
        columns["llm_error"].append(error)
        choices.append(json.dumps(record.get("choices")) if record.get("choices") else None)
    columns["llm_model"] = [llm.model or llm.endpoints[0]] * len(row_keys)
    columns["task"] = [preset.name] * len(row_keys)
    out = df.copy()
    for name, dtype in result_columns(preset).items():
        out[name] = series_like(columns[name], df, dtype=dtype)
    if llm.return_all_choices:
        out["llm_choices"] = series_like(choices, df)
    return out
