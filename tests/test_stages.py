"""Unit and property tests of every stage, with the reference's edge cases.

Stage tests run over the backends available: pandas always, cuDF where it and a GPU exist.
"""

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemocc_dask.io.gpu import gpu_available
from nemocc_dask.recipe.stages import (count_tokens, filter_range, format_diverse_qa,
                                       format_knowledge_list, has_prefix, join_segments,
                                       remove_lines, remove_markdown, remove_quotations,
                                       slice_after, split_documents)
from nemocc_dask.recipe.stages.diverse_qa import parse_qa_pairs

BACKENDS = [
    "pandas",
    pytest.param("cudf", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not gpu_available(), reason="cuDF with a CUDA device is not available on this machine")]),
]


@pytest.fixture(params=BACKENDS)
def frame(request):
    def make(data):
        df = pd.DataFrame(data)
        if request.param == "cudf":
            import cudf

            return cudf.DataFrame.from_pandas(df)
        return df
    return make


def host(df):
    return df.to_pandas() if hasattr(df, "to_pandas") and not isinstance(df, pd.DataFrame) else df


def strings(s):
    return list(pd.Series(host(s)).astype(object).where(pd.Series(host(s)).notna(), None))


# -- split / join ------------------------------------------------------------------------------
def test_split_keeps_empty_pieces(frame):
    out = host(split_documents(frame({"id": [1, 2], "text": ["A\n\nB", "C"], "x": [7, 8]})))
    assert list(out["text"]) == ["A", "", "B", "C"]
    assert list(out["segment_id"]) == [0, 1, 2, 0]
    assert list(out["x"]) == [7, 7, 7, 8]


def test_split_is_literal_not_regex(frame):
    out = host(split_documents(frame({"id": [1], "text": ["a.b.c"]}), separator="."))
    assert list(out["text"]) == ["a", "b", "c"]
    out = host(split_documents(frame({"id": [1], "text": ["A\n\n\n\nB"]}), separator="\n\n"))
    assert list(out["text"]) == ["A", "", "B"]


def test_greedy_join_reference_example(frame):
    df = frame({"id": [1, 1, 1], "segment_id": [0, 1, 2], "text": ["big", "b", "c"],
                "len": [30, 2, 3]})
    out = host(join_segments(df, max_length=20, length_field="len"))
    assert list(out["text"]) == ["big", "b\nc"]
    assert list(out["len"]) == [30, 6]
    assert list(out["segment_id"]) == [0, 1]


def test_join_boundary_is_inclusive(frame):
    df = frame({"id": [1, 1], "segment_id": [0, 1], "text": ["a", "b"], "len": [4, 5]})
    assert list(host(join_segments(df, max_length=10, length_field="len"))["text"]) == ["a\nb"]
    assert len(join_segments(df, max_length=9, length_field="len")) == 2


def test_join_validation():
    df = pd.DataFrame({"id": [1], "segment_id": [0], "text": ["a"]})
    with pytest.raises(ValueError, match="max_length is specified but length_field is not"):
        join_segments(df, max_length=3)
    with pytest.raises(ValueError, match="length_field is specified but max_length is not"):
        join_segments(df, length_field="len")


def test_full_rejoin_sorts_segments_and_keeps_first_row(frame):
    df = frame({"id": [2, 1, 1, 2], "segment_id": [1, 1, 0, 0], "text": ["d", "b", "a", "c"],
                "k": [20, 11, 10, 21]})
    out = host(join_segments(df))
    assert list(out["id"]) == [1, 2]
    assert list(out["text"]) == ["a\nb", "c\nd"]
    assert list(out["k"]) == [10, 21]
    assert list(out["segment_id"]) == [0, 0]
    assert "segment_id" not in join_segments(df, drop_segment_id_field=True).columns


def test_count_and_filter(frame, tokenizer):
    df = frame({"id": [1, 2, 3], "text": ["one two three", None, "x"]})
    out = host(count_tokens(df, tokenizer, "text", "n"))
    assert list(out["n"]) == [len(tokenizer.encode("one two three")), 0, 1]
    kept = host(filter_range(count_tokens(df, tokenizer, "text", "n"), "n", 1, 1))
    assert list(kept["id"]) == [3]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab \n", max_size=30), min_size=1, max_size=6))
def test_property_split_then_full_join_is_identity(texts):
    df = pd.DataFrame({"id": range(len(texts)), "text": texts})
    out = join_segments(split_documents(df))
    assert list(out["text"]) == texts


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=15), st.integers(5, 60))
def test_property_greedy_join_respects_max_length(lengths, max_length):
    df = pd.DataFrame({"id": 1, "segment_id": range(len(lengths)),
                       "text": [f"s{i}" for i in range(len(lengths))], "len": lengths})
    out = join_segments(df, max_length=max_length, length_field="len")
    for text, total in zip(out["text"], out["len"]):
        members = text.split("\n")
        assert total <= max_length or len(members) == 1
    assert "\n".join(out["text"]) == "\n".join(df["text"])  # order and content preserved


# -- text cleanups -----------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("**bold** and *italic* and _under_", "bold and italic and under"),
    ("see [the docs](http://x.org)", "see http://x.org"),  # reference: links keep their URL
    ("**Question:** why?", "Question: why?"),
    ("snake_case_var", "snake_case_var"),  # decision 6: fixed, the reference gives snakecasevar
    ("__init__", "__init__"),
    ("2*3*4", "2*3*4"),
    ("file_name.py", "file_name.py"),
    ("# Heading\n- item", "# Heading\n- item"),  # headings and bullets untouched, as reference
    ("**a\nb**", "**a\nb**"),  # markers never span lines
    # decision 6's exception: a closing marker after punctuation glued to the next word
    ("**Question:**What is X? **Answer:**Y.", "Question:What is X? Answer:Y."),
    ("*Question:*What? _Answer:_Yes.", "Question:What? Answer:Yes."),
    ("a * b * c", "a * b * c"),
    ("void *mmap(void *addr)", "void *mmap(void *addr)"),
    ("10**n and 2**k", "10**n and 2**k"),
    # nested emphasis (decision 6): innermost pairs first, a wrapped line unwrapped
    ("**a **b** c.**", "a b c."),
    ("**This **routine** is employed by the specification.**",
     "This routine is employed by the specification."),
    ("**see **[x](u) c.**", "see u c."),
    ("**bold** and **more**", "bold and more"),
    ("*a *b* c*", "a b c"),
    ("**a** 10**n **b**", "a 10**n b"),
])
def test_remove_markdown(frame, text, expected):
    df = frame({"t": [text]})
    assert strings(remove_markdown(df["t"])) == [expected]


@pytest.mark.parametrize("text, expected", [
    ('"quoted"', "quoted"),
    ('""', '""'),  # stripped length must be > 2
    ('"a"', "a"),
    (' "spaced"', ' "spaced"'),
    ('"line one\nline two"', "line one\nline two"),
    ('"line one"\n"line two"', '"line one"\n"line two"'),  # first line ends with a quote
])
def test_remove_quotations(frame, text, expected):
    assert strings(remove_quotations(frame({"t": [text]})["t"])) == [expected]


def test_prefix_and_slice(frame):
    s = frame({"t": ["P: body ", "no prefix", " P: lead", None]})["t"]
    assert list(host(has_prefix(s, "P:"))) == [True, False, False, False]
    assert strings(slice_after(s, "P:")) == ["body", "", "lead", None]


def test_remove_lines_exact_match(frame):
    s = frame({"t": ["Passage 1:\ntext\nPassage 2: \nmore"]})["t"]
    assert strings(remove_lines(s, ["Passage 1:", "Passage 2:"])) == ["text\nPassage 2: \nmore"]


@pytest.mark.parametrize("text, expected", [
    ("Here is the list:\n- one\n- two", "one\ntwo"),
    ("- first\n  - nested\n   - deeper", "first\n- nested\n- deeper"),
    ("-x\n* star\n1. num", "-x\n* star\n1. num"),
    ("only one line", ""),
])
def test_format_knowledge_list(frame, text, expected):
    assert strings(format_knowledge_list(frame({"t": [text]})["t"])) == [expected]


# -- diverse QA --------------------------------------------------------------------------------
QA = ("Here are the questions and answers based on the provided text:\n"
      "- Question: A? Answer: a.\n- Question: B? Answer: b.\n- Question: C?\nAnswer: c.")


def test_parse_qa_pairs_rules():
    assert parse_qa_pairs(QA) == ["Question: A? Answer: a.", "Question: B? Answer: b.",
                                  "Question: C?\nAnswer: c."]
    assert parse_qa_pairs("Sure! here you go\n- Question: A? Answer: a.") == []
    assert parse_qa_pairs("-Question: A?") == []


def test_format_diverse_qa_deterministic_and_bounded(frame):
    df = frame({"id": [1, 2, 3], "segment_id": [0, 0, 1], "text": ["seg one", "seg two", "x"],
                "diverse_qa": [QA, QA, "preamble\n- Question: A?"]})
    out1 = strings(format_diverse_qa(df, seed=3)["diverse_qa"])
    out2 = strings(format_diverse_qa(df, seed=3)["diverse_qa"])
    assert out1 == out2
    assert out1[0].startswith("seg one\n\nQuestion:") and out1[2] == ""
    assert 1 <= out1[0].count("Question:") <= 3


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 10_000), st.integers(1, 10))
def test_property_diverse_qa_pairs_between_1_and_max(n_pairs, seed, max_pairs):
    response = "\n".join(f"- Question: q{i}? Answer: a{i}." for i in range(n_pairs))
    df = pd.DataFrame({"id": [seed], "segment_id": [0], "text": ["the segment"],
                       "diverse_qa": [response]})
    out = format_diverse_qa(df, max_num_pairs=max_pairs, seed=seed)["diverse_qa"].iloc[0]
    assert out.startswith("the segment\n\n")
    assert 1 <= out.count("Question:") <= min(max_pairs, n_pairs)


def test_diverse_qa_same_output_on_1_or_3_partitions():
    import dask.dataframe as dd

    df = pd.DataFrame({"id": range(12), "segment_id": 0, "text": [f"t{i}" for i in range(12)],
                       "diverse_qa": [QA] * 12})
    one = dd.from_pandas(df, npartitions=1).map_partitions(format_diverse_qa, seed=5).compute()
    three = dd.from_pandas(df, npartitions=3).map_partitions(format_diverse_qa, seed=5).compute()
    assert list(one["diverse_qa"]) == list(three["diverse_qa"])


def test_route_partition_threshold_and_invalid_quality(frame):
    from nemocc_dask.recipe.stages.route import Route, route_partition

    df = frame({"id": [1, 2, 3, 4, 5], "q": ["12", "11", None, "high", "3.5"]})
    high, invalid = route_partition(df, Route("q", 11, high=True))
    low, _ = route_partition(df, Route("q", 11, high=False))
    assert host(high)["id"].tolist() == [1] and invalid == 2
    assert host(low)["id"].tolist() == [2, 5]
    kept, invalid = route_partition(df, None)
    assert kept is df and invalid == 0


def test_join_sums_skip_missing_counts():
    import pandas as pd

    from nemocc_dask.recipe.stages.segments import join_segments

    df = pd.DataFrame({"id": [1, 1], "segment_id": [0, 1], "text": ["a", "b"],
                       "tokens": pd.Series([3, None], dtype="Int64")})
    out = join_segments(df, "text", sum_fields=("tokens",), count_field="n")
    assert out.loc[0, "tokens"] == 3 and out.loc[0, "n"] == 2 and out.loc[0, "text"] == "a\nb"


def test_diverse_qa_keeps_answers_with_bold_labels_glued_to_the_text(tokenizer):
    """Decision 6: `**Question:**What ...` (label bold, no space after it) is a valid pair."""
    from nemocc_dask.recipe.presets import PRESETS, QA_PREFIX
    from nemocc_dask.recipe.stages.postprocess import postprocess_partition

    answer = (f"{QA_PREFIX}\n**Question:**What does the delta support? "
              "**Answer:**Many species of birds.\n**Question:**What do wetlands do? "
              "**Answer:**They filter water.")
    df = pd.DataFrame({"id": [1], "segment_id": [0], "text": ["The river delta supports birds. " * 30],
                       "diverse_qa": [answer], "llm_error": [None], "llm_finish_reason": ["stop"]})
    kept, rejects = postprocess_partition(df, PRESETS["diverse_qa"], return_rejects=True)
    assert len(rejects) == 0 and len(kept) == 1
    out = kept["diverse_qa"].iloc[0]
    assert "Question:What does the delta support?" in out or "Question:What do wetlands" in out
    assert "**" not in out
