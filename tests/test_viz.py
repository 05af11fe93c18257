"""Token views show which tokens are trained, and highlight special tokens."""

from __future__ import annotations

import pytest

from sft_helpers.masking import tokenize_with_masking
from sft_helpers.models import load_tokenizer
from sft_helpers.viz import (
    MASKED_STYLE,
    SPECIAL_STYLE,
    TRAINED_STYLE,
    highlight_special,
    side_by_side,
    token_view,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def test_token_view_colours_each_token_by_its_label(tokenizer):
    chat = [{"role": "user", "content": "<b>2+2</b>?"}, {"role": "assistant", "content": "4"}]
    example = tokenize_with_masking(chat, tokenizer)
    markup = token_view(example["input_ids"], example["labels"], tokenizer, "demo").data
    n_trained = int((example["labels"] != -100).sum())
    assert markup.count(TRAINED_STYLE) == n_trained + 1  # + the legend
    assert markup.count(MASKED_STYLE) == len(example["labels"]) - n_trained + 1
    assert f"{n_trained} of {len(example['labels'])} tokens trained" in markup
    assert "&lt;" in markup and "<b>2" not in markup, "token text is escaped"
    assert "\u21b5</span><br>" in markup, "newline tokens are visible and break the line"


def test_highlighting_special_tokens():
    markup = highlight_special(
        "<|im_start|>user\nHi<|im_end|>", ["<|im_start|>", "<|im_end|>"]
    ).data
    assert markup.count(SPECIAL_STYLE) == 2 and "&lt;|im_start|&gt;" in markup
    both = side_by_side({"a": "<s>x", "b": "y</s>"}, {"a": ["<s>"], "b": ["</s>"]}).data
    assert both.count(SPECIAL_STYLE) == 2 and both.index("<b>a</b>") < both.index("<b>b</b>")
