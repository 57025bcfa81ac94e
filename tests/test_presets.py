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
    assert "join_segments" in w.postprocess_steps and w.response_prefix == "Here is a paraphrased version:"
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
        assert "join_segments" not in PRESETS[name].postprocess_steps


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


def test_generation_settings_have_one_home():
    """The task's preset holds the generation settings, LLMConfig the endpoint: no field is
    declared in both, and a run's overrides reach the request body."""
    from nemocc_dask import LLMConfig
    from nemocc_dask.recipe.presets import GENERATION_FIELDS

    endpoint = {f.name for f in dataclasses.fields(LLMConfig)}
    task = {f.name for f in dataclasses.fields(TaskPreset)}
    assert not endpoint & task
    assert set(GENERATION_FIELDS) | {"extra_body"} <= task
    llm = LLMConfig(base_url="http://127.0.0.1:9/v1", model="m")
    preset = get_preset("distill", temperature=0.7, top_k=20, stop=["</a>"],
                        extra_body={"min_p": 0.1})
    assert llm.request_settings(preset) == {"model": "m", "temperature": 0.7, "top_p": 0.9,
                                            "top_k": 20, "max_tokens": 1600, "stop": ["</a>"],
                                            "min_p": 0.1}


def test_describe_keeps_rejoin_segments_for_earlier_runs_identity():
    """rejoin_segments is no field any more (nothing read it); the description that run
    identities are made of still holds it, as the steps say, so earlier runs resume."""
    assert PRESETS["wikipedia_paraphrasing"].describe()["rejoin_segments"] is True
    assert PRESETS["distill"].describe()["rejoin_segments"] is False


@pytest.mark.slow
def test_generation_flags_reach_every_task_of_the_pipeline(tmp_path):
    """--temperature, --max-tokens and --stop on the command line are the tasks' settings: the
    body each task sends (recorded in its run.json) carries them."""
    import json
    import subprocess
    import sys

    from conftest import make_docs

    from nemocc_dask import MockLLMServer

    make_docs(20).to_parquet(tmp_path / "docs.parquet")
    with MockLLMServer(latency=0.01) as server:
        done = subprocess.run(
            [sys.executable, "-m", "nemocc_dask.cli", "nemotron-cc", "--tasks",
             "distill,knowledge_list", "--input", str(tmp_path / "docs.parquet"), "--output",
             str(tmp_path / "out"), "--base-url", server.base_url, "--model", "mock",
             "--workers", "1", "--no-progress", "--temperature", "0.7", "--max-tokens", "300",
             "--stop", "</end>"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for task in ("distill", "knowledge_list"):
        material = json.loads((tmp_path / "out" / task / "run.json").read_text())["material"]
        assert material["settings"] == {"model": "mock", "temperature": 0.7, "top_p": 0.9,
                                        "max_tokens": 300, "stop": ["</end>"]}
