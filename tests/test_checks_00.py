"""The exercise checks of notebook 00 reject wrong answers and accept the right ones."""

from __future__ import annotations

import pytest
import torch

from sft_helpers.checks import ExerciseError, check_parameter_count, check_t4_dtype


def test_parameter_count():
    model = torch.nn.Linear(3, 2)  # 6 weights + 2 biases
    check_parameter_count(model, 8)
    with pytest.raises(ExerciseError, match="numel"):
        check_parameter_count(model, 6)
    with pytest.raises(ExerciseError):
        check_parameter_count(model, 8.0)


def test_tied_weights_are_counted_once():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 2), torch.nn.Linear(2, 5, bias=False))
    model[1].weight = model[0].weight
    check_parameter_count(model, 10)
    with pytest.raises(ExerciseError):
        check_parameter_count(model, 20)


def test_t4_dtype():
    check_t4_dtype(torch.float16)
    for wrong in (torch.bfloat16, torch.float32, "float16"):
        with pytest.raises(ExerciseError, match="7.5"):
            check_t4_dtype(wrong)
