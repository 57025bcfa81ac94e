"""Series -> Series text cleanups of the Nemotron-CC post-processing.

Each function takes a pandas or cuDF Series of strings and returns one of the same type.
Cleanups that cuDF cannot express (Python regexes with back-references, per-line rules) run on the
host in one batch per call (see ``map_strings``); None/NaN/non-string values stay missing.
"""

from __future__ import annotations

import re
from typing import Iterable

from nemocc_dask.stages.backend import map_strings

# Decision 6: the reference's four rules, but a marker only opens at a non-word boundary and only
# closes before one, so `snake_case_var`, `__init__`, `2*3*4` and `file_name.py` survive. The one
# exception: a closing marker right after punctuation may be glued to the next word, as LLMs write
# labels (`**Question:**What is X?`).
_BOLD = re.compile(r"(?<![\w*])\*\*(?=\S)(.+?)(?<=\S)\*\*(?:(?![\w*])|(?<=[^\w\s*]\*\*)(?=\w))")
_ITALIC = re.compile(r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?:(?![\w*])|(?<=[^\w\s*]\*)(?=\w))")
_UNDERLINE = re.compile(r"(?<![\w_])_(?=[^\s_])(.+?)(?<=[^\s_])_(?:(?![\w_])|(?<=[^\w\s_]_)(?=\w))")
_LINK = re.compile(r"\[.*?\]\((.*?)\)")


def _remove_markdown_line(line: str) -> str:
    for pattern in (_BOLD, _ITALIC, _UNDERLINE):
        line = pattern.sub(r"\1", line)
    return _LINK.sub(r"\1", line)


def _remove_markdown_text(text: str) -> str:
    return "\n".join(_remove_markdown_line(line) for line in text.split("\n"))


def remove_markdown(s):
    """Strip bold, italic, underline and link markup per line (links keep their URL).

    Unlike the reference, intra-word markers (``snake_case``, ``__init__``, ``2*3*4``) are kept.
    """
    return map_strings(s, _remove_markdown_text)


def _remove_quotations_text(text: str) -> str:
    if len(text.strip()) > 2 and text[0] == '"' and text[-1] == '"':
        if "\n" not in text.strip() or text.split("\n")[0][-1] != '"':
            return text[1:-1]
    return text


def remove_quotations(s):
    """Drop one pair of surrounding double quotes, with the reference's multi-line rule."""
    return map_strings(s, _remove_quotations_text)


def has_prefix(s, prefix: str):
    """Boolean Series: the text starts with ``prefix`` (case-sensitive, no stripping)."""
    return s.fillna("").astype(str).str.startswith(prefix)


def slice_after(s, marker: str):
    """Text after the first ``marker``, stripped; "" where the marker is absent."""
    def cut(text: str) -> str:
        found = text.find(marker)
        return "" if found == -1 else text[found + len(marker):].strip()
    return map_strings(s, cut)


def remove_lines(s, patterns: Iterable[str]):
    """Drop lines exactly equal (no strip) to one of ``patterns``."""
    remove = frozenset(patterns)
    return map_strings(s, lambda t: "\n".join(l for l in t.split("\n") if l not in remove))


def _format_knowledge_list_text(text: str) -> str:
    out = []
    for i, line in enumerate(text.split("\n")):
        if i == 0 and not line.startswith("-"):
            continue
        out.append(line[2:].strip() if line.startswith(("  ", "- ")) else line)
    return "\n".join(out)


def format_knowledge_list(s):
    """KnowledgeList cleanup: drop a non-bullet first line, strip "- " and two-space indents."""
    return map_strings(s.fillna(""), _format_knowledge_list_text)

