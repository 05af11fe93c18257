"""Notebook 04's exercise checks accept the right answer and reject wrong ones with a hint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sft_helpers.checks import (
    ExerciseError,
    check_energy_rank,
    check_lora_update,
    check_max_rank,
    check_qwen_lora_count,
    check_rslora_alpha,
    check_unmerged,
)
from sft_helpers.lora import LoRALinear


@pytest.fixture
def layer() -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), r=2, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    return layer


def test_lora_update(layer, capsys):
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    check_lora_update(layer, 4.0 * B @ A)
    assert "Correct" in capsys.readouterr().out
    for wrong, hint in [(B @ A, "scaling alpha / r"), (8.0 * B @ A, "not alpha"),
                        (A.T @ B.T, "not A @ B"), (-4.0 * B @ A, "alpha / r")]:
        with pytest.raises(ExerciseError, match=hint):
            check_lora_update(layer, wrong)


def test_qwen_lora_count(capsys):
    check_qwen_lora_count(2_523_136)
    assert "Correct" in capsys.readouterr().out
    for wrong, hint in [(90_112, "one decoder layer"), (28 * 2 * 8 * 7168, "grouped-query"),
                        (2_523_137, "r \\* \\(in \\+ out\\)")]:
        with pytest.raises(ExerciseError, match=hint):
            check_qwen_lora_count(wrong)


def test_max_rank(capsys):
    check_max_rank(30)
    assert "r = 30" in capsys.readouterr().out
    with pytest.raises(ExerciseError, match="a larger one does too"):
        check_max_rank(16)
    for wrong in (31, 32, 0, True, 30.0):
        with pytest.raises(ExerciseError, match="linearly"):
            check_max_rank(wrong)


def test_energy_rank(capsys):
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    # energies 16, 4, 1, 1, 1, 1 (total 24): 21 / 24 = 0.875 < 0.9 <= 22 / 24
    check_energy_rank(s, 4)
    assert "top 4 of 6" in capsys.readouterr().out
    with pytest.raises(ExerciseError, match="its square"):
        check_energy_rank(s, 5)  # counting sum(s) instead: 9 / 10 needs five values
    with pytest.raises(ExerciseError, match="cumulative"):
        check_energy_rank(s, 3)


def test_unmerged(layer, capsys):
    original = layer.base.weight.detach().clone()
    layer.merge()
    with pytest.raises(ExerciseError, match="still merged"):
        check_unmerged(layer, original)
    layer.unmerge()
    with pytest.raises(ExerciseError, match="keep a copy"):
        check_unmerged(layer, original + 1)
    check_unmerged(layer, original)
    assert "Correct" in capsys.readouterr().out
    untrained = LoRALinear(nn.Linear(6, 5), r=2, alpha=8)
    with pytest.raises(ExerciseError, match="non-zero"):
        check_unmerged(untrained, untrained.base.weight.detach().clone())


def test_rslora_alpha(capsys):
    check_rslora_alpha(16)
    assert "Correct" in capsys.readouterr().out
    with pytest.raises(ExerciseError, match="sqrt"):
        check_rslora_alpha(128)
    with pytest.raises(ExerciseError, match="sqrt\\(64\\)"):
        check_rslora_alpha(32)
