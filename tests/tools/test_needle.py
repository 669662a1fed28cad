"""Word matching shared by the head-scoring probes and eval-needle: the word split
and ROUGE-1 recall."""

import pytest

from headkv_vllm.tools.common.needle import rouge1_recall, words


@pytest.mark.parametrize("text, expected", [
    ("The Silver Heron.", ["the", "silver", "heron"]),  # case, a full stop
    ("Silver, heron! (silver?)", ["silver", "heron", "silver"]),  # punctuation and brackets
    ("  silver\n\theron  ", ["silver", "heron"]),  # any white space
    ("Grandma Rosa's soup", ["grandma", "rosa", "s", "soup"]),  # an apostrophe splits
    ("Rosa\u2019s", ["rosa", "s"]),  # so does a typographic one
    ("code 4729, born in 1985.", ["code", "4729", "born", "in", "1985"]),  # numbers are words
    ("4,729 and 3.5 and 2019-2023", ["4", "729", "and", "3", "5", "and", "2019", "2023"]),  # separators inside numbers split
    ("The_Silver_Heron", ["the_silver_heron"]),  # an underscore joins (the probes' rule the score files were made with)
    ("Café", ["café"]),  # letters beyond ASCII are letters
    ("", []),
])
def test_word_split(text, expected):
    assert words(text) == expected


def test_rouge1_recall_counts_reference_words_with_multiplicity():
    assert rouge1_recall("It is the SILVER heron.", "Silver Heron") == 1.0
    assert rouge1_recall("heron heron", "silver heron") == 0.5
    assert rouge1_recall("heron", "heron heron") == 0.5
    assert rouge1_recall("silver_heron", "silver heron") == 0.0
    assert rouge1_recall("anything", "") == 0.0
    assert rouge1_recall("", "silver heron") == 0.0
