"""A custom, in-process LLM client: a toy rule-based "model" run through the whole machinery.

Run: python examples/custom_client.py
"""

from __future__ import annotations

import dask.dataframe as dd
import pandas as pd

from nemocc_dask import LLMConfig, make_task, run_task
from nemocc_dask.llm.client import Completion, RetryableError


class ShoutingClient:
    """Answers with the document in upper case. Raising RetryableError makes the pool retry;
    any other exception fails just that row (it lands in rejects with its message)."""

    def complete_sync(self, messages, settings):
        document = messages[-1]["content"].split("\n", 1)[-1]
        if not document.strip():
            raise RetryableError("empty", "nothing to shout about")
        text = document.upper()
        return Completion(text=text, finish_reason="stop", prompt_tokens=len(document) // 4,
                          completion_tokens=len(text) // 4)


if __name__ == "__main__":
    task = make_task("shout", "Repeat loudly:\n{document}", min_document_tokens=1,
                     min_segment_tokens=1, postprocess_min_tokens=1)
    docs = pd.DataFrame({"id": [1, 2], "text": ["hello there, reader", "dask runs this"]})
    out = run_task(dd.from_pandas(docs, npartitions=1), task,
                   LLMConfig(client_factory=ShoutingClient)).compute(scheduler="threads")
    print(out[["id", "shout"]].to_string(index=False))
