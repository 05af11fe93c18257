"""The exercise checks of notebook 06 reject wrong answers and accept the right ones."""

from __future__ import annotations

import re

import pytest

from sft_helpers.checks import (
    ExerciseError,
    check_baseline_score,
    check_longest_shared_ngram,
    check_lsh_candidate_probability,
    check_multi_turn_share,
    check_opener_rule,
    check_precision_recall,
)
from sft_helpers.quality import SYCOPHANTIC

OPENERS = "(sure|certainly|what a great question|absolutely|of course)"


def turns(n_assistant: int) -> list[dict]:
    pair = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    return pair * n_assistant


def test_multi_turn_share():
    conversations = [turns(1), turns(2), turns(3), turns(1)]
    check_multi_turn_share(conversations, 0.5)
    for wrong in (0.25, 2.0, 50.0):
        with pytest.raises(ExerciseError, match="more than one"):
            check_multi_turn_share(conversations, wrong)


def test_baseline_score():
    example = {"instruction": "Capital of France?", "response": "Sure! Paris."}
    check_baseline_score(example, 0.2)
    for wrong in (0.7, 0.5, 0.0):
        with pytest.raises(ExerciseError, match="start at 1.0"):
            check_baseline_score(example, wrong)


def test_opener_rule_accepts_the_module_rule():
    check_opener_rule(lambda reply: SYCOPHANTIC.match(reply) is not None)


@pytest.mark.parametrize(
    ("rule", "hint"),
    [
        (lambda r: r.startswith(("Sure!", "Certainly!")), "'Certainly, here"),  # the baseline's
        (lambda r: bool(re.match(rf"(?i){OPENERS}", r)), "Surely"),  # not a whole word
        (lambda r: bool(re.search(rf"(?i)\b{OPENERS}\b", r)), "Sure enough"),  # not at the start
        (lambda r: bool(re.match(rf"(?i){OPENERS}\b", r)), "Of course water"),  # no punctuation
        (lambda r: 1, "returned 1"),  # not a bool
    ],
)
def test_opener_rule_rejects_wrong_rules(rule, hint):
    with pytest.raises(ExerciseError, match=re.escape(hint)):
        check_opener_rule(rule)


def test_lsh_candidate_probability():
    check_lsh_candidate_probability(1 - (1 - 0.5**4) ** 32, jaccard=0.5, rows=4, bands=32)
    with pytest.raises(ExerciseError, match="one band"):
        check_lsh_candidate_probability(0.5**4, jaccard=0.5, rows=4, bands=32)
    with pytest.raises(ExerciseError, match="no band matches"):
        check_lsh_candidate_probability(0.5, jaccard=0.5, rows=4, bands=32)


def test_longest_shared_ngram():
    a = "The boiling point of water is 100 degrees."
    b = "Is the boiling point of water high?"
    check_longest_shared_ngram(a, b, 5)
    for wrong in (4, 6, 5.0):
        with pytest.raises(ExerciseError, match="word_ngrams"):
            check_longest_shared_ngram(a, b, wrong)
    check_longest_shared_ngram("one two", "three four", 0)


def test_precision_recall():
    flagged = [True, True, True, False]
    labels = ["too_short", "too_short", "none", "too_short"]
    check_precision_recall(flagged, labels, "too_short", (2 / 3, 2 / 3))
    flagged = [True, True, False, False]
    check_precision_recall(flagged, labels, "too_short", (1.0, 2 / 3))
    with pytest.raises(ExerciseError, match="swapped"):
        check_precision_recall(flagged, labels, "too_short", (2 / 3, 1.0))
    with pytest.raises(ExerciseError, match="flagged AND labelled"):
        check_precision_recall(flagged, labels, "too_short", (0.5, 0.5))
    check_precision_recall([False] * 4, labels, "too_short", (None, 0.0))
