"""New special tokens: the hand route against TRL's clone_chat_template, the parameter
counts against PEFT, the cached template adapter and its reload (tiny model)."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig
from trl import clone_chat_template

from sft_helpers.masking import IGNORE_INDEX, tokenize_with_masking
from sft_helpers.models import TINY_PROFILE, load_model
from sft_helpers.new_tokens import (
    CLOSINGS,
    PROBE_LOGITS,
    ROUTES,
    add_template,
    closing_tokens,
    load_template_model,
    new_token_parameters,
    probe_logits,
    template_adapter,
    template_release,
)
from sft_helpers.templates import TEMPLATE_TOKENS
from sft_helpers.training import lora_config, train_sft, trains_embeddings

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
NEW = TEMPLATE_TOKENS["llama3"]["added"]


@pytest.fixture
def retemplated():
    model, tokenizer = load_model(TINY_PROFILE)
    old_size = len(tokenizer)
    return model, tokenizer, add_template(model, tokenizer), old_size


def test_add_template_adds_special_tokens_resizes_and_trains_the_new_end_token(retemplated):
    model, tokenizer, new_ids, old_size = retemplated
    assert new_ids == list(range(old_size, old_size + len(NEW)))
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == old_size + 4
    assert tokenizer.eos_token == "<|eot_id|>" == tokenizer.convert_ids_to_tokens(
        model.generation_config.eos_token_id)
    example = tokenize_with_masking(CHAT, tokenizer)
    ids = example["input_ids"].tolist()
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert all(ids.count(i) > 0 for i in new_ids)  # each new token is one id, never split
    trained = example["labels"][example["labels"] != IGNORE_INDEX].tolist()
    assert trained[-1] == tokenizer.eos_token_id


def test_clone_chat_template_gives_the_same_tokenizer_but_leaves_bos(retemplated, tmp_path):
    _, tokenizer, new_ids, old_size = retemplated
    model, theirs = load_model(TINY_PROFILE)
    template_release(theirs, tmp_path)
    assert len(theirs) == old_size  # the release is a copy
    model, theirs, their_ids = clone_chat_template(model, theirs, str(tmp_path),
                                                   resize_to_multiple_of=None)
    assert their_ids == new_ids and theirs.get_vocab() == tokenizer.get_vocab()
    assert theirs.chat_template == tokenizer.chat_template
    assert theirs.eos_token == tokenizer.eos_token
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert theirs.bos_token == "<|im_start|>" != tokenizer.bos_token


@pytest.mark.parametrize("route", ROUTES)
def test_new_token_parameters_equal_peft(retemplated, route):
    model, _, new_ids, _ = retemplated
    config = lora_config(layers=None)
    if route == "modules_to_save":
        config.modules_to_save, config.ensure_weight_tying = ["embed_tokens"], True
    else:
        config.trainable_token_indices = new_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    extra = sum(p.numel() for name, p in peft_model.named_parameters()
                if p.requires_grad and "lora_" not in name)
    assert extra == new_token_parameters(model.config, len(new_ids), route)


def test_new_token_parameters_count_an_untied_head_too():
    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=2,
                         vocab_size=100, tie_word_embeddings=False)
    assert new_token_parameters(config, 3, "trainable_token_indices") == 2 * 3 * 8
    assert new_token_parameters(config, 3, "modules_to_save") == 2 * 100 * 8
    with pytest.raises(ValueError, match="route must be one of"):
        new_token_parameters(config, 3, "lora")


def test_add_template_rejects_an_unknown_template(retemplated):
    model, tokenizer, _, _ = retemplated
    with pytest.raises(ValueError, match="unknown template 'llama4'"):
        add_template(model, tokenizer, "llama4")


def test_trained_new_rows_change_through_trl(retemplated, tmp_path):
    model, tokenizer, new_ids, _ = retemplated
    config = lora_config(layers=None)
    config.trainable_token_indices = new_ids
    assert trains_embeddings(config)
    before = model.get_input_embeddings().weight[new_ids].detach().clone()
    trainer = train_sft(model, tokenizer, [CHAT] * 4, output_dir=tmp_path, max_steps=2,
                        batch_size=2, peft_config=config, progress=False)
    rows = trainer.model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]
    assert not torch.equal(rows.detach(), before)


def test_closing_tokens_name_the_token_that_ended_each_reply(retemplated):
    model, tokenizer, _, _ = retemplated
    records = closing_tokens(model, tokenizer, [{"instruction": "Hi"}, {"instruction": "Yo"}],
                             old_end=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                             max_new_tokens=4)
    for record in records:
        assert record["closing"] in CLOSINGS
        ends = {"new": "<|eot_id|>", "old": "<|im_end|>"}
        if record["closing"] == "none":
            assert not record["text"].endswith(tuple(ends.values()))
        else:
            assert record["text"].endswith(ends[record["closing"]])


@pytest.mark.slow
def test_template_adapter_reloads_with_equal_logits_only_onto_a_resized_base(fresh_cache):
    folder = template_adapter(train_rows=True, max_steps=2, profile=TINY_PROFILE, layers=None,
                              max_length=64, batch_size=2)
    model, tokenizer = load_template_model(folder)
    assert torch.equal(probe_logits(model, tokenizer), torch.load(folder / PROBE_LOGITS))
    assert template_adapter(train_rows=True, max_steps=2, profile=TINY_PROFILE, layers=None,
                            max_length=64, batch_size=2) == folder
    base, _ = load_model(TINY_PROFILE)
    with pytest.raises(IndexError, match="out of bounds"):
        PeftModel.from_pretrained(base, str(folder))
