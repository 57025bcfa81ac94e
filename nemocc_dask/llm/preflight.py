"""Fail fast on configuration errors: ask every endpoint for its models before any work starts."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request

from nemocc_dask.errors import StartError
from nemocc_dask.llm.config import LLMConfig

logger = logging.getLogger(__name__)


class PreflightError(StartError):
    """The endpoint cannot serve this run; the message says what to fix."""


class _NoAnswerYet(Exception):
    """The endpoint accepted the connection but did not answer in time."""


MODELS_MAX_BYTES = 16 << 20  # a /models answer larger than this is not a model list


def _read_within(resp, url: str, deadline: float) -> bytes:
    """The whole body by ``deadline`` (a server or proxy that trickles bytes never holds the
    start check longer than its timeout) and at most MODELS_MAX_BYTES."""
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise _NoAnswerYet()
        chunk = resp.read1(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MODELS_MAX_BYTES:
            raise PreflightError(f"endpoint {url} answered GET /models with more than "
                                 f"{MODELS_MAX_BYTES >> 20} MiB; check that --base-url points at "
                                 "an OpenAI-compatible API")
        chunks.append(chunk)


def _get_models(url: str, api_key: str | None, timeout: float) -> list[str]:
    request = urllib.request.Request(url + "/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            data = json.loads(_read_within(resp, url, time.monotonic() + timeout))
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise PreflightError(
                f"endpoint {url} refused the API key (HTTP {exc.code}); set the right key in the "
                "environment variable named by api_key_env (default OPENAI_API_KEY)") from None
        raise PreflightError(f"endpoint {url} answered HTTP {exc.code} to GET /models; check that "
                             "--base-url points at an OpenAI-compatible API (usually ending in /v1)"
                             ) from None
    except TimeoutError:  # connected, then no answer: up but busy (or loading its model)
        raise _NoAnswerYet() from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PreflightError(f"cannot reach endpoint {url} ({reason}); is the server running and "
                             "is --base-url right?") from None
    except (ValueError, RecursionError):
        raise PreflightError(f"endpoint {url} did not answer GET /models with JSON; check that "
                             "--base-url points at an OpenAI-compatible API") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise PreflightError(f"endpoint {url} answered GET /models with JSON that is not a model "
                             'list ({"data": [{"id": ...}]}); check that --base-url points at an '
                             "OpenAI-compatible API (usually ending in /v1)")
    return [m for m in data["data"] if isinstance(m, dict)]


def _served_context(entry: dict) -> int | None:
    """The context a /models entry reports: vLLM's ``max_model_len``, llama.cpp's ``meta.n_ctx``
    (the context of each slot while its KV cache is unified, llama-server's default)."""
    meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
    for value in (entry.get("max_model_len"), meta.get("n_ctx")):
        if isinstance(value, int) and value > 0:
            return value
    return None


_CHECKED: dict[str, int | None] = {}
_CHECKED_LOCK = threading.Lock()


def preflight_once(llm: LLMConfig) -> int | None:
    """``preflight`` the first time this process sends with these settings (later calls return
    the first call's answer): the served context, if known."""
    key = llm.pool_key()
    with _CHECKED_LOCK:
        if key not in _CHECKED:
            _CHECKED[key] = preflight(llm)
        return _CHECKED[key]


def _models_when_ready(url: str, api_key: str | None, timeouts: tuple[float, ...]) -> list[str]:
    """GET /models, waiting longer each time while the server is up but does not answer."""
    for timeout in timeouts:
        try:
            return _get_models(url, api_key, timeout)
        except _NoAnswerYet:
            logger.warning("endpoint %s is up but did not answer GET /models within %g s; "
                           "waiting longer", url, timeout)
    raise PreflightError(
        f"endpoint {url} is up (it accepted the connection) but did not answer GET /models "
        f"within {sum(timeouts):g} s in all: is it busy, or still loading its model? Rerun "
        "once it answers (curl BASE_URL/models)")


def preflight(llm: LLMConfig, timeouts: tuple[float, ...] = (10.0, 30.0, 60.0)) -> int | None:
    """Raise PreflightError unless every endpoint is reachable, accepts the key and serves the
    model; return the served context (``llm.max_model_len``, else the smallest context the
    endpoints report for the model (``_served_context``), else None). A server that accepts the
    connection but answers slowly is given ``timeouts`` one after the other before giving up;
    one that refuses it fails at once. Custom clients are not checked."""
    if llm.client_factory is not None:
        return llm.max_model_len
    contexts = []
    for url in llm.base_url:
        entries = _models_when_ready(url, llm.api_key, timeouts)
        models = [m.get("id") for m in entries]
        contexts += [context for context in (_served_context(m) for m in entries
                                             if m.get("id") == llm.model) if context is not None]
        if llm.model not in models:
            shown = ", ".join(str(m) for m in models[:20]) or "none"
            raise PreflightError(f"model {llm.model!r} is not served by {url}; it serves: {shown}. "
                                 "Pass one of these with --model")
    return llm.max_model_len or min(contexts, default=None)
