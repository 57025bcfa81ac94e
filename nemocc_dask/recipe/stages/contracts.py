"""What each stage reads and writes, declared (as NeMo Curator's ``inputs()``/``outputs()``) and
checked once when a graph is built: ``check_contracts`` walks the stages in order, refuses a
column that neither the input nor an earlier stage has (naming the stage, the column and what
there is), and returns the columns the last stage leaves, the run's output schema.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemocc_dask.recipe.presets import TaskPreset
from nemocc_dask.recipe.stages.postprocess import resolve_steps
from nemocc_dask.recipe.stages.preprocess import DOCUMENT_TOKENS, SEGMENT_ID, SEGMENT_TOKENS
from nemocc_dask.recipe.stages.route import Route


@dataclass(frozen=True)
class Contract:
    """One stage: the columns it reads (column -> its role, for the message) and writes."""

    stage: str
    reads: dict[str, str]
    writes: tuple[str, ...] = ()


def result_columns(preset: TaskPreset) -> dict[str, str]:
    """The columns ``generate`` adds, with their explicit dtypes."""
    return {preset.output_field: "string", "llm_finish_reason": "string",
            "llm_prompt_tokens": "Int64", "llm_completion_tokens": "Int64", "llm_error": "string",
            "llm_model": "string", "task": "string"}


def route_contract(route: Route) -> Contract:
    return Contract("route", {route.field: "quality"})


def preprocess_contract(preset: TaskPreset, id_field: str) -> Contract:
    return Contract("preprocess", {preset.input_field: "text", id_field: "id"},
                    (DOCUMENT_TOKENS, SEGMENT_ID, SEGMENT_TOKENS))


def generate_contract(preset: TaskPreset, all_choices: bool = False) -> Contract:
    return Contract("generate", {preset.input_field: "text"},
                    tuple(result_columns(preset)) + (("llm_choices",) if all_choices else ()))


def postprocess_contract(preset: TaskPreset, id_field: str) -> Contract:
    """The chain's reads and writes: the output and id fields, and what each built-in step
    declares (a user's function declares nothing)."""
    names = {"{input}": preset.input_field, "{id}": id_field}
    reads = {preset.output_field: "output", id_field: "id"}
    writes: list[str] = []
    for name, step in resolve_steps(preset.postprocess_steps):
        reads.update({names.get(c, c): f"read by step {name}" for c in step.reads
                      if names.get(c, c) not in writes and names.get(c, c) not in reads})
        writes += [c for c in step.writes if c not in writes]
    return Contract("postprocess", reads, tuple(writes))


def task_contracts(preset: TaskPreset, id_field: str, route: Route | None = None,
                   all_choices: bool = False) -> list[Contract]:
    """The contracts of one task's stages, in order (the route first when there is one)."""
    stages = [preprocess_contract(preset, id_field), generate_contract(preset, all_choices),
              postprocess_contract(preset, id_field)]
    return ([route_contract(route)] if route is not None else []) + stages


def check_contracts(columns, contracts: list[Contract]) -> list[str]:
    """The columns after the ``contracts``' stages run over a frame with ``columns``; ValueError
    for a column a stage reads that is not there by then."""
    present = list(columns)
    for contract in contracts:
        for column, role in contract.reads.items():
            if column in present:
                continue
            if role in ("text", "id", "quality", "output"):
                raise ValueError(f"{role} column {column!r} not found; the input has columns "
                                 f"{list(columns)}. Pass the right name (e.g. --{role}-field / "
                                 f"{role}_field=)")
            raise ValueError(f"stage {contract.stage} needs column {column!r} ({role}), which "
                             f"neither the input nor an earlier stage has; there are {present}")
        present += [c for c in contract.writes if c not in present]
    return present
