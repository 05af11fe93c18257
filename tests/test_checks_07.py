"""The exercise checks of notebook 07 reject wrong answers and accept the right ones."""

from __future__ import annotations

import pandas as pd
import pytest

from sft_helpers.checks import (
    ExerciseError,
    check_debiased_preference,
    check_greedy_distinct,
    check_never_stops,
    check_prompt_level,
    check_rouge_l,
    check_stop_rate,
)

RESULTS = [{"stop_reason": "eos"}, {"stop_reason": "max_new_tokens"}, {"stop_reason": "eos"}]


def test_stop_rate():
    check_stop_rate(RESULTS, 2 / 3)
    for wrong in (1 / 3, 2, "2/3"):
        with pytest.raises(ExerciseError, match="stop_reason"):
            check_stop_rate(RESULTS, wrong)


def test_rouge_l():
    # LCS "a c" = 2 words: P = 2/3, R = 1, F1 = 0.8.
    check_rouge_l("a b c", "a c", 0.8)
    for wrong in (2 / 3, 1.0, 2):
        with pytest.raises(ExerciseError, match="longest common subsequence"):
            check_rouge_l("a b c", "a c", wrong)


def test_never_stops():
    table = pd.DataFrame({"stop rate": [0.75, 0.0, 0.9]}, index=["base", "pad == eos", "course"])
    check_never_stops(table, "pad == eos")
    for wrong in ("base", "course", 0.0):
        with pytest.raises(ExerciseError, match="EOS label"):
            check_never_stops(table, wrong)


def test_greedy_distinct():
    check_greedy_distinct(1)
    for wrong in (3, 0):
        with pytest.raises(ExerciseError, match="seed"):
            check_greedy_distinct(wrong)


def test_debiased_preference():
    # First-slot bias: 0.9 with A first, 0.7 with B first -> P(A better) = (0.9 + 0.3) / 2.
    check_debiased_preference(0.9, 0.7, 0.6)
    for wrong in (0.8, 0.9, 0.5):
        with pytest.raises(ExerciseError, match="1 - p_b_first"):
            check_debiased_preference(0.9, 0.7, wrong)


def test_prompt_level():
    rows = [{"instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
             "kwargs": [{}, {}]},
            {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}]
    replies = ['"Yes, gladly."', "Fine."]  # 1 of 2 instructions, then 1 of 1
    check_prompt_level(rows, replies, 0.5)
    with pytest.raises(ExerciseError, match="instruction level"):
        check_prompt_level(rows, replies, 2 / 3)
    for wrong in (1.0, 0.0, "0.5"):
        with pytest.raises(ExerciseError, match="counts when all of them"):
            check_prompt_level(rows, replies, wrong)
