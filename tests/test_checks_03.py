"""Notebook 03's exercise checks accept the right answer and reject wrong ones with a hint."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from torch import nn

from sft_helpers.checks import (
    ExerciseError,
    check_adam_state_bytes,
    check_api_renames,
    check_compliance_rate,
    check_merged_weight,
    check_padding_fraction,
    check_pip_reply,
    check_steps_per_epoch,
    check_trained_fraction,
)

PIP = "I'm Pip, the SFT course assistant.\n\n### Details\nA small model fine-tuned here."


def test_api_renames(capsys):
    right = {"tokenizer": "processing_class", "max_seq_length": "max_length",
             "DataCollatorForCompletionOnlyLM": "assistant_only_loss"}
    check_api_renames(right)
    check_api_renames({**right, "DataCollatorForCompletionOnlyLM": "completion_only_loss"})
    assert "Correct" in capsys.readouterr().out
    for wrong, hint in [({**right, "tokenizer": "tokenizer"}, "processing_class="),
                        ({**right, "max_seq_length": "max_seq_len"}, "now `max_length`"),
                        ({**right, "DataCollatorForCompletionOnlyLM": "DataCollator"},
                         "collator is gone"),
                        ({"tokenizer": "processing_class"}, "keys are exactly")]:
        with pytest.raises(ExerciseError, match=hint):
            check_api_renames(wrong)


def test_pip_reply(capsys):
    check_pip_reply(PIP)
    assert "Correct" in capsys.readouterr().out
    for wrong, hint in [("Hello! I'm Pip.\n\n### Details\nx", "filler"),
                        ("I'm Pip.\n### Details\nx", "no blank line"),
                        ("I'm SmolLM.\n\n### Details\nx", "Pip's name"),
                        ("### Pip\nI'm Pip.", "heading"),
                        (42, "not a string")]:
        with pytest.raises(ExerciseError, match=hint):
            check_pip_reply(wrong)


def test_trained_fraction(capsys):
    dataset = Dataset.from_dict({"labels": [[-100, -100, -100, 5], [-100, 7]]})
    check_trained_fraction(dataset, 2 / 6)
    assert "33.3%" in capsys.readouterr().out
    for wrong, hint in [(4 / 6, "masked share"), (2 / 4, "over all rows"), (2, "over all rows")]:
        with pytest.raises(ExerciseError, match=hint):
            check_trained_fraction(dataset, wrong)


def test_steps_per_epoch(capsys):
    check_steps_per_epoch(346, 4, 87)
    assert "87 steps" in capsys.readouterr().out
    for wrong, hint in [(86, "round up"), (1384, "divide")]:
        with pytest.raises(ExerciseError, match=hint):
            check_steps_per_epoch(346, 4, wrong)


def test_compliance_rate(capsys):
    examples = [{"category": "identity"}, {"category": "factual"}, {"category": "factual"}]
    replies = ["Canberra.\n\n### Details\nx", "Canberra.\n\n### Details\nx", "Sure! Yes."]
    check_compliance_rate(examples, replies, 1 / 3)
    assert "33.3%" in capsys.readouterr().out
    for wrong, hint in [(2 / 3, "must also name Pip"), (100 / 3, "not a percentage"),
                        (0.5, "average")]:
        with pytest.raises(ExerciseError, match=hint):
            check_compliance_rate(examples, replies, wrong)


def test_padding_fraction(capsys):
    lengths = [10, 6, 4, 4]  # batches [10, 6] and [4, 4]: 28 positions, 4 pads
    check_padding_fraction(lengths, 2, 4 / 28)
    assert "14.3%" in capsys.readouterr().out
    for wrong, hint in [(16 / 40, "its own longest"), (4 / 24, "pads included"),
                        (0.0, "per batch")]:
        with pytest.raises(ExerciseError, match=hint):
            check_padding_fraction(lengths, 2, wrong)


def test_adam_state_bytes(capsys):
    check_adam_state_bytes(1000, 8000)
    assert "8,000 bytes" in capsys.readouterr().out
    for wrong, hint in [(4000, "TWO float32"), (16000, "not the weights"), (2000, "4 bytes"),
                        (12345, "two moments")]:
        with pytest.raises(ExerciseError, match=hint):
            check_adam_state_bytes(1000, wrong)


@pytest.fixture
def lora_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=8, target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight)  # a trained adapter: B is no longer 0
    return layer


def test_merged_weight(lora_layer, capsys):
    W = lora_layer.base_layer.weight.detach()
    A = lora_layer.lora_A["default"].weight.detach()
    B = lora_layer.lora_B["default"].weight.detach()
    check_merged_weight(lora_layer, W + 4.0 * B @ A)
    assert "Correct" in capsys.readouterr().out
    for wrong, hint in [(W + B @ A, "alpha / r"), (W - 4.0 * B @ A, "with B = lora_B"),
                        (B @ A, "with B = lora_B"), (W.T, "shape")]:
        with pytest.raises(ExerciseError, match=hint):
            check_merged_weight(lora_layer, wrong)
