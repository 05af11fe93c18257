"""Checks for the notebooks' "Check your understanding" exercises.

Each `check_*` function takes the learner's answer, prints a short confirmation when it is
right, and raises `ExerciseError` with a hint when it is wrong, so a wrong answer can never
pass silently. Sections below follow the notebooks' order.
"""

from __future__ import annotations

import torch


class ExerciseError(AssertionError):
    """A wrong answer to an exercise; the message says what to look at again."""


def _verdict(ok: bool, hint: str, praise: str) -> None:
    if not ok:
        raise ExerciseError(f"Not yet. Hint: {hint}")
    print(f"Correct: {praise}")


# --- 00_setup ----------------------------------------------------------------------------


def check_parameter_count(model: torch.nn.Module, answer: int) -> None:
    """Exercise 00.1: the number of parameters of `model`, counted by the learner."""
    expected = sum(p.numel() for p in model.parameters())
    _verdict(
        isinstance(answer, int) and answer == expected,
        "add up p.numel() over model.parameters(); a tied embedding is counted once.",
        f"{expected:,} parameters.",
    )


def check_t4_dtype(answer: torch.dtype) -> None:
    """Exercise 00.2: the dtype the course picks on a T4 GPU (compute capability 7.5)."""
    _verdict(
        answer == torch.float16,
        "a T4 has compute capability 7.5; native bfloat16 needs 8.0 (Ampere) or newer.",
        "float16: the T4 has no native bfloat16, so fp16 (with loss scaling) it is.",
    )
