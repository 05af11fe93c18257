"""Notebook 05's exercise checks accept the right answer and reject wrong ones with a hint."""

from __future__ import annotations

import pytest
import torch

from sft_helpers.checks import (
    ExerciseError,
    check_constants_bits,
    check_longest_sequence,
    check_nf4_codes,
    check_nf4_levels,
    check_trainable_count,
)
from sft_helpers.quant import NF4_OFFSET, nf4_code


def test_nf4_levels_right(capsys):
    check_nf4_levels(nf4_code())
    assert "Correct" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("levels", "hint"),
    [
        (torch.linspace(-1, 1, 15), "16 levels"),
        (nf4_code().flip(0), "sort"),
        (-nf4_code().flip(0), "asymmetric"),  # mirrored: 8 negative levels, 7 positive
        (torch.special.ndtri(torch.linspace(1 - NF4_OFFSET, NF4_OFFSET, 16)), "ndtri"),
    ],
    ids=["fifteen", "unsorted", "mirrored", "not-normalized"],
)
def test_nf4_levels_wrong(levels, hint):
    with pytest.raises(ExerciseError, match=hint):
        check_nf4_levels(levels)


def test_nf4_codes():
    block = torch.tensor([0.8, -0.1, 0.05, -1.6])
    check_nf4_codes(block, [12, 6, 7, 0])
    with pytest.raises(ExerciseError, match="absmax"):
        check_nf4_codes(block, [15, 6, 7, 0])  # scaled by the max (0.8), not the absmax


def test_constants_bits():
    check_constants_bits(8 / 64 + 32 / (64 * 256))
    with pytest.raises(ExerciseError, match="without double quantization"):
        check_constants_bits(0.5)
    with pytest.raises(ExerciseError, match="float32 scale"):
        check_constants_bits(0.125)


def test_longest_sequence():
    check_longest_sequence(3072)
    for wrong in (2048, 4096):
        with pytest.raises(ExerciseError, match="loop seq_len"):
            check_longest_sequence(wrong)


def test_trainable_count():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    check_trainable_count(model, 8)
    with pytest.raises(ExerciseError, match="requires_grad"):
        check_trainable_count(model, 23)


def test_check_token_route_ratio_accepts_the_ratio_and_explains_a_wrong_one():
    from transformers import LlamaConfig

    from sft_helpers.checks import check_token_route_ratio

    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=2,
                         vocab_size=1000)
    check_token_route_ratio(config, 4, 250)
    with pytest.raises(AssertionError, match="divide the two counts"):
        check_token_route_ratio(config, 4, 1000 * 8)
