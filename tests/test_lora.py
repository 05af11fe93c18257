"""LoRA counts and layer, checked against PEFT and against the models transformers builds."""

from __future__ import annotations

import re
from functools import cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn

from sft_helpers.architectures import ARCHITECTURES, config_from_dict, load_config, meta_model
from sft_helpers.lora import (
    ATTENTION_MODULES,
    TARGET_PRESETS,
    LoRALinear,
    count_lora_parameters,
    count_parameters,
    linear_shapes,
    lora_parameters_per_layer,
    lora_scaling,
    parameter_breakdown,
    resolve_targets,
)

# PEFT calls a transformers method that transformers 5 deprecates: library noise, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
RANK = 16
# float32 tolerance for two computations of the same product in a different order.
ATOL, RTOL = 1e-5, 1e-5


def peft_lora_counts(model: nn.Module) -> dict[str, int]:
    """LoRA parameters per module type in a PEFT model (summed over layers)."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        found = re.search(r"\.(\w+)\.lora_[AB]\.", name)
        if found:
            counts[found.group(1)] = counts.get(found.group(1), 0) + param.numel()
    return counts


@cache
def peft_meta_model(name: str):
    """A bundled architecture on meta with PEFT's LoRA (r=16) on its seven linear layers."""
    model = meta_model(name)
    targets = list(TARGET_PRESETS["all-linear"])
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.05, target_modules=targets)
    return model.config, model.num_parameters(), get_peft_model(model, config)


@pytest.fixture(params=ARCHITECTURES)
def peft_model(request):
    return peft_meta_model(request.param)


def test_base_count_matches_transformers(peft_model):
    config, built, _ = peft_model
    assert count_parameters(config) == built


def test_per_module_counts_match_peft(peft_model):
    config, _, model = peft_model
    per_layer = lora_parameters_per_layer(config, RANK)
    ours = {m: n * config.num_hidden_layers for m, n in per_layer.items()}
    assert ours == peft_lora_counts(model)


def test_totals_match_print_trainable_parameters(peft_model):
    config, built, model = peft_model
    trainable, everything = model.get_nb_trainable_parameters()
    assert trainable == count_lora_parameters(config, RANK, "all-linear")
    # PEFT's "all params" counts the adapters too: base + LoRA, not the base alone.
    assert everything == count_parameters(config) + trainable == built + trainable


def test_llama_3_8b_figures(capsys):
    config, _, model = peft_meta_model("llama-3-8b")
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    expected = "trainable params: 41,943,040 || all params: 8,072,204,288 || trainable%: 0.5196"
    assert expected in printed
    assert sum(lora_parameters_per_layer(config, 16).values()) == 1_310_720
    assert count_lora_parameters(config, 16) == 1_310_720 * 32 == 41_943_040
    assert count_parameters(config) == 8_030_261_248
    # one 4096 x 4096 matrix: 16,777,216 weights vs 131,072 for its rank-16 adapter
    assert linear_shapes(config)["q_proj"] == (4096, 4096)
    assert lora_parameters_per_layer(config, 16)["q_proj"] == 131_072


def test_attention_preset_matches_peft():
    model = meta_model("qwen2.5-7b")
    config = model.config
    model = get_peft_model(model, LoraConfig(r=8, target_modules=list(ATTENTION_MODULES)))
    assert model.get_nb_trainable_parameters()[0] == count_lora_parameters(config, 8, "attention")
    assert set(peft_lora_counts(model)) == set(ATTENTION_MODULES)


def test_qwen2_biases_are_counted():
    breakdown = parameter_breakdown(load_config("qwen2.5-7b"))
    model = meta_model("qwen2.5-7b")
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.bias is not None and attention.o_proj.bias is None
    built = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)
    assert breakdown["attention"] == built


# Small configs of every supported family with the options that change the count.
SMALL = {"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2, "vocab_size": 97,
         "num_attention_heads": 4, "num_key_value_heads": 2}
FAMILY_CONFIGS = [
    {"model_type": "llama", **SMALL, "attention_bias": True, "mlp_bias": True},
    {"model_type": "llama", **SMALL, "head_dim": 20, "tie_word_embeddings": True},
    {"model_type": "mistral", **SMALL, "head_dim": 8},
    {"model_type": "qwen2", **SMALL, "tie_word_embeddings": True},
    {"model_type": "gemma", **SMALL, "head_dim": 32, "attention_bias": True},
    {"model_type": "gemma2", **SMALL, "head_dim": 32, "tie_word_embeddings": False},
]


@pytest.mark.parametrize("values", FAMILY_CONFIGS, ids=lambda v: v["model_type"])
def test_family_counts_match_the_built_model(values):
    config = config_from_dict(values)
    model = meta_model(config)
    breakdown = parameter_breakdown(config)
    assert count_parameters(config) == model.num_parameters()
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    assert breakdown["mlp"] == mlp
    peft = get_peft_model(model, LoraConfig(r=3, target_modules="all-linear"))
    assert peft.get_nb_trainable_parameters()[0] == count_lora_parameters(config, 3)


@settings(max_examples=15, deadline=None)
@given(
    model_type=st.sampled_from(["llama", "mistral", "qwen2", "gemma", "gemma2"]),
    kv_heads=st.integers(1, 4),
    groups=st.integers(1, 3),
    head_dim=st.integers(1, 12).map(lambda half: 2 * half),  # rotary embeddings need it even
    per_head=st.integers(1, 8),  # transformers wants hidden_size divisible by the heads
    tied=st.booleans(),
    r=st.integers(1, 8),
)
def test_counts_match_built_models_for_any_shape(
    model_type, kv_heads, groups, head_dim, per_head, tied, r
):
    heads = kv_heads * groups
    hidden = heads * per_head
    config = config_from_dict({
        "model_type": model_type, "hidden_size": hidden, "intermediate_size": 2 * hidden + 1,
        "num_hidden_layers": 1, "vocab_size": 50, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "tie_word_embeddings": tied,
    })
    model = meta_model(config)
    assert count_parameters(config) == model.num_parameters()
    lora = sum(r * (m.in_features + m.out_features) for m in model.modules()
               if isinstance(m, nn.Linear) and m is not model.lm_head)
    assert count_lora_parameters(config, r) == lora


def test_unsupported_model_type_is_named():
    config = config_from_dict({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="'gpt2'.*llama, mistral, qwen2, gemma, gemma2"):
        count_parameters(config)


@pytest.mark.parametrize("r", [0, -4, 1.5, True, "16"])
def test_bad_rank_is_refused(r):
    config = load_config("smollm2-135m")
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        count_lora_parameters(config, r)
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        LoRALinear(nn.Linear(4, 4), r=r, alpha=8)


def test_missing_target_module_is_named():
    config = load_config("gemma-2-9b")
    with pytest.raises(ValueError, match="gemma2 model has no linear layer named c_attn, fc1"):
        count_lora_parameters(config, 8, ["q_proj", "c_attn", "fc1"])
    with pytest.raises(ValueError, match="unknown target preset 'mlp'"):
        resolve_targets(config, "mlp")
    with pytest.raises(ValueError, match="empty"):
        count_lora_parameters(config, 8, [])


def test_duplicate_targets_count_once():
    config = load_config("mistral-7b")
    twice = count_lora_parameters(config, 4, ["q_proj", "q_proj"])
    assert twice == count_lora_parameters(config, 4, ["q_proj"])


# --- LoRALinear ---------------------------------------------------------------------------


class OneLayer(nn.Module):
    """The smallest model PEFT can adapt: one linear layer named `proj`."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.proj = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def ours_and_peft(r: int, alpha: float, use_rslora: bool, seed: int = 0):
    """Our layer and PEFT's on the same base weights, with the same (non-zero) A and B."""
    torch.manual_seed(seed)
    base = nn.Linear(24, 12)
    ours = LoRALinear(nn.Linear(24, 12), r=r, alpha=alpha, use_rslora=use_rslora)
    ours.base.load_state_dict(base.state_dict())
    nn.init.normal_(ours.lora_B.weight)  # a trained B: the zero init would hide mistakes
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=["proj"])
    theirs = get_peft_model(OneLayer(base), config).base_model.model.proj
    theirs.lora_A["default"].weight.data.copy_(ours.lora_A.weight)
    theirs.lora_B["default"].weight.data.copy_(ours.lora_B.weight)
    return ours, theirs


@pytest.mark.parametrize(
    ("r", "alpha", "use_rslora"), [(1, 1, False), (4, 8, False), (16, 32, True)]
)
def test_lora_linear_equals_peft(r, alpha, use_rslora):
    ours, theirs = ours_and_peft(r, alpha, use_rslora)
    assert ours.scaling == theirs.scaling["default"] == lora_scaling(alpha, r, use_rslora)
    x = torch.randn(5, 3, 24)
    torch.testing.assert_close(ours(x), theirs(x), atol=ATOL, rtol=RTOL)
    delta = theirs.get_delta_weight("default")
    torch.testing.assert_close(ours.delta_weight(), delta, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(ours(x), ours.base(x)), "B is non-zero: the adapter changes outputs"


def test_initialisation_matches_peft_and_changes_nothing():
    torch.manual_seed(1)
    ours = LoRALinear(nn.Linear(24, 12), r=4, alpha=8)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["proj"])
    layer = get_peft_model(OneLayer(nn.Linear(24, 12)), config).base_model.model.proj
    assert torch.equal(ours.lora_A.weight, layer.lora_A["default"].weight)
    assert not ours.lora_B.weight.any()
    x = torch.randn(7, 24)
    assert torch.equal(ours(x), ours.base(x))


def test_only_the_adapter_trains():
    layer = LoRALinear(nn.Linear(6, 5), r=2, alpha=2)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}


def test_merge_round_trip():
    ours, theirs = ours_and_peft(r=4, alpha=8, use_rslora=False)
    original = ours.base.weight.detach().clone()
    x = torch.randn(9, 24)
    unmerged = ours(x)
    ours.merge()
    theirs.merge()
    torch.testing.assert_close(ours.base.weight, original + ours.delta_weight())
    torch.testing.assert_close(ours.base.weight, theirs.base_layer.weight)
    torch.testing.assert_close(ours(x), unmerged, atol=ATOL, rtol=RTOL)
    ours.unmerge()
    torch.testing.assert_close(ours.base.weight, original, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(x), unmerged, atol=ATOL, rtol=RTOL)


def test_merge_state_errors():
    layer = LoRALinear(nn.Linear(4, 4), r=2, alpha=4)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


def test_dropout_applies_to_the_adapter_input_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(32, 16)
    assert not torch.equal(layer(x), layer(x)), "training mode drops different inputs"
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), r=2, alpha=4, dropout=1.0)


def test_rslora_scaling():
    assert lora_scaling(16, 4) == 4.0 and lora_scaling(16, 4, use_rslora=True) == 8.0
    # rsLoRA keeps alpha / sqrt(r) * sqrt(r) constant: the update's size does not shrink with r
    assert lora_scaling(16, 64, use_rslora=True) * 64**0.5 == lora_scaling(16, 1, use_rslora=True)
