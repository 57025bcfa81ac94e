"""Series -> Series text cleanups of the Nemotron-CC post-processing.

Each function takes a pandas or cuDF Series of strings and returns one of the same type.
Cleanups that cuDF cannot express (Python regexes with back-references, per-line rules) run on the
host in one batch per call (see ``map_strings``); None/NaN/non-string values stay missing.
"""

from __future__ import annotations

import re
from typing import Iterable

from nemocc_dask.io.frames import map_strings


# Decision 6: the reference's four rules, but a marker only opens at a non-word boundary and only
# closes before one, so `snake_case_var`, `__init__`, `2*3*4` and `file_name.py` survive. The one
# exception: a closing marker right after punctuation may be glued to the next word, as LLMs write
# labels (`**Question:**What is X?`). Nested emphasis: the innermost pairs go first (an opener
# pairs with the nearest closer, as in CommonMark), and a line wrapped whole in a marker is
# unwrapped, dropping the markers of that kind left unpaired inside it (`**see **[x](u) c.**`).
class _Emphasis:
    """One emphasis marker (``**``, ``*`` or ``_``): its pairs, and a line wrapped in it."""

    def __init__(self, marker: str):
        m, c = re.escape(marker), re.escape(marker[0])
        opener = rf"(?<![\w{c}]){m}(?=[^\s{c}])"
        closer = rf"(?<=[^\s{c}]){m}(?:(?![\w{c}])|(?<=[^\w\s{c}]{m})(?=\w))"
        self.pair = re.compile(rf"{opener}((?:(?!{opener}).)+?){closer}")
        self.wrapped = re.compile(rf"{opener}(.*){closer}")
        self.unpaired = re.compile(rf"{opener}|(?<=[^\s{c}]){m}(?![\w{c}])")

    def remove(self, line: str) -> str:
        wrapped = self.wrapped.fullmatch(line)
        if wrapped:
            line = wrapped.group(1)
        while True:
            paired = self.pair.sub(r"\1", line)
            if paired == line:
                break
            line = paired
        return self.unpaired.sub("", line) if wrapped else line


_EMPHASIS = [_Emphasis("**"), _Emphasis("*"), _Emphasis("_")]
_LINK = re.compile(r"\[.*?\]\((.*?)\)")


def _remove_markdown_line(line: str) -> str:
    for emphasis in _EMPHASIS:
        line = emphasis.remove(line)
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

