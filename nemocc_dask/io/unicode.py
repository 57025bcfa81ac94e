"""Text that UTF-8 can hold. JSON may spell lone UTF-16 surrogates (``"\\ud800"``, written by
tools that cut strings between the two halves of an emoji); Python decodes them into strings that
no parquet file or journal can encode. They become U+FFFD, as a UTF-8 decoder turns bad bytes."""

from __future__ import annotations

import re

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def without_lone_surrogates(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD (the same object when it has none)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text)
    return text


def may_hold_surrogates(json_text: str) -> bool:
    """Whether a JSON text spells a surrogate escape (``\\uD800``-``\\uDFFF``); without one, the
    values it decodes to are valid text (a fast test before walking them)."""
    return "\\ud" in json_text or "\\uD" in json_text


def json_without_lone_surrogates(value):
    """A decoded JSON value with ``without_lone_surrogates`` applied to every string in it
    (object keys included)."""
    if isinstance(value, str):
        return without_lone_surrogates(value)
    if isinstance(value, list):
        return [json_without_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {json_without_lone_surrogates(k): json_without_lone_surrogates(v)
                for k, v in value.items()}
    return value
