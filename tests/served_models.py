"""Tokenizers of "other" models for tests, built offline: a small byte-level BPE trained on the
fly (about twice as many tokens per text as Qwen2.5), saved as an HF folder with a chat template,
and the same vocabulary written into a GGUF file as llama.cpp stores it."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
                 "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def _corpus() -> list[str]:
    from nemocc_dask.recipe import prompts

    words = ("river delta birds wetlands filter water towns downstream season species the of and "
             "a to in is that for on with as by question answer text knowledge passage").split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(200)]
    return lines + [getattr(prompts, n) for n in dir(prompts) if n.isupper()]


def build_small_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
    """An HF tokenizer folder (tokenizer.json + tokenizer_config.json with a chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": CHAT_TEMPLATE}))
    return folder


def write_gguf(tokenizer_folder: Path, path: Path, weights: bool = False) -> Path:
    """A GGUF file whose embedded tokenizer is ``tokenizer_folder``'s BPE: no tensors, or with
    ``weights`` a tiny llama model of random weights that llama.cpp can serve (it answers
    random tokens of that vocabulary, fast on a CPU)."""
    import gguf

    model = json.loads((tokenizer_folder / "tokenizer.json").read_text())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    writer = gguf.GGUFWriter(str(path), "llama")
    if weights:
        _add_tiny_llama(writer, len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tiny_llama(writer, n_vocab: int, n_embd: int = 64, n_layers: int = 2, n_head: int = 4,
                    n_ff: int = 128, context: int = 8192) -> None:
    """The hyperparameters and random f32 tensors of a small llama (names as llama.cpp reads
    them; numpy shapes are (out, in))."""
    import numpy as np

    rng = np.random.default_rng(0)
    writer.add_context_length(context)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(0)  # all f32

    def add(name: str, *shape: int) -> None:
        values = np.ones(shape) if len(shape) == 1 else rng.normal(0, 0.5, shape)
        writer.add_tensor(name, values.astype(np.float32))

    add("token_embd.weight", n_vocab, n_embd)
    add("output_norm.weight", n_embd)
    add("output.weight", n_vocab, n_embd)
    for i in range(n_layers):
        for part in ("attn_norm", "ffn_norm"):
            add(f"blk.{i}.{part}.weight", n_embd)
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(f"blk.{i}.{part}.weight", n_embd, n_embd)
        add(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        add(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        add(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
