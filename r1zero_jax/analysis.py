"""The paper's response analyses: self-reflection keywords, and length of correct vs incorrect.

Keyword matching (`match="word"`, the default) is case-insensitive and word-bounded: a keyword
must start a word; a one-word keyword may end in an inflection (-s, -es, -d, -ed, -ing, or -ing
replacing a final e) and then the word must end. So "Rechecking" counts as "recheck",
"reevaluated" and "reevaluating" as "reevaluate", and "unrethinkable" counts nothing.
"reevaluate" is not part of "reevaluation" (...ate vs ...ation): each counts only its own words,
and "re-evaluation" matches neither "re-evaluate" nor "reevaluation". A hyphen is a word edge, so
"double-check again" counts "double-check" and "check again". Words of a phrase may be split by
any whitespace ("check\nagain"). `match="paper"` counts plain lower-case substrings as the
authors' `keyword_count.py` does (there "prerecheck" counts too), to reproduce their numbers.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from collections.abc import Sequence

SELF_REFLECTION_KEYWORDS = (
    "recheck", "rethink", "reassess", "reevaluate", "re-evaluate", "reevaluation",
    "re-examine", "reexamine", "reconsider", "reanalyze", "double-check", "check again",
    "think again", "verify again", "go over the steps",
)
MATCH_MODES = ("word", "paper")


def _word_pattern(keyword: str) -> re.Pattern:
    if " " in keyword:  # a phrase: exact words, any whitespace between them
        body = r"\s+".join(re.escape(w) for w in keyword.split())
    elif keyword.endswith("e"):
        body = f"(?:{re.escape(keyword)}[sd]?|{re.escape(keyword[:-1])}ing)"
    else:
        body = f"{re.escape(keyword)}(?:s|es|ed|ing)?"
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


_PATTERNS = {k: _word_pattern(k) for k in SELF_REFLECTION_KEYWORDS}


def keyword_counts(response: str, match: str = "word") -> dict[str, int]:
    """Occurrences of each of the 15 self-reflection keywords in `response`."""
    if match == "word":
        return {k: len(p.findall(response)) for k, p in _PATTERNS.items()}
    if match == "paper":
        text = response.lower()
        return {k: text.count(k) for k in SELF_REFLECTION_KEYWORDS}
    raise ValueError(f"unknown match mode {match!r}; choose one of {MATCH_MODES}")


def has_self_reflection(response: str, match: str = "word") -> bool:
    return any(keyword_counts(response, match).values())


@dataclasses.dataclass(frozen=True)
class SelfReflectionStats:
    num_questions: int
    num_responses: int
    questions_with_reflection: int  # questions with at least one reflecting response
    responses_with_reflection: int
    question_rate: float
    response_rate: float
    keyword_totals: dict[str, int]  # occurrences over all responses


def self_reflection(responses: Sequence[Sequence[str]], match: str = "word") -> SelfReflectionStats:
    """Keyword self-reflection per response and per question; `responses[q]` holds the sampled
    responses to question q."""
    totals = dict.fromkeys(SELF_REFLECTION_KEYWORDS, 0)
    n_resp = resp_sr = ques_sr = 0
    for group in responses:
        group_sr = False
        for response in group:
            counts = keyword_counts(response, match)
            for k, c in counts.items():
                totals[k] += c
            n_resp += 1
            if any(counts.values()):
                resp_sr += 1
                group_sr = True
        ques_sr += group_sr
    n_ques = len(responses)
    return SelfReflectionStats(
        num_questions=n_ques, num_responses=n_resp,
        questions_with_reflection=ques_sr, responses_with_reflection=resp_sr,
        question_rate=ques_sr / n_ques if n_ques else 0.0,
        response_rate=resp_sr / n_resp if n_resp else 0.0,
        keyword_totals=totals,
    )


@dataclasses.dataclass(frozen=True)
class LengthStats:
    """Response lengths (tokens, or whatever unit was given); None where a group is empty."""
    num_correct: int
    num_incorrect: int
    mean_correct: float | None
    mean_incorrect: float | None
    median_correct: float | None
    median_incorrect: float | None
    mean_all: float | None


def length_by_correctness(lengths: Sequence[int], correct: Sequence[bool]) -> LengthStats:
    """Mean and median response length of correct vs incorrect responses."""
    if len(lengths) != len(correct):
        raise ValueError(f"{len(lengths)} lengths but {len(correct)} correctness flags")
    good = [float(n) for n, c in zip(lengths, correct, strict=False) if c]
    bad = [float(n) for n, c in zip(lengths, correct, strict=False) if not c]

    def mean(xs):
        return statistics.fmean(xs) if xs else None

    def median(xs):
        return statistics.median(xs) if xs else None

    return LengthStats(
        num_correct=len(good), num_incorrect=len(bad),
        mean_correct=mean(good), mean_incorrect=mean(bad),
        median_correct=median(good), median_incorrect=median(bad),
        mean_all=mean(good + bad),
    )
