"""The command line is built from the config objects (issue 25): `run`, `nemotron-cc` and `plan`
offer every LLMConfig and TaskPreset field a user can change, with help from the field's docs,
and what is given reaches the objects (nothing else is passed: the dataclass defaults apply)."""

import dataclasses

import pytest

from nemocc_dask import LLMConfig, TaskPreset
from nemocc_dask.cli import (LLM_SKIPPED, SERVE_SKIPPED, TASK_RENAMED, TASK_SKIPPED,
                             _llm_from_args, _task_overrides, build_parser)
from nemocc_dask.options import field_docs
from nemocc_dask.serve import ServeSpec


def _options(command: str) -> dict[str, str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {option: action.help or "" for action in sub._actions
            for option in action.option_strings}


@pytest.mark.parametrize("command", ["run", "nemotron-cc", "plan"])
def test_every_setting_is_an_option_with_its_docs(command):
    options = _options(command)
    for cls, skipped, prefix in ((LLMConfig, LLM_SKIPPED, ""), (TaskPreset, TASK_SKIPPED, ""),
                                 (ServeSpec, SERVE_SKIPPED, "serve-")):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in skipped:
                continue
            option = TASK_RENAMED.get(f.name, f"--{prefix}{f.name.replace('_', '-')}") \
                if cls is TaskPreset else f"--{prefix}{f.name.replace('_', '-')}"
            assert option in options, f"{cls.__name__}.{f.name} has no {option}"
            assert docs.get(f.name), f"{cls.__name__}.{f.name} is not documented"
            assert docs[f.name].replace("``", "")[:30] in options[option].replace("\n", " ")


def test_the_skipped_fields_are_the_ones_a_command_line_cannot_hold():
    assert set(LLM_SKIPPED) == {"api_key", "client_factory", "serve"}  # a secret, objects
    assert set(TASK_SKIPPED) == {"name", "prompt_template", "output_field", "input_field"}
    assert set(SERVE_SKIPPED) == {"command", "model", "backend"}  # --serve gives them


def test_serve_options_reach_the_served_models_spec():
    args = build_parser().parse_args([
        "run", "--task", "distill", "--input", "x", "--output", "y", "--model", "m",
        "--serve", "llamacpp:/models/m.gguf -c 8192", "--serve-per", "node", "--serve-env",
        "A=1", "--serve-env", "B=x=y", "--serve-max-restarts", "0",
        "--serve-startup-timeout", "30"])
    spec = _llm_from_args(args).serve
    assert (spec.backend, spec.model, spec.per, spec.max_restarts, spec.startup_timeout) == (
        "llamacpp", "/models/m.gguf", "node", 0, 30.0)
    assert spec.env == {"A": "1", "B": "x=y"} and spec.health == "/health"
    assert spec.command.endswith("-c 8192") and spec.log_dir is None  # not given: the default
    plain = _llm_from_args(build_parser().parse_args([
        "run", "--task", "distill", "--input", "x", "--output", "y", "--model", "m",
        "--serve", "my-server --port {port}"])).serve
    assert plain == ServeSpec("my-server --port {port}")


def test_given_options_reach_the_objects_and_nothing_else_does():
    args = build_parser().parse_args([
        "run", "--task", "distill", "--input", "x", "--output", "y",
        "--base-url", "http://127.0.0.1:1/v1", "--base-url", "http://127.0.0.1:2/v1",
        "--model", "m", "--backoff-base", "0.1", "--max-in-flight", "auto", "--timeout", "12",
        "--return-all-choices", "--max-num-pairs", "3", "--extra-body", '{"min_p": 0.05}',
        "--stop", "a", "--stop", "b", "--generation-seed", "7", "--seed", "2",
        "--no-keep-incomplete-documents"])
    llm = _llm_from_args(args)
    assert llm.base_url == ("http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1")
    assert (llm.backoff_base, llm.timeout, llm.return_all_choices) == (0.1, 12.0, True)
    assert llm.max_retries == LLMConfig.max_retries  # not given: the dataclass default
    assert _task_overrides(args) == {"max_num_pairs": 3, "extra_body": {"min_p": 0.05},
                                     "stop": ("a", "b"), "seed": 7,
                                     "keep_incomplete_documents": False}
    assert args.seed == 2  # the run's sampling seed stays its own option


def test_a_bad_value_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--input", "x", "--output", "y",
                                   "--extra-body", "[1, 2]"])
    assert "expected a JSON object" in capsys.readouterr().err
