"""Find the tokenizer of the model an endpoint serves, so token counts are the server's own.

Used when the user names no tokenizer (``--tokenizer``). In order:

1. The server's ``/tokenize`` route (vLLM: ``{"prompt"}`` / ``{"messages"}`` -> ``count``;
   llama.cpp: ``{"content"}`` -> ``tokens``), on the endpoint's root (``base_url`` without
   ``/v1``). Local candidates (below, plus the bundled default) are checked against it on a set
   of probe texts; the first whose counts agree is used (fast, in process). When none agrees, the
   route itself counts every text (``ServedTokenizer``: exact, one HTTP call per distinct text).
2. Without a route: the model name as a local folder, ``tokenizer.json`` or ``.gguf`` file (vLLM
   and llama.cpp name a model by its path by default), else the name in the local Hugging Face
   cache. Not verified: nothing to compare with.
3. Else the bundled default, with one warning naming the model and ``--tokenizer`` (quietly when
   the model name says Qwen, whose BPE the default is).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from nemocc_dask.config import setting
from nemocc_dask.errors import ConfigError
from nemocc_dask.llm.config import LLMConfig, server_root
from nemocc_dask.recipe import prompts
from nemocc_dask.recipe.tokenizer import count_tokens_list, load_tokenizer, tokenizer_name

logger = logging.getLogger(__name__)

PROBE_TEXTS = (
    "Hello world",
    "The quick brown fox jumps over the lazy dog, twice: 12,345.67 times!",
    "  Leading spaces,\ttabs\nand new lines\n\n  end  ",
    "Über die Brücke gingen 3 Männer; naïve café owners said “bonjour”.",
    "数据处理 — データ処理 — 데이터 처리 🚀✨",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # code",
    "https://example.com/path?q=1&r=two#frag user@example.org",
) + tuple(getattr(prompts, name) for name in dir(prompts) if name.endswith("_TEMPLATE"))
TOKENIZE_TIMEOUT = 30.0
TOKENIZE_THREADS = 16
TOKENIZE_ATTEMPTS = 3
TEXTS_PER_DOCUMENT = 7  # counts per document in preprocessing (document, segments, prompts)
FORCE = "served"  # --tokenizer served: count through the route whatever it costs


class ServedCountingTooSlow(ConfigError):
    """Counting every text through the server would take longer than
    ``nemocc.served-counting-limit-seconds``; the message has the measured cost and the fixes."""


def _post_json(url: str, body: dict, api_key: str | None, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


@dataclass(frozen=True)
class ServedTokenizer:
    """Counts tokens with a server's ``/tokenize`` route (picklable: each worker calls the server
    itself). Offers what the stages use of a tokenizer: ``count_texts``, ``encode`` and, for the
    prompt overhead, ``apply_chat_template``."""

    root: str
    model: str
    flavour: str  # "vllm" or "llamacpp"
    api_key: str | None = field(default=None, repr=False, compare=False)

    @property
    def name_or_path(self) -> str:
        return f"{self.model} (the server's /tokenize)"

    chat_template = "the server's"  # the server applies the model's own template

    def _call(self, path: str, body: dict) -> dict:
        for attempt in range(TOKENIZE_ATTEMPTS):
            try:
                return _post_json(self.root + path, body, self.api_key, TOKENIZE_TIMEOUT)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                if attempt == TOKENIZE_ATTEMPTS - 1:
                    raise RuntimeError(f"{self.root}{path} failed ({exc}); the run counts tokens "
                                       "with it. Pass --tokenizer to count locally") from None
                time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _count(self, text: str, add_special_tokens: bool) -> int:
        if self.flavour == "vllm":
            return int(self._call("/tokenize", {"model": self.model, "prompt": text,
                                                "add_special_tokens": add_special_tokens})["count"])
        return len(self._call("/tokenize", {"content": text,
                                            "add_special": add_special_tokens})["tokens"])

    def count_texts(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[int]:
        """Token counts of ``texts``, several requests at once."""
        if len(texts) <= 1:
            return [self._count(t, add_special_tokens) for t in texts]
        with ThreadPoolExecutor(min(TOKENIZE_THREADS, len(texts))) as threads:
            return list(threads.map(lambda t: self._count(t, add_special_tokens), texts))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Only the length is meaningful: a list of that many zeros."""
        return [0] * self._count(text, add_special_tokens)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = True,
                            add_generation_prompt: bool = True, return_dict: bool = False):
        """The prompt's tokens with the model's chat template (only the length is meaningful)."""
        if self.flavour == "vllm":
            count = int(self._call("/tokenize", {"model": self.model, "messages": messages,
                                                 "add_generation_prompt": add_generation_prompt,
                                                 "add_special_tokens": False})["count"])
        else:
            prompt = self._call("/apply-template", {"messages": messages})["prompt"]
            count = len(self._call("/tokenize", {"content": prompt, "add_special": False,
                                                 "parse_special": True})["tokens"])
        return [0] * count


def _check_counting_cost(model: str, root: str, per_text: float, documents: int | None,
                         force: bool) -> None:
    """Warn with the measured cost of counting through ``root``/tokenize; refuse (unless
    ``force``) when the projection over ``documents`` passes the limit."""
    texts = (documents or 0) * TEXTS_PER_DOCUMENT
    projected = texts * per_text
    cost = f"measured {per_text * 1000:.1f} ms per text"
    if documents:
        cost += (f"; about {texts:,} texts for {documents:,} documents, ~{projected / 60:.0f} "
                 "min of counting")
    fix = "Pass --tokenizer (the model's folder, tokenizer.json or .gguf) to count locally"
    if projected > setting("served-counting-limit-seconds") and not force:
        raise ServedCountingTooSlow(
            f"no local tokenizer counts as model {model!r} does, and counting every text "
            f"through the inference server ({root}/tokenize) would dominate the run ({cost}). "
            f"{fix}, or --tokenizer {FORCE} to count through the server anyway")
    logger.warning("no local tokenizer counts as model %r does: every text is counted through "
                   "the inference server (%s/tokenize, one request per distinct text: %s; "
                   "preprocessing several times slower, and load on the server). %s", model,
                   root, cost, fix)


def find_tokenize_route(llm: LLMConfig) -> ServedTokenizer | None:
    """The first endpoint's ``/tokenize`` route that answers in the vLLM or llama.cpp shape."""
    for url in llm.base_url:
        root = server_root(url)
        for flavour, body, answered in (
                ("vllm", {"model": llm.model, "prompt": "Hello world"},
                 lambda a: isinstance(a.get("count"), int)),
                ("llamacpp", {"content": "Hello world"},
                 lambda a: isinstance(a.get("tokens"), list) and bool(a["tokens"]))):
            try:
                answer = _post_json(root + "/tokenize", body, llm.api_key, 10.0)
            except (urllib.error.URLError, OSError, ValueError):
                continue
            if isinstance(answer, dict) and answered(answer):
                return ServedTokenizer(root, llm.model, flavour, llm.api_key)
    return None


def _local_specs(model: str) -> list[str]:
    """Local places a tokenizer for ``model`` may be: its path, else its name in the HF cache."""
    path = Path(model).expanduser()
    if path.is_dir() or path.is_file():
        return [str(path)]
    name = model.split(":")[0]
    if name.count("/") == 1 and not name.startswith(("/", ".", "~")):
        return [name]  # org/name: looked up in the local Hugging Face cache only
    return []


def _loadable(spec: str | None) -> bool:
    try:
        load_tokenizer(spec)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means: not this one
        logger.debug("tokenizer candidate %s: %s", spec, exc)
        return False


def find_served_tokenizer(llm: LLMConfig, documents: int | None = None,
                          force: bool = False) -> Any:
    """The tokenizer spec for ``llm``'s model (see the module docstring): a local spec (str),
    a ``ServedTokenizer``, or None (the bundled default). Counting through the route is said at
    WARNING with its cost measured on the probe texts and projected over ``documents``;
    ServedCountingTooSlow when that is over ``nemocc.served-counting-limit-seconds``, unless
    ``force``."""
    if not llm.model:  # a custom client that names no model
        return None
    local = [spec for spec in _local_specs(llm.model) if _loadable(spec)]
    route = find_tokenize_route(llm) if llm.client_factory is None else None
    if route is not None:
        started = time.perf_counter()
        served = route.count_texts(PROBE_TEXTS)  # asked once, compared with every candidate
        per_text = (time.perf_counter() - started) / len(PROBE_TEXTS)
        for spec in local + [None]:
            if count_tokens_list(load_tokenizer(spec), list(PROBE_TEXTS)) == served:
                logger.info("tokenizer %s matches the server's /tokenize for model %r",
                            tokenizer_name(spec), llm.model)
                return spec
        _check_counting_cost(llm.model, route.root, per_text, documents, force)
        return route
    if local:
        logger.info("tokenizer for model %r: %s (found locally; the server has no /tokenize "
                    "route to check it against)", llm.model, local[0])
        return local[0]
    if "qwen" not in llm.model.lower():
        logger.warning("no tokenizer found for model %r (the server has no /tokenize route, and "
                       "the name is no local folder or file nor in the Hugging Face cache): token "
                       "counts use the bundled Qwen2.5 tokenizer and may differ from the model's. "
                       "Pass --tokenizer (a folder, tokenizer.json, .gguf or cached HF name)",
                       llm.model)
    return None

