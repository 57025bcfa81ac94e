"""nemocc_dask: the Nemotron-CC synthetic-data recipe over Dask DataFrames."""

from nemocc_dask.gpu import to_gpu
from nemocc_dask.llm import LLMConfig, MockLLMServer, PreflightError
from nemocc_dask.pipeline import generate, postprocess, preprocess, run_task
from nemocc_dask.presets import PRESETS, TaskPreset, get_preset, make_task
from nemocc_dask.tokenizer import load_tokenizer, prompt_overhead_tokens

__all__ = [
    "LLMConfig", "MockLLMServer", "PRESETS", "PreflightError", "TaskPreset", "generate",
    "get_preset", "load_tokenizer", "make_task", "postprocess", "preprocess",
    "prompt_overhead_tokens", "run_task", "to_gpu",
]
