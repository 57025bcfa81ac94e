"""nemocc_dask: the Nemotron-CC synthetic-data recipe over Dask DataFrames.

The public API, re-exported from the layers (bottom to top: ``io``, ``recipe``, ``llm``,
``serve``, ``run``; ``testing`` holds the mock server; see ARCHITECTURE.md). Each layer imports
only the layers below it, ``errors`` and ``config``.
"""

import os as _os

# transformers prints advisories ("PyTorch was not found ...") at import, once per process; only
# its tokenizers are used here. Set TRANSFORMERS_VERBOSITY yourself to see them.
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from nemocc_dask.errors import Preempted, RunError, StartError
from nemocc_dask.io import SAMPLE_PATH, read_input
from nemocc_dask.io.gpu import to_gpu
from nemocc_dask.llm import LLMConfig, PreflightError
from nemocc_dask.llm.served_tokenizer import find_served_tokenizer
from nemocc_dask.recipe.presets import PRESETS, TaskPreset, get_preset, make_task
from nemocc_dask.recipe.tokenizer import load_tokenizer, prompt_overhead_tokens
from nemocc_dask.run.cluster import make_client
from nemocc_dask.run.nemotron_cc import run_nemotron_cc, run_nemotron_cc_to_parquet
from nemocc_dask.run.pipeline import generate, postprocess, preprocess, run_task
from nemocc_dask.run.plan import plan, plan_nemotron_cc
from nemocc_dask.run.runner import run_to_parquet
from nemocc_dask.testing import MockLLMServer

__all__ = [
    "LLMConfig", "MockLLMServer", "PRESETS", "SAMPLE_PATH", "PreflightError", "Preempted",
    "RunError",
    "StartError", "TaskPreset", "find_served_tokenizer", "generate", "get_preset",
    "load_tokenizer", "make_client",
    "make_task", "plan", "plan_nemotron_cc", "postprocess", "preprocess",
    "prompt_overhead_tokens", "read_input",
    "run_nemotron_cc", "run_nemotron_cc_to_parquet", "run_task", "run_to_parquet", "to_gpu",
]
