"""Exercise checks of notebooks 01 and 02 accept the right answer and reject wrong ones."""

from __future__ import annotations

import pytest
import torch

from sft_helpers.checks import (
    ExerciseError,
    check_assistant_labels,
    check_generation_prompt,
    check_masked_loss,
    check_padded_batch,
    check_single_bos,
    check_template_overhead,
)
from sft_helpers.masking import tokenize_with_masking
from sft_helpers.models import load_tokenizer
from sft_helpers.templates import with_template

CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def test_template_overhead(tokenizer, capsys):
    messages = CHAT[:1]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    question = tokenizer.encode(messages[0]["content"], add_special_tokens=False)
    check_template_overhead(tokenizer, messages, len(prompt) - len(question))
    assert "Correct" in capsys.readouterr().out
    with pytest.raises(ExerciseError, match="system prompt"):
        check_template_overhead(tokenizer, messages, len(prompt))


def test_generation_prompt():
    check_generation_prompt("llama3", "<|start_header_id|>assistant<|end_header_id|>\n\n")
    check_generation_prompt("phi3", "<|assistant|>\n")
    with pytest.raises(ExerciseError, match="newlines"):
        check_generation_prompt("llama3", "<|start_header_id|>assistant<|end_header_id|>")


def test_single_bos(tokenizer):
    llama = with_template(tokenizer, "llama3")
    llama.add_bos_token = True  # like the real Llama 3 tokenizer
    text = llama.apply_chat_template(CHAT, tokenize=False)
    check_single_bos(llama, CHAT, llama(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(ExerciseError, match="2 BOS tokens"):
        check_single_bos(llama, CHAT, llama(text)["input_ids"])


def test_masked_loss():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, -1.0, 0.0]])
    labels = torch.tensor([-100, 2, 0])
    log_probs = logits.log_softmax(-1)
    right = -(log_probs[1, 2] + log_probs[2, 0]).item() / 2
    check_masked_loss(logits, labels, right)
    with pytest.raises(ExerciseError, match="every position"):
        check_masked_loss(
            logits, labels, torch.nn.functional.cross_entropy(logits, labels.clamp(min=0)).item()
        )
    with pytest.raises(ExerciseError, match="divide"):
        check_masked_loss(logits, labels, right * 2 / 3)


def test_assistant_labels(tokenizer):
    example = tokenize_with_masking(CHAT, tokenizer)
    check_assistant_labels(CHAT, tokenizer, example["labels"])
    with pytest.raises(ExerciseError, match="must be -100"):
        check_assistant_labels(CHAT, tokenizer, example["input_ids"])
    no_eos = example["labels"].clone()
    no_eos[no_eos == tokenizer.eos_token_id] = -100
    with pytest.raises(ExerciseError, match="must be trained: '<|im_end|><|im_end|>'"):
        check_assistant_labels(CHAT, tokenizer, no_eos)
    with pytest.raises(ExerciseError, match="one label per token"):
        check_assistant_labels(CHAT, tokenizer, example["labels"][:-1])


def test_padded_batch(tokenizer):
    examples = [tokenize_with_masking(c, tokenizer) for c in (CHAT, CHAT[:2])]
    pad = tokenizer.pad_token_id
    width = len(examples[0]["input_ids"])

    def padded(key, value):
        return torch.stack(
            [torch.cat([e[key], torch.full((width - len(e[key]),), value)]) for e in examples]
        )

    good = {
        "input_ids": padded("input_ids", pad),
        "attention_mask": padded("attention_mask", 0),
        "labels": padded("labels", -100),
    }
    check_padded_batch(good, examples, pad)
    lossy = dict(good, labels=good["input_ids"].masked_fill(good["input_ids"] == pad, -100))
    lossy["labels"][good["labels"] == -100] = -100
    with pytest.raises(ExerciseError, match="pad is EOS"):
        check_padded_batch(lossy, examples, pad)
    with pytest.raises(ExerciseError, match="attention_mask with 0"):
        check_padded_batch(
            dict(good, attention_mask=torch.ones_like(good["attention_mask"])), examples, pad
        )
    with pytest.raises(ExerciseError, match="keys"):
        check_padded_batch({"input_ids": good["input_ids"]}, examples, pad)
