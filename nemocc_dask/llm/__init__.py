"""The llm layer: talking to OpenAI-compatible endpoints. The endpoint configuration, the client
protocol and HTTP client, the per-worker pool with its learned window, the cluster-wide budget
on the scheduler, the request timeout, the start-up check and finding the served model's
tokenizer. No pandas, and Dask only in its two adapters, ``budget`` (the scheduler's plugin) and
``pool_plugin`` (the worker's) (``tests/test_layers.py`` checks both); it may import the recipe
and io layers (a task's generation settings, token counts).
"""

from nemocc_dask.llm.client import (AsyncLLMClient, Completion, LLMRequestError, OpenAIHTTPClient,
                                    RetryableError, SyncLLMClient)
from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.llm.preflight import PreflightError, preflight

__all__ = [
    "AsyncLLMClient", "Completion", "LLMConfig", "LLMRequestError", "OpenAIHTTPClient",
    "PreflightError", "RetryableError", "SyncLLMClient", "preflight",
]
