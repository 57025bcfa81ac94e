import hashlib
import re
from pathlib import Path

import pytest

from nemocc_dask.recipe import prompts

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "nemotron_cc_reference.md"
NAMES = ["NEMOTRON_CC_SYSTEM_PROMPT", "NEMOTRON_CC_DISTILL_SYSTEM_PROMPT",
         "WIKIPEDIA_REPHRASING_PROMPT_TEMPLATE", "DIVERSE_QA_PROMPT_TEMPLATE",
         "DISTILL_PROMPT_TEMPLATE", "EXTRACT_KNOWLEDGE_PROMPT_TEMPLATE",
         "KNOWLEDGE_LIST_PROMPT_TEMPLATE"]
# Lengths stated by the reference next to each verbatim block.
LENGTHS = {"NEMOTRON_CC_SYSTEM_PROMPT": 147, "NEMOTRON_CC_DISTILL_SYSTEM_PROMPT": 147,
           "WIKIPEDIA_REPHRASING_PROMPT_TEMPLATE": 225, "DIVERSE_QA_PROMPT_TEMPLATE": 1511,
           "DISTILL_PROMPT_TEMPLATE": 915, "EXTRACT_KNOWLEDGE_PROMPT_TEMPLATE": 905,
           "KNOWLEDGE_LIST_PROMPT_TEMPLATE": 589}

# sha256 of each verbatim block of the reference, taken from the reference document with the
# regex below (2026-11-21), so the check runs where the reference is not beside the checkout.
DIGESTS = {
    "NEMOTRON_CC_SYSTEM_PROMPT": "042c0a111392840ad0f8af69c488c01f72b9fbfd2819fb85b4c1adb540b94112",
    "NEMOTRON_CC_DISTILL_SYSTEM_PROMPT":
        "12fd9e413dd0e4a8cbe4ad1d09e104ba25fd371b222d0d1e0b8a32bde81ac2b1",
    "WIKIPEDIA_REPHRASING_PROMPT_TEMPLATE":
        "5f60579adbead5c95ccd2a47a8f4ee316873f7b2252a586f1a8923f7fcf5758d",
    "DIVERSE_QA_PROMPT_TEMPLATE": "a3fa9d87c45c55c9a3cf3ea0e9afd57250196c2f5f15d8013588ffabe6f19c2f",
    "DISTILL_PROMPT_TEMPLATE": "96b4e8e68dc7cbed69ee5ed2fe5464689d5bec6eed2a245c2727ddadab6422e6",
    "EXTRACT_KNOWLEDGE_PROMPT_TEMPLATE":
        "1468fd30d445d739655f2d0c0df8232b88109a9a01f1ce3fd5f9fe83e76e5b6a",
    "KNOWLEDGE_LIST_PROMPT_TEMPLATE":
        "c064f54fb74a6f308e83985a698defb391e0545243da6351e074d017e4627f41",
}


def _reference_block(name: str) -> str:
    text = REFERENCE.read_text()
    match = re.search(rf"\*\*{name}\*\* \(VERBATIM PROMPT TEXT; \d+ chars\):\n```text\n(.*?)\n```",
                      text, re.S)
    assert match, name
    return match.group(1)


@pytest.mark.parametrize("name", NAMES)
def test_prompt_is_verbatim(name):
    prompt = getattr(prompts, name)
    assert len(prompt) == LENGTHS[name]
    assert hashlib.sha256(prompt.encode()).hexdigest() == DIGESTS[name]


@pytest.mark.parametrize("name", NAMES)
def test_digests_match_the_reference_document(name):
    if not REFERENCE.exists():
        pytest.skip(f"reference text not available at {REFERENCE}")
    assert hashlib.sha256(_reference_block(name).encode()).hexdigest() == DIGESTS[name]


@pytest.mark.parametrize("name", [n for n in NAMES if "TEMPLATE" in n])
def test_templates_have_one_document_placeholder(name):
    template = getattr(prompts, name)
    assert template.count("{document}") == 1
    assert template.format(document="X").count("X") >= 1
