"""``LLMConfig``: where to send requests, how many at once, how to retry (the task's generation
settings are its ``TaskPreset``'s)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from nemocc_dask.config import setting
from nemocc_dask.recipe.presets import TaskPreset


def server_root(base_url: str) -> str:
    """The server's root for routes outside the OpenAI API (``/tokenize``, ``/metrics``):
    ``base_url`` without a trailing ``/v1``."""
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


@dataclass(frozen=True)
class LLMConfig:
    """An OpenAI-compatible endpoint set (or a custom client factory) and its settings.

    Parameters
    ----------
    base_url:
        One URL or a list (``http://host:8000/v1``; on the command line repeat the option);
        requests are spread least-in-flight first. Or ``serve``.
    model:
        The model name sent with every request (checked against ``GET /models`` before a run;
        with ``serve`` of a preset, its model by default).
    api_key:
        Explicit key; else read from the environment variable ``api_key_env`` (when set there).
        Never shown in ``repr``, logs, reports, journals or files.
    api_key_env:
        The environment variable holding the API key.
    max_in_flight:
        ``"auto"`` (default): each endpoint's window is learned (``nemocc_dask.llm.concurrency``:
        the concurrency at which its throughput stops rising, from its ``/metrics`` queue or its
        latency per token), never above ``max_in_flight_cap``. A number: that many requests in
        flight per endpoint, fixed (429/503 still halve it for a while). Either way the total is
        cluster-wide: the scheduler divides it among the workers that have work, re-dividing as
        workers join, leave, idle or get busy (see ``nemocc_dask.llm.budget``).
    max_in_flight_cap:
        With ``"auto"``: the hard ceiling per endpoint across the cluster (default 4096).
    max_in_flight_per_worker:
        Instead, a fixed number per endpoint on each worker (the total is then workers x this).
    timeout:
        ``"auto"`` (default): each request's limit follows the endpoint's observed latency and the
        request's ``max_tokens`` (see ``nemocc_dask.llm.timeouts``: 30 s to 30 min, 3x the
        full-length latency the recent answers predict), stated in the report. A number: that many
        seconds per request, fixed.
    max_retries, backoff_base, backoff_max:
        Retries after the first attempt for 429/408/5xx/timeouts/connection
        errors, with exponential backoff ``backoff_base * 2**k`` (jittered, capped at
        ``backoff_max``, at least ``Retry-After``).
    endpoint_cooldown:
        Seconds an endpoint that failed to connect gets no requests.
    max_model_len:
        The served model's context (prompt + answer tokens). Default: what the endpoint reports in
        ``GET /models`` (vLLM's ``max_model_len``), else unknown. A prompt that cannot fit with
        ``max_tokens`` is not sent (``prompt_too_long``).
    max_response_bytes:
        The most one answer may weigh; a larger one fails as ``response_too_large`` before it
        fills the worker's memory. Default: 64 bytes per ``max_tokens`` token of each choice,
        plus 1 MiB.
    max_failed_fraction, failure_min_requests:
        The failure budget: once an endpoint has finished ``failure_min_requests`` requests and
        more than ``max_failed_fraction`` of them failed (after retries), it gets no more
        requests; when every endpoint is over budget the run stops (exit status 1) with the error
        class and an example, keeping every answer received. ``max_failed_fraction=1`` turns it off.
    return_all_choices:
        With ``n`` > 1: keep every choice of each answer (column ``llm_choices``, JSON).
    client_factory:
        Optional picklable zero-argument callable that builds a custom client on each worker
        (see ``nemocc_dask.llm.client``); replaces the HTTP client and ``base_url``.
    serve:
        A ``nemocc_dask.serve.ServeSpec``: the run starts the model's server next to each worker
        and each worker sends to its own; ``base_url`` is then filled in by the run.
    """

    base_url: str | Sequence[str] = ()
    model: str = ""
    api_key: str | None = field(default=None, repr=False, compare=False)
    api_key_env: str = "OPENAI_API_KEY"
    max_in_flight: int | str = "auto"
    max_in_flight_cap: int = 4096
    max_in_flight_per_worker: int | None = None
    timeout: float | str = "auto"
    max_retries: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    endpoint_cooldown: float = 5.0
    max_model_len: int | None = None
    max_response_bytes: int | None = None
    max_failed_fraction: float = 0.5
    failure_min_requests: int = 50
    return_all_choices: bool = False
    client_factory: Callable[[], Any] | None = None
    serve: Any = None

    def __post_init__(self) -> None:
        urls = (self.base_url,) if isinstance(self.base_url, str) else tuple(self.base_url)
        object.__setattr__(self, "base_url", tuple(u.rstrip("/") for u in urls if u))
        if self.api_key is None and self.api_key_env:
            object.__setattr__(self, "api_key", os.environ.get(self.api_key_env) or None)
        if self.serve is not None and not self.model and self.serve.model:
            object.__setattr__(self, "model", self.serve.model)
        if self.client_factory is None and self.serve is None and not self.base_url:
            raise ValueError("LLMConfig needs base_url (e.g. http://127.0.0.1:8000/v1), serve= "
                             "or a client_factory")
        if self.client_factory is None and not self.model:
            raise ValueError("LLMConfig needs model= (the name the endpoint serves; "
                             "`curl BASE_URL/models` lists them)")
        if self.max_in_flight != "auto" and not (
                isinstance(self.max_in_flight, int) and self.max_in_flight >= 1):
            raise ValueError(f"max_in_flight must be 'auto' or an integer >= 1 (got "
                             f"{self.max_in_flight!r})")
        if self.max_in_flight_cap < 1:
            raise ValueError(f"max_in_flight_cap must be >= 1 (got {self.max_in_flight_cap})")
        if self.max_in_flight_per_worker is not None and self.max_in_flight_per_worker < 1:
            raise ValueError("max_in_flight_per_worker must be >= 1 "
                             f"(got {self.max_in_flight_per_worker})")
        if not 0 < self.max_failed_fraction <= 1:
            raise ValueError(f"max_failed_fraction must be in (0, 1] (got {self.max_failed_fraction})")
        if self.failure_min_requests < 1:
            raise ValueError(f"failure_min_requests must be >= 1 (got {self.failure_min_requests})")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 (got {self.max_model_len})")
        if self.timeout != "auto" and not (isinstance(self.timeout, (int, float))
                                           and self.timeout > 0):
            raise ValueError(f"timeout must be 'auto' or a number of seconds > 0 (got "
                             f"{self.timeout!r})")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0 (got {self.max_retries})")

    @property
    def auto_window(self) -> bool:
        """Whether each endpoint's window is learned (``max_in_flight="auto"``)."""
        return self.max_in_flight == "auto"

    @property
    def adaptive_timeout(self) -> bool:
        """Whether each request's timeout follows the endpoint's latency (``timeout="auto"``)."""
        return self.timeout == "auto"

    @property
    def client_timeout(self) -> float:
        """The limit a client itself enforces: the fixed timeout, or the automatic one's
        ceiling."""
        return (float(setting("request-timeout.ceiling-seconds")) if self.adaptive_timeout
                else float(self.timeout))

    @property
    def in_flight_total(self) -> int:
        """Requests in flight per endpoint across the cluster, at most."""
        return self.max_in_flight_cap if self.auto_window else int(self.max_in_flight)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Endpoint names: the base URLs, or one pseudo-endpoint for a custom client."""
        if self.client_factory is not None:
            return (custom_endpoint_name(self.client_factory),)
        return self.base_url

    def request_settings(self, preset: TaskPreset) -> dict:
        """The body fields sent with each request of ``preset`` to this endpoint's model (the
        generation settings are the preset's: ``TaskPreset.request_settings``)."""
        return preset.request_settings(self.model)

    def fingerprint_fields(self) -> dict:
        """What about the endpoint changes results (model, client), not throughput knobs."""
        return {"model": self.model, "client": self.endpoints[0] if self.client_factory else "http",
                "return_all_choices": self.return_all_choices}

    def pool_key(self) -> str:
        """Identity of the per-worker pool these settings need (the key is never part of it)."""
        material = {"endpoints": list(self.endpoints), "max_in_flight": self.max_in_flight,
                    "cap": self.max_in_flight_cap,
                    "per_worker": self.max_in_flight_per_worker, "timeout": self.timeout,
                    "retries": self.max_retries, "backoff": [self.backoff_base, self.backoff_max],
                    "cooldown": self.endpoint_cooldown,
                    "budget": [self.max_failed_fraction, self.failure_min_requests],
                    "all_choices": self.return_all_choices,
                    "max_bytes": self.max_response_bytes,
                    "key": hashlib.sha256((self.api_key or "").encode()).hexdigest()[:12]}
        return json.dumps(material, sort_keys=True)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _callable_material(factory) -> str:
    """What identifies a client factory across processes: a partial's function and arguments, a
    function's code, defaults and closure, another callable's type and repr (no addresses)."""
    if isinstance(factory, functools.partial):
        return repr((_callable_material(factory.func), factory.args,
                     sorted(factory.keywords.items())))
    code = getattr(factory, "__code__", None)
    if code is not None:
        cells = tuple(c.cell_contents for c in (factory.__closure__ or ()))
        return repr((factory.__module__, factory.__qualname__, code.co_code, code.co_consts,
                     factory.__defaults__, factory.__kwdefaults__, cells))
    return f"{type(factory).__module__}.{type(factory).__qualname__}:{factory!r}"


def custom_endpoint_name(factory) -> str:
    """``custom:<name>#<hash>``: readable, and distinct for factories that build different
    clients (a partial with other arguments, a closure over another URL)."""
    func = getattr(factory, "func", factory)
    name = getattr(func, "__qualname__", type(func).__name__)
    material = _ADDRESS.sub("", _callable_material(factory))
    return f"custom:{name}#{hashlib.sha256(material.encode()).hexdigest()[:8]}"

