"""Bundled architectures are the real models' configs, loaded offline, built on meta."""

from __future__ import annotations

import json

import pytest
import torch

from sft_helpers.architectures import ARCHITECTURES, hub_id, load_config, meta_model
from sft_helpers.models import profile_dir

# Parameter counts published for these models (model cards / Hub "model size").
PUBLISHED_PARAMETERS = {
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
    "gemma-2-9b": 9_241_705_984,
    "smollm2-135m": 134_515_008,
}
# Architecture fields the course model's own config (from its GGUF file) must agree on.
SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
)


def test_every_bundled_architecture_is_listed():
    assert set(PUBLISHED_PARAMETERS) == set(ARCHITECTURES)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_meta_model_has_the_published_size_and_no_storage(name):
    model = meta_model(name)
    assert model.num_parameters() == PUBLISHED_PARAMETERS[name]
    assert {p.device.type for p in model.parameters()} == {"meta"}


@pytest.mark.parametrize(
    ("name", "model_type", "kv_heads", "head_dim", "tied"),
    [
        ("llama-3-8b", "llama", 8, 128, False),
        ("llama-3-70b", "llama", 8, 128, False),
        ("mistral-7b", "mistral", 8, 128, False),
        ("qwen2.5-7b", "qwen2", 4, 128, False),
        ("gemma-2-9b", "gemma2", 8, 256, True),
        ("smollm2-135m", "llama", 3, 64, True),
    ],
)
def test_attention_layout(name, model_type, kv_heads, head_dim, tied):
    model = meta_model(name)
    config = model.config
    attention = model.model.layers[0].self_attn
    assert config.model_type == model_type and config.tie_word_embeddings is tied
    assert config.num_key_value_heads == kv_heads
    assert attention.k_proj.weight.shape == (kv_heads * head_dim, config.hidden_size)
    assert attention.q_proj.weight.shape[0] == config.num_attention_heads * head_dim


def test_hub_ids_name_the_source():
    assert hub_id("llama-3-8b") == "meta-llama/Meta-Llama-3-8B"
    assert all("/" in hub_id(name) for name in ARCHITECTURES)


def test_smollm2_matches_the_course_model():
    course = load_config(profile_dir("smollm2-135m-instruct"))
    bundled = load_config("smollm2-135m")
    for field in SHAPE_FIELDS:
        assert getattr(bundled, field) == getattr(course, field), field


def test_load_config_from_a_file_and_a_folder(tmp_path):
    values = {"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(values))
    for where in (tmp_path, tmp_path / "config.json", str(tmp_path)):
        config = load_config(where)
        assert config.model_type == "mistral" and config.hidden_size == 64
        assert config.head_dim == 16


def test_unknown_name_lists_the_bundled_ones():
    with pytest.raises(ValueError, match="unknown architecture 'llama-2-7b'") as error:
        load_config("llama-2-7b")
    assert all(name in str(error.value) for name in ARCHITECTURES)
    with pytest.raises(ValueError, match="unknown architecture"):
        hub_id("gpt-5")


def test_config_without_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match="model_type"):
        load_config(tmp_path)


def test_meta_model_accepts_a_config():
    config = load_config("smollm2-135m")
    config.num_hidden_layers = 2
    model = meta_model(config)
    assert len(model.model.layers) == 2
    assert model.lm_head.weight.device == torch.device("meta")
