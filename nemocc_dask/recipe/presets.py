"""The task defaults table as data: one frozen :class:`TaskPreset` per Nemotron-CC task.

``PRESETS`` holds the five tasks of the reference (section 3 of the reference document, with this
project's decisions 1 and 3 applied). ``get_preset`` returns a copy with overrides;
``make_task`` builds a user-defined task from a prompt template.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

from nemocc_dask.recipe import prompts

QA_PREFIX = "Here are the questions and answers based on the provided text:"
PARAPHRASE_PREFIX = "Here is a paraphrased version:"
DISTILL_PREFIX = "Paraphrased Text:"

# A post-processing step is either the name of a built-in step (see nemocc_dask.recipe.stages.postprocess)
# or a user partition function ``f(df) -> df`` that returns the rows it keeps.
PostStep = Union[str, Callable[..., Any]]


GENERATION_FIELDS = ("temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "n")


@dataclass(frozen=True)
class TaskPreset:
    """Everything that defines one synthetic-data task: prompts, token limits, cleanup chain.

    Token limits follow the reference's table. The generation settings (``GENERATION_FIELDS``
    and ``extra_body``) live here only (``LLMConfig`` holds the endpoint): ``max_tokens`` (the
    generation limit sent to the endpoint) defaults to ``max_output_tokens``; fields left as
    ``None`` are not sent; change them with overrides (``run_to_parquet(..., temperature=0.7)``,
    ``--temperature``); every field below is also a command-line option of ``run``,
    ``nemotron-cc`` and ``plan`` (built from this list).

    Parameters
    ----------
    name, prompt_template, output_field:
        The task: its name, the user prompt with ``{document}`` once, the output column.
    system_prompt:
        The system message (None: only a user message is sent).
    input_field:
        The input column with the documents.
    min_document_tokens:
        Shorter documents are not processed (``document_too_short``).
    min_segment_tokens:
        Shorter segments are merged with their neighbours or dropped.
    max_input_tokens:
        Documents are split into segments of at most this many tokens.
    max_output_tokens:
        The task's answer limit, sent as ``max_tokens`` unless that is given.
    postprocess_max_tokens:
        Longer answers are rejected as ``too_long`` (default: max_output_tokens - 2).
    postprocess_min_tokens:
        Shorter answers are rejected as ``too_short``.
    response_prefix:
        Answers must start with it (``missing_prefix``); it is then removed.
    lines_to_remove:
        Exact lines deleted from answers.
    keep_incomplete_documents:
        With the ``join_segments`` step: write a document even when some of its segments were
        rejected (the reference's behaviour); by default it is rejected as
        ``incomplete_document``.
    max_num_pairs:
        diverse_qa: at most this many Question/Answer pairs are sampled per answer.
    postprocess_steps:
        The post-processing chain: built-in step names or ``df -> df`` functions.
    temperature, top_p, top_k, seed, stop, n:
        Generation settings sent with each request (None: not sent; n=1 is not sent).
    max_tokens:
        The generation limit sent with each request (default: max_output_tokens).
    extra_body:
        More fields for the request body, passed through to the server (a JSON object).
    """

    name: str
    prompt_template: str
    output_field: str
    system_prompt: str | None = prompts.NEMOTRON_CC_SYSTEM_PROMPT
    input_field: str = "text"
    min_document_tokens: int = 30
    min_segment_tokens: int = 30
    max_input_tokens: int = 1000
    max_output_tokens: int = 600
    postprocess_max_tokens: int | None = None
    postprocess_min_tokens: int = 50
    response_prefix: str | None = None
    lines_to_remove: tuple[str, ...] = ()
    keep_incomplete_documents: bool = False
    max_num_pairs: int = 10
    postprocess_steps: tuple[PostStep, ...] = (
        "drop_failed", "drop_truncated", "drop_too_long", "remove_markdown", "drop_too_short",
    )
    temperature: float | None = 0.5
    top_p: float | None = 0.9
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    n: int = 1
    extra_body: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_template(self.prompt_template)
        if self.stop is not None and not isinstance(self.stop, tuple):
            stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
            object.__setattr__(self, "stop", stop)
        if not isinstance(self.postprocess_steps, tuple):
            object.__setattr__(self, "postprocess_steps", tuple(self.postprocess_steps))
        if not isinstance(self.lines_to_remove, tuple):
            object.__setattr__(self, "lines_to_remove", tuple(self.lines_to_remove))

    @property
    def effective_postprocess_max_tokens(self) -> int:
        """The post-processing max-token filter: given, else max output tokens - 2."""
        if self.postprocess_max_tokens is not None:
            return self.postprocess_max_tokens
        return self.max_output_tokens - 2

    @property
    def effective_max_tokens(self) -> int:
        """The ``max_tokens`` sent to the endpoint (decision 3: the task's own max output)."""
        return self.max_tokens if self.max_tokens is not None else self.max_output_tokens

    def messages(self, document: str) -> list[dict]:
        """Chat messages for one segment: [system, user], or only [user] without a system prompt."""
        user = {"role": "user", "content": self.prompt_template.format(document=document)}
        if self.system_prompt:
            return [{"role": "system", "content": self.system_prompt}, user]
        return [user]

    def request_settings(self, model: str) -> dict:
        """The body fields of each request of this task to ``model``; unset fields are not
        sent, ``extra_body`` is merged in last."""
        settings: dict[str, Any] = {"model": model}
        for name in GENERATION_FIELDS:
            value = self.effective_max_tokens if name == "max_tokens" else getattr(self, name)
            if value is None or (name == "n" and value == 1):
                continue
            settings[name] = list(value) if name == "stop" else value
        settings.update(self.extra_body)
        return settings

    def describe(self) -> dict:
        """A JSON-able description of every field (callables by qualified name) for fingerprints.
        ``rejoin_segments`` (a field once, now what the steps say) stays in it so that runs
        started before keep their identity."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "postprocess_steps":
                value = [s if isinstance(s, str) else _callable_name(s) for s in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out["rejoin_segments"] = "join_segments" in out["postprocess_steps"]
        return out


def _callable_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def validate_template(template: str) -> None:
    """Raise ValueError unless ``template`` has exactly one ``{document}`` and no other placeholder."""
    if not isinstance(template, str) or not template:
        raise ValueError("prompt template must be a non-empty string containing '{document}'")
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"prompt template is not a valid format string ({exc}); "
                         "write literal braces as '{{' and '}}'") from exc
    others = sorted({n for n in names if n != "document"})
    if others:
        shown = ", ".join("{" + n + "}" for n in others)
        raise ValueError(f"prompt template has unknown placeholder(s) {shown}; the only placeholder "
                         "allowed is {document} (write literal braces as '{{' and '}}')")
    if names.count("document") != 1:
        raise ValueError("prompt template must contain the placeholder {document} exactly once "
                         f"(found {names.count('document')})")


_PARAPHRASE_STEPS = ("drop_failed", "drop_truncated", "drop_too_long", "remove_markdown",
                     "require_prefix", "slice_after_prefix", "remove_quotations")

PRESETS: dict[str, TaskPreset] = {
    "wikipedia_paraphrasing": TaskPreset(
        name="wikipedia_paraphrasing",
        prompt_template=prompts.WIKIPEDIA_REPHRASING_PROMPT_TEMPLATE,
        output_field="rephrased",
        min_document_tokens=5, min_segment_tokens=5,
        max_input_tokens=512, max_output_tokens=512, postprocess_min_tokens=50,
        response_prefix=PARAPHRASE_PREFIX,
        postprocess_steps=_PARAPHRASE_STEPS + ("drop_incomplete_documents", "join_segments",
                                               "drop_too_short"),
    ),
    "diverse_qa": TaskPreset(
        name="diverse_qa",
        prompt_template=prompts.DIVERSE_QA_PROMPT_TEMPLATE,
        output_field="diverse_qa",
        min_document_tokens=30, min_segment_tokens=30,
        max_input_tokens=1000, max_output_tokens=600, postprocess_min_tokens=100,
        response_prefix=QA_PREFIX,
        postprocess_steps=("drop_failed", "drop_truncated", "drop_too_long", "remove_markdown",
                           "format_diverse_qa", "drop_too_short"),
    ),
    "distill": TaskPreset(
        name="distill",
        prompt_template=prompts.DISTILL_PROMPT_TEMPLATE,
        output_field="distill",
        system_prompt=prompts.NEMOTRON_CC_DISTILL_SYSTEM_PROMPT,
        min_document_tokens=30, min_segment_tokens=10,
        max_input_tokens=2000, max_output_tokens=1600, postprocess_min_tokens=50,
        response_prefix=DISTILL_PREFIX,
        postprocess_steps=_PARAPHRASE_STEPS + ("drop_too_short",),
    ),
    "extract_knowledge": TaskPreset(
        name="extract_knowledge",
        prompt_template=prompts.EXTRACT_KNOWLEDGE_PROMPT_TEMPLATE,
        output_field="extract_knowledge",
        min_document_tokens=30, min_segment_tokens=30,
        max_input_tokens=1400, max_output_tokens=1400, postprocess_min_tokens=50,
        lines_to_remove=("Passage:", "Passage 1:", "Passage 2:", "Passage 3:"),
        postprocess_steps=("drop_failed", "drop_truncated", "drop_too_long", "remove_markdown",
                           "remove_lines", "drop_too_short"),
    ),
    "knowledge_list": TaskPreset(
        name="knowledge_list",
        prompt_template=prompts.KNOWLEDGE_LIST_PROMPT_TEMPLATE,
        output_field="knowledge_list",
        min_document_tokens=30, min_segment_tokens=30,
        max_input_tokens=1000, max_output_tokens=600, postprocess_min_tokens=50,
        postprocess_steps=("drop_failed", "drop_truncated", "drop_too_long", "remove_markdown",
                           "format_knowledge_list", "drop_too_short"),
    ),
}

HIGH_QUALITY_TASKS = ("diverse_qa", "distill", "extract_knowledge", "knowledge_list")
LOW_QUALITY_TASKS = ("wikipedia_paraphrasing",)
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TaskPreset))


def get_preset(task: str | TaskPreset, **overrides: Any) -> TaskPreset:
    """Return the preset for ``task`` (a name or a TaskPreset) with ``overrides`` applied.

    Raises ValueError naming the valid tasks or fields when a name or a field is unknown.
    """
    if isinstance(task, TaskPreset):
        preset = task
    elif isinstance(task, str) and task in PRESETS:
        preset = PRESETS[task]
    else:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(PRESETS)} "
                         "(or pass a TaskPreset from make_task)")
    unknown = sorted(set(overrides) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"unknown preset field(s) {', '.join(unknown)}; valid fields: "
                         f"{', '.join(FIELD_NAMES)}")
    return dataclasses.replace(preset, **overrides) if overrides else preset


def make_task(name: str, prompt_template: str, system_prompt: str | None = None,
              input_field: str = "text", output_field: str | None = None,
              postprocess_steps: Sequence[PostStep] | None = None, **limits: Any) -> TaskPreset:
    """Build a custom task. The template must contain ``{document}`` once and nothing else in braces.

    ``output_field`` defaults to ``name``; ``limits`` are any other TaskPreset fields.
    """
    if not name or not isinstance(name, str):
        raise ValueError("a custom task needs a non-empty name")
    unknown = sorted(set(limits) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"unknown task field(s) {', '.join(unknown)}; valid fields: "
                         f"{', '.join(FIELD_NAMES)}")
    kwargs = dict(limits)
    if postprocess_steps is not None:
        kwargs["postprocess_steps"] = tuple(postprocess_steps)
    return TaskPreset(name=name, prompt_template=prompt_template, system_prompt=system_prompt,
                      input_field=input_field, output_field=output_field or name, **kwargs)
