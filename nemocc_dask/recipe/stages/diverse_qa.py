"""DiverseQA post-processing: parse question/answer lines, shuffle, keep a sample, prepend the text.

Parsing and the sampling formula follow the reference (section 1.10); the shuffle and the number of
pairs come from a RNG seeded by (seed, document id, segment id) (decision 5), so the same input gives
the same output on any number of workers.
"""

from __future__ import annotations

import random

from nemocc_dask.io.frames import series_like, to_host_list
from nemocc_dask.recipe.presets import QA_PREFIX
from nemocc_dask.recipe.tokenizer import count_tokens_list


def parse_qa_pairs(response: str, prefix: str = QA_PREFIX) -> list[str]:
    """The "Question: ... Answer: ..." entries of a response; [] if any other line comes first."""
    lines = [line.strip() for line in response.split("\n") if line.strip()]
    lines = [line[2:].strip() if line.startswith("- ") else line for line in lines]
    if lines and lines[0] == prefix:
        lines = lines[1:]
    pairs: list[str] = []
    for line in lines:
        if line.startswith("Question:"):
            pairs.append(line)
        elif pairs:
            pairs[-1] += "\n" + line
        else:
            return []
    return pairs


def row_rng(seed: int, document_id, segment_id) -> random.Random:
    """A RNG that depends only on the seed and the row's document and segment ids."""
    return random.Random(f"{seed}\x1f{document_id}\x1f{segment_id}")


def format_qa(text: str, response: str, rng: random.Random, max_num_pairs: int,
              text_tokens: int | None, prefix: str = QA_PREFIX) -> str:
    """Segment text, a blank line, then 1..k shuffled QA pairs; "" when nothing parses."""
    pairs = parse_qa_pairs(response, prefix)
    if not pairs:
        return ""
    rng.shuffle(pairs)
    if text_tokens is not None:
        upper = max(1, int(max_num_pairs * text_tokens / 150))
    else:
        upper = max_num_pairs
    pairs = pairs[: rng.randint(1, max(1, upper))]
    return f"{text}\n\n" + "\n\n".join(pairs)


def format_diverse_qa(df, text_field: str = "text", qa_field: str = "diverse_qa", tokenizer=None,
                      prefix: str = QA_PREFIX, max_num_pairs: int = 10, seed: int = 0,
                      document_id_field: str = "id", segment_id_field: str = "segment_id"):
    """Rewrite ``qa_field`` as segment text + sampled QA pairs ("" when the response does not
    parse). Reads ``text_field``, ``qa_field``, ``document_id_field``, ``segment_id_field``.
    With a tokenizer, the pair limit scales with the segment's tokens (no special tokens).
    """
    texts = to_host_list(df[text_field])
    responses = to_host_list(df[qa_field])
    doc_ids = to_host_list(df[document_id_field])
    seg_ids = to_host_list(df[segment_id_field]) if segment_id_field in df.columns else [0] * len(df)
    counts = (count_tokens_list(tokenizer, texts, add_special_tokens=False) if tokenizer is not None
              else [None] * len(texts))
    out = []
    for text, response, doc_id, seg_id, n_tok in zip(texts, responses, doc_ids, seg_ids, counts):
        if not isinstance(text, str) or not isinstance(response, str):
            out.append("")
            continue
        out.append(format_qa(text, response, row_rng(seed, doc_id, seg_id), max_num_pairs, n_tok,
                             prefix))
    result = df.copy()
    result[qa_field] = series_like(out, df)
    return result
