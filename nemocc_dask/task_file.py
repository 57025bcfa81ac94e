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

from nemocc_dask.presets import TaskPreset, make_task
from nemocc_dask.stages.postprocess import resolve_steps


def load_task_file(path: str | Path) -> TaskPreset:
    """A TaskPreset from ``path``; ValueError names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError("use a .toml, .yaml/.yml or .json file")
    except ValueError as exc:
        raise ValueError(f"cannot read prompt file {str(path)!r}: {exc}") from None
    if not isinstance(data, dict) or "name" not in data or "prompt_template" not in data:
        raise ValueError(f"prompt file {str(path)!r} needs at least 'name' and 'prompt_template'")
    try:
        task = make_task(**data)
        resolve_steps(task.postprocess_steps)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"prompt file {str(path)!r}: {exc}") from None
    return task
