"""Endpoint configuration, client protocol, per-worker pool, generation and the mock server."""

from nemocc_dask.llm.client import (
    AsyncLLMClient,
    Completion,
    LLMRequestError,
    OpenAIHTTPClient,
    RetryableError,
    SyncLLMClient,
)
from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.llm.generate import generate_partition
from nemocc_dask.llm.mock import MockLLMServer
from nemocc_dask.llm.preflight import PreflightError, preflight

__all__ = [
    "AsyncLLMClient", "Completion", "LLMConfig", "LLMRequestError", "MockLLMServer",
    "OpenAIHTTPClient", "PreflightError", "RetryableError", "SyncLLMClient",
    "generate_partition", "preflight",
]
