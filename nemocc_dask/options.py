"""Command-line options built from the config dataclasses (``LLMConfig``, ``TaskPreset``,
``ServeSpec``): one option per field, named after it (``max_in_flight`` -> ``--max-in-flight``),
its type from the annotation, its help from the class docstring's ``Parameters`` section and its
default from the field, so that a setting is declared once and every setting a user can set in
Python can be set on the command line. An option not given is not passed: the dataclass default
applies.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import json
import re
import typing
from typing import Any


def field_docs(cls) -> dict[str, str]:
    """Each field's text in ``cls``'s numpydoc ``Parameters`` section (``a, b:`` documents both)."""
    doc = cls.__doc__ or ""
    section = doc.split("----------", 1)[1] if "----------" in doc else ""
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in section.splitlines():
        header = re.match(r"^    ([a-z_][a-z_0-9, ]*):\s*$", line)
        if header:
            names = [n.strip() for n in header.group(1).split(",")]
            for name in names:
                docs[name] = ""
        elif line.strip() and names:
            for name in names:
                docs[name] = f"{docs[name]} {line.strip()}".strip()
    return docs


def auto_or(convert, what: str):
    """An argparse type: ``'auto'`` or ``convert(value)`` (``what`` names it in the error)."""
    def parse(value: str):
        if value == "auto":
            return value
        try:
            return convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'auto' or {what}, got {value!r}") from None
    return parse


def _json_object(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}: {exc}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return parsed


class _KeyValues(argparse.Action):
    """``--option KEY=VALUE``, repeatable, gathered into a dict."""

    def __call__(self, parser, namespace, value, option_string=None):
        key, sep, val = value.partition("=")
        if not sep or not key:
            parser.error(f"{option_string} takes KEY=VALUE (got {value!r})")
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), key: val})


def _is_sequence(hint) -> bool:
    return typing.get_origin(hint) in (tuple, list, collections.abc.Sequence)


def _kind(hint) -> dict[str, Any] | None:
    """argparse keywords for a field's type, or None for a field the command line cannot set
    (callables, objects)."""
    args = set(typing.get_args(hint)) - {type(None)}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if _is_sequence(hint) or any(_is_sequence(a) for a in args):
        return {"action": "append", "type": str}  # repeat the option for several values
    if typing.get_origin(hint) is typing.Literal:
        return {"choices": list(typing.get_args(hint))}
    if typing.get_origin(hint) is dict and typing.get_args(hint) == (str, str):
        return {"action": _KeyValues, "metavar": "KEY=VALUE"}
    if hint is dict or typing.get_origin(hint) is dict:
        return {"type": _json_object, "metavar": "JSON"}
    if args == {int, str}:
        return {"type": auto_or(int, "a number")}
    if args == {float, str}:
        return {"type": auto_or(float, "seconds")}
    simple = args if args else {hint}
    if len(simple) == 1 and next(iter(simple)) in (int, float, str):
        return {"type": next(iter(simple))}
    return None


def add_field_options(group, cls, skip=(), rename: dict[str, str] | None = None,
                      show_defaults: bool = True, prefix: str = "") -> list[str]:
    """Add one option per field of ``cls`` (but ``skip``) to ``group``; ``rename``: field ->
    option name where the plain one is taken; ``show_defaults``: say the field's default in the
    help (not for fields whose default is another object's, e.g. each task's); ``prefix``:
    before every option's name (``serve-``). Returns the fields added."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    added = []
    for f in dataclasses.fields(cls):
        kind = _kind(hints[f.name]) if f.name not in skip else None
        if kind is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        text = docs.get(f.name, "").replace("``", "")
        if show_defaults and default not in (None, (), {}, "") \
                and "default" not in text.lower():
            text += f" (default: {default})"
        option = (rename or {}).get(f.name, f"--{prefix}{f.name.replace('_', '-')}")
        if ("action" not in kind or kind["action"] == "append") and "choices" not in kind:
            kind.setdefault("metavar", f.name.upper())
        group.add_argument(option, dest=f"field_{cls.__name__}_{f.name}", default=None,
                           help=text.replace("%", "%%"), **kind)
        added.append(f.name)
    return added


def given(args: argparse.Namespace, cls) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (``add_field_options``), by name."""
    prefix = f"field_{cls.__name__}_"
    out = {}
    for key, value in vars(args).items():
        if key.startswith(prefix) and value is not None:
            name = key[len(prefix):]
            out[name] = tuple(value) if isinstance(value, list) else value
    return out
