"""Self-reflection keywords and response length by correctness."""

import statistics

import pytest

from r1zero_jax.analysis import (SELF_REFLECTION_KEYWORDS, has_self_reflection, keyword_counts,
                                 length_by_correctness, self_reflection)


def test_the_papers_fifteen_keywords():
    assert len(SELF_REFLECTION_KEYWORDS) == len(set(SELF_REFLECTION_KEYWORDS)) == 15
    for k in SELF_REFLECTION_KEYWORDS:
        assert keyword_counts(k)[k] == 1
        assert keyword_counts(k.upper())[k] == 1


@pytest.mark.parametrize("text,expected", [
    ("Let me RECHECK. Rechecking... rechecked!", {"recheck": 3}),
    ("We should reevaluate; after reevaluation it holds.", {"reevaluate": 1, "reevaluation": 1}),
    ("I reevaluated and kept reevaluating; two reevaluations.",
     {"reevaluate": 2, "reevaluation": 1}),
    ("A re-evaluation is not re-evaluate's word; but re-evaluating is.", {"re-evaluate": 2}),
    ("unrethinkable prerecheck reconsiderations", {}),
    ("Let me double-check again.", {"double-check": 1, "check again": 1}),
    ("Let me check\nagain and THINK   again, then verify again.",
     {"check again": 1, "think again": 1, "verify again": 1}),
    ("Go over the steps: reexamine, re-examined, reassesses, reanalyzed, reconsidering, rethinks",
     {"go over the steps": 1, "reexamine": 1, "re-examine": 1, "reassess": 1, "reanalyze": 1,
      "reconsider": 1, "rethink": 1}),
    ("The answer is 42.", {}),
])
def test_word_matching(text, expected):
    got = keyword_counts(text)
    assert got == {k: expected.get(k, 0) for k in SELF_REFLECTION_KEYWORDS}
    assert has_self_reflection(text) == bool(expected)


def test_paper_mode_counts_substrings_like_the_authors_script():
    text = "Prerecheck, RETHINKING and reevaluated; reevaluating"
    got = keyword_counts(text, match="paper")
    assert got["recheck"] == 1 and got["rethink"] == 1 and got["reevaluate"] == 1
    assert sum(got.values()) == 3  # "reevaluating" holds no keyword as a substring
    assert keyword_counts(text)["recheck"] == 0  # word mode: "prerecheck" is another word
    with pytest.raises(ValueError, match="unknown match mode"):
        keyword_counts(text, match="fuzzy")


def test_self_reflection_per_response_and_per_question():
    responses = [
        ["Let me recheck: 4.", "It is 4.", "Rethink: 4. Recheck: 4."],  # 2 of 3 reflect
        ["It is 5.", "5."],                                               # none
        ["Wait, let me double-check. 6."],                                # 1 of 1
        [],                                                               # no samples
    ]
    stats = self_reflection(responses)
    assert (stats.num_questions, stats.num_responses) == (4, 6)
    assert (stats.responses_with_reflection, stats.questions_with_reflection) == (3, 2)
    assert stats.response_rate == pytest.approx(3 / 6)
    assert stats.question_rate == pytest.approx(2 / 4)
    assert stats.keyword_totals["recheck"] == 2 and stats.keyword_totals["double-check"] == 1
    assert sum(stats.keyword_totals.values()) == 4
    empty = self_reflection([])
    assert (empty.response_rate, empty.question_rate) == (0.0, 0.0)


def test_length_by_correctness_against_statistics():
    lengths = [120, 300, 80, 1000, 45, 3000, 210]
    correct = [True, False, True, False, True, False, True]
    stats = length_by_correctness(lengths, correct)
    good, bad = [120, 80, 45, 210], [300, 1000, 3000]
    assert (stats.num_correct, stats.num_incorrect) == (4, 3)
    assert stats.mean_correct == pytest.approx(sum(good) / 4)
    assert stats.mean_incorrect == pytest.approx(sum(bad) / 3)
    assert stats.median_correct == pytest.approx(statistics.median(good))  # even count: 100
    assert stats.median_incorrect == 1000
    assert stats.mean_all == pytest.approx(sum(lengths) / 7)


def test_length_by_correctness_edge_cases():
    stats = length_by_correctness([10, 20], [True, True])
    assert stats.mean_incorrect is None and stats.median_incorrect is None
    assert length_by_correctness([], []).mean_all is None
    with pytest.raises(ValueError, match="2 lengths but 1 correctness"):
        length_by_correctness([1, 2], [True])
