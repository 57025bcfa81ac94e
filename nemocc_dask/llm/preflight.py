"""Fail fast on configuration errors: ask every endpoint for its models before any work starts."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from nemocc_dask.errors import StartError
from nemocc_dask.llm.config import LLMConfig


class PreflightError(StartError):
    """The endpoint cannot serve this run; the message says what to fix."""


def _get_models(url: str, api_key: str | None, timeout: float) -> list[str]:
    request = urllib.request.Request(url + "/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise PreflightError(
                f"endpoint {url} refused the API key (HTTP {exc.code}); set the right key in the "
                "environment variable named by api_key_env (default OPENAI_API_KEY)") from None
        raise PreflightError(f"endpoint {url} answered HTTP {exc.code} to GET /models; check that "
                             "--base-url points at an OpenAI-compatible API (usually ending in /v1)"
                             ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PreflightError(f"cannot reach endpoint {url} ({reason}); is the server running and "
                             "is --base-url right?") from None
    except ValueError:
        raise PreflightError(f"endpoint {url} did not answer GET /models with JSON; check that "
                             "--base-url points at an OpenAI-compatible API") from None
    return [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]


def preflight(llm: LLMConfig, timeout: float = 10.0) -> None:
    """Raise PreflightError unless every endpoint is reachable, accepts the key and serves the
    model. Custom clients are not checked."""
    if llm.client_factory is not None:
        return
    for url in llm.base_url:
        models = _get_models(url, llm.api_key, timeout)
        if llm.model not in models:
            shown = ", ".join(models[:20]) or "none"
            raise PreflightError(f"model {llm.model!r} is not served by {url}; it serves: {shown}. "
                                 "Pass one of these with --model")
