"""Load a custom task from a TOML, YAML or JSON file (``nemocc-dask run --prompt-file``).

Keys: ``name``, ``prompt_template`` (with ``{document}``), optional ``system_prompt``,
``input_field``, ``output_field``, ``postprocess_steps`` (built-in step names) and any other
TaskPreset field (limits, generation settings). Example::

    name = "summary"
    system_prompt = "You are a careful editor."
    prompt_template = "Summarise this text in plain English.\\n\\nText: {document}"
    max_output_tokens = 400
    postprocess_steps = ["drop_failed", "drop_truncated", "remove_markdown", "drop_too_short"]
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from nemocc_dask.errors import ConfigError
from nemocc_dask.recipe.presets import TaskPreset, make_task
from nemocc_dask.recipe.stages.postprocess import resolve_steps

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class TaskFileError(ConfigError):
    """The prompt file is missing, unreadable or not a valid task; the message names the file."""


def load_task_file(path: str | Path) -> TaskPreset:
    """A TaskPreset from ``path``; TaskFileError names the file and the problem (syntax errors
    with their line)."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"prompt file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError("use a .toml, .yaml/.yml or .json file")
    except (ValueError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())
        raise TaskFileError(f"cannot read prompt file {str(path)!r}: {detail}") from None
    if not isinstance(data, dict) or "name" not in data or "prompt_template" not in data:
        raise TaskFileError(f"prompt file {str(path)!r} needs at least 'name' and "
                            "'prompt_template'")
    try:
        task = make_task(**data)
        resolve_steps(task.postprocess_steps)
    except (TypeError, ValueError) as exc:
        raise TaskFileError(f"prompt file {str(path)!r}: {exc}") from None
    return task
