"""Model profiles, the offline error, and the verified cache (sft_helpers.models)."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from sft_helpers import models
from sft_helpers.models import (
    DEFAULT_PROFILE,
    OFFLINE_PROFILES,
    OfflineError,
    cache_is_valid,
    load_model,
    load_tokenizer,
)


def test_default_profile_is_smollm2_135m_instruct():
    model, tokenizer = load_model(DEFAULT_PROFILE)
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32 and not model.training
    assert "quantization_config" not in model.config.to_dict()
    assert "<|im_start|>" in tokenizer.chat_template


def test_default_profile_chats():
    model, tokenizer = load_model(DEFAULT_PROFILE)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:])


def test_tiny_profile_is_small_and_shares_the_tokenizer():
    model, tokenizer = load_model("tiny")
    assert model.config.num_hidden_layers <= 2 and model.config.hidden_size <= 128
    assert tokenizer.chat_template == load_tokenizer(DEFAULT_PROFILE).chat_template
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id


@pytest.mark.slow  # builds model cache entries from scratch
def test_tiny_profile_is_seeded(fresh_cache):
    first, _ = load_model("tiny")
    (fresh_cache / "tiny" / "model.safetensors").unlink()
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt, _ = load_model("tiny")
    for (name, a), b in zip(first.state_dict().items(), rebuilt.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow  # builds model cache entries from scratch
def test_first_load_writes_the_cache_and_second_load_reuses_it(fresh_cache, monkeypatch):
    entry = fresh_cache / "tiny"
    assert not entry.exists()
    load_model("tiny")
    assert cache_is_valid(entry)
    manifest = json.loads((entry / models.MANIFEST).read_text())
    assert "model.safetensors" in manifest and "tokenizer.json" in manifest

    def must_not_build(_folder):
        raise AssertionError("a valid cache entry was rebuilt")

    monkeypatch.setitem(models.BUILDERS, "tiny", must_not_build)
    load_model("tiny")


@pytest.mark.slow  # builds model cache entries from scratch
def test_truncated_cache_file_is_rebuilt(fresh_cache):
    load_model("tiny")
    weights = fresh_cache / "tiny" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    assert not cache_is_valid(weights.parent)
    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        model, _ = load_model("tiny")
    assert weights.stat().st_size == size and cache_is_valid(weights.parent)
    assert model.config.num_hidden_layers == 2


@pytest.mark.slow  # builds model cache entries from scratch
def test_corrupted_bytes_of_the_same_size_are_detected(fresh_cache):
    load_model("tiny")
    weights = fresh_cache / "tiny" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    assert not cache_is_valid(weights.parent)


def test_interrupted_build_leaves_no_entry(fresh_cache, monkeypatch):
    def crash(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setitem(models.BUILDERS, "tiny", crash)
    with pytest.raises(KeyboardInterrupt):
        load_model("tiny")
    assert not (fresh_cache / "tiny").exists()
    assert not list(fresh_cache.glob(".tiny.building-*"))


def test_hub_id_offline_fails_at_once_naming_the_offline_profiles(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OfflineError) as error:
        load_model("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert time.perf_counter() - start < 2
    assert all(profile in str(error.value) for profile in OFFLINE_PROFILES)
    with pytest.raises(OfflineError):
        load_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")


def test_unknown_profile_name_is_rejected():
    with pytest.raises(ValueError, match="unknown profile 'smollm'"):
        load_model("smollm")


def test_unknown_quantization_is_rejected():
    with pytest.raises(ValueError, match="quantization"):
        load_model("tiny", quantization="int3")


def test_nf4_profile_is_4bit_with_double_quant():
    import bitsandbytes as bnb

    model, _ = load_model("tiny", quantization="nf4")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == "nf4"
    assert layer.weight.quant_state.nested, "double quantization (compress_statistics)"
    assert layer.compute_dtype == torch.float32
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_a_dequantized_nf4_model_is_plain_float_and_computes_the_same(capsys):
    # The forward pass before dequantizing matters: on a CPU with AVX512-BF16 it is when
    # bitsandbytes moves each 4-bit weight into the layout of its fast kernel.
    import bitsandbytes as bnb

    model, _ = load_model("tiny", quantization="nf4")
    model.eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = model(ids).logits
        plain = models.dequantized(model)
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
        layer = plain.model.layers[0].self_attn.q_proj
        assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
        # 1e-2: that fast kernel multiplies in bfloat16; wrong weights move logits by about 1.
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-2, rtol=0)
    assert "dequantized" not in capsys.readouterr().err


def test_describe_profile_hides_the_home_folder():
    info = models.describe_profile(DEFAULT_PROFILE)
    assert info["profile"] == DEFAULT_PROFILE
    assert not info["cache"].startswith(os.path.expanduser("~"))
