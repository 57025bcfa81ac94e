"""Partition functions: pandas or cuDF DataFrame (or Series) in, the same type out."""

from nemocc_dask.recipe.stages.diverse_qa import format_diverse_qa
from nemocc_dask.recipe.stages.postprocess import POSTPROCESS_STEPS, postprocess_partition
from nemocc_dask.recipe.stages.preprocess import preprocess_partition
from nemocc_dask.recipe.stages.segments import (count_tokens, filter_range, join_segments,
                                                split_documents)
from nemocc_dask.recipe.stages.text import (format_knowledge_list, has_prefix, remove_lines,
                                            remove_markdown, remove_quotations, slice_after)

__all__ = [
    "POSTPROCESS_STEPS", "count_tokens", "filter_range", "format_diverse_qa",
    "format_knowledge_list", "has_prefix", "join_segments", "postprocess_partition",
    "preprocess_partition", "remove_lines", "remove_markdown", "remove_quotations",
    "slice_after", "split_documents",
]
