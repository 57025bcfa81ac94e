import dataclasses

import pytest

from nemocc_dask.recipe import prompts
from nemocc_dask.recipe.presets import PRESETS, TaskPreset, get_preset, make_task


def test_five_tasks_with_reference_table():
    assert set(PRESETS) == {"wikipedia_paraphrasing", "diverse_qa", "distill", "extract_knowledge",
                            "knowledge_list"}
    w = PRESETS["wikipedia_paraphrasing"]
    assert (w.output_field, w.min_document_tokens, w.min_segment_tokens, w.max_input_tokens,
            w.max_output_tokens, w.effective_postprocess_max_tokens, w.postprocess_min_tokens) == \
        ("rephrased", 5, 5, 512, 512, 510, 50)
    assert w.rejoin_segments and w.response_prefix == "Here is a paraphrased version:"
    qa = PRESETS["diverse_qa"]
    assert (qa.max_input_tokens, qa.max_output_tokens, qa.effective_postprocess_max_tokens,
            qa.postprocess_min_tokens) == (1000, 600, 598, 100)
    d = PRESETS["distill"]
    assert d.system_prompt == prompts.NEMOTRON_CC_DISTILL_SYSTEM_PROMPT
    assert (d.min_segment_tokens, d.max_input_tokens, d.max_output_tokens) == (10, 2000, 1600)
    ek = PRESETS["extract_knowledge"]
    assert ek.lines_to_remove == ("Passage:", "Passage 1:", "Passage 2:", "Passage 3:")
    assert (ek.max_input_tokens, ek.max_output_tokens) == (1400, 1400)
    for name in ("diverse_qa", "distill", "extract_knowledge", "knowledge_list"):
        assert PRESETS[name].output_field == name
        assert not PRESETS[name].rejoin_segments


def test_generation_defaults():
    for p in PRESETS.values():
        assert (p.temperature, p.top_p, p.stop, p.top_k) == (0.5, 0.9, None, None)
        assert p.effective_max_tokens == p.max_output_tokens


def test_presets_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["distill"].max_input_tokens = 5


def test_get_preset_overrides_and_errors():
    p = get_preset("distill", max_input_tokens=100)
    assert p.max_input_tokens == 100 and PRESETS["distill"].max_input_tokens == 2000
    with pytest.raises(ValueError, match="valid tasks: wikipedia_paraphrasing"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown preset field.*max_input_tokenz.*valid fields"):
        get_preset("distill", max_input_tokenz=1)


def test_messages_with_and_without_system_prompt():
    assert [m["role"] for m in PRESETS["distill"].messages("x")] == ["system", "user"]
    task = make_task("echo", "Say {document}")
    assert task.messages("hi") == [{"role": "user", "content": "Say hi"}]
    assert task.output_field == "echo"


@pytest.mark.parametrize("template, problem", [
    ("no placeholder here", "exactly once"),
    ("{document} and {other}", "unknown placeholder"),
    ("{document} {document}", "exactly once"),
    ("broken {document", "not a valid format string"),
])
def test_bad_templates_fail_at_construction(template, problem):
    with pytest.raises(ValueError, match=problem):
        make_task("bad", template)


def test_make_task_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown task field"):
        make_task("t", "{document}", max_tokenz=3)


def test_describe_is_json_friendly():
    import json

    def my_step(df):
        return df

    task = make_task("t", "{document}", postprocess_steps=["drop_failed", my_step])
    described = json.loads(json.dumps(task.describe()))
    assert described["postprocess_steps"][0] == "drop_failed"
    assert described["postprocess_steps"][1].endswith("my_step")
    assert isinstance(task, TaskPreset)
