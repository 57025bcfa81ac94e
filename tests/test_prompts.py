import re
from pathlib import Path

import pytest

from nemocc_dask import prompts

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


@pytest.mark.parametrize("name", NAMES)
def test_prompt_is_verbatim(name):
    assert len(getattr(prompts, name)) == LENGTHS[name]
    if not REFERENCE.exists():
        pytest.skip(f"reference text not available at {REFERENCE}")
    text = REFERENCE.read_text()
    match = re.search(rf"\*\*{name}\*\* \(VERBATIM PROMPT TEXT; \d+ chars\):\n```text\n(.*?)\n```",
                      text, re.S)
    assert match, name
    assert getattr(prompts, name) == match.group(1)


@pytest.mark.parametrize("name", [n for n in NAMES if "TEMPLATE" in n])
def test_templates_have_one_document_placeholder(name):
    template = getattr(prompts, name)
    assert template.count("{document}") == 1
    assert template.format(document="X").count("X") >= 1
