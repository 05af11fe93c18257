"""LoRA from scratch, and exact parameter counts of base models and their adapters.

LoRA freezes a linear layer's weight W (out x in) and learns a low-rank update:

    W' = W + (alpha / r) * B @ A        A: r x in, B: out x r, B = 0 at the start

so the adapted model equals the base model at step 0, and an adapter on W holds
r * (in + out) parameters instead of in * out. rsLoRA scales by alpha / sqrt(r) instead.

The counts here need only a transformers config (`sft_helpers.architectures` ships real
ones): Llama, Mistral, Qwen2 (biases on q, k, v) and Gemma / Gemma 2 (explicit `head_dim`,
four norms per layer in Gemma 2), with grouped-query attention and tied or untied embeddings.

    >>> from sft_helpers.architectures import load_config
    >>> count_lora_parameters(load_config("llama-3-8b"), r=16, target_modules="all-linear")
    41943040
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
# The two usual choices; "all-linear" is PEFT's name for every linear layer but the lm_head.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION_MODULES,
    "all-linear": ATTENTION_MODULES + MLP_MODULES,
}
# RMSNorm weights (one vector of hidden_size each) per decoder layer: Gemma 2 adds a norm
# before and after the MLP to the usual two.
NORMS_PER_LAYER = {"llama": 2, "mistral": 2, "qwen2": 2, "gemma": 2, "gemma2": 4}
SUPPORTED_MODEL_TYPES = tuple(NORMS_PER_LAYER)


def _check_supported(config: PretrainedConfig) -> None:
    if config.model_type not in NORMS_PER_LAYER:
        raise ValueError(
            f"cannot count a {config.model_type!r} model; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def head_dim(config: PretrainedConfig) -> int:
    """The size of one attention head: `config.head_dim` when set, else hidden / heads.

    Gemma sets it explicitly (256 for Gemma-2-9B, whose 16 heads x 256 = 4096 != 3584).

    >>> head_dim(PretrainedConfig(hidden_size=4096, num_attention_heads=32))
    128
    """
    explicit = getattr(config, "head_dim", None)
    return explicit or config.hidden_size // config.num_attention_heads


def linear_shapes(config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer in one decoder layer.

    k_proj and v_proj are smaller than q_proj under grouped-query attention: they have
    `num_key_value_heads` heads, not `num_attention_heads`.

    >>> from sft_helpers.architectures import load_config
    >>> linear_shapes(load_config("llama-3-8b"))["k_proj"]
    (4096, 1024)
    """
    _check_supported(config)
    hidden, inner = config.hidden_size, config.intermediate_size
    q_out = config.num_attention_heads * head_dim(config)
    kv_out = config.num_key_value_heads * head_dim(config)
    return {
        "q_proj": (hidden, q_out),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden),
        "gate_proj": (hidden, inner),
        "up_proj": (hidden, inner),
        "down_proj": (inner, hidden),
    }


def _biased_modules(config: PretrainedConfig) -> tuple[str, ...]:
    # Qwen2 hard-codes biases on q, k, v; Llama and Gemma follow `attention_bias` (all four
    # attention projections) and Llama also `mlp_bias`; Mistral has none.
    if config.model_type == "qwen2":
        return ("q_proj", "k_proj", "v_proj")
    biased = ATTENTION_MODULES if getattr(config, "attention_bias", False) else ()
    if config.model_type == "llama" and getattr(config, "mlp_bias", False):
        biased += MLP_MODULES
    return biased


def parameter_breakdown(config: PretrainedConfig) -> dict[str, int]:
    """The model's parameters by kind: embedding, attention, MLP, norms and lm_head.

    "attention" and "mlp" include biases; "lm_head" is 0 when it shares the embedding
    (`tie_word_embeddings`). The values add up to `count_parameters(config)`.

    >>> from sft_helpers.architectures import load_config
    >>> parameter_breakdown(load_config("llama-3-8b"))["lm_head"]
    525336576
    """
    shapes = linear_shapes(config)
    layers = config.num_hidden_layers
    biases = set(_biased_modules(config))

    def total(modules: tuple[str, ...]) -> int:
        per_layer = sum(i * o + (o if m in biases else 0) for m, (i, o) in shapes.items()
                        if m in modules)
        return layers * per_layer

    embedding = config.vocab_size * config.hidden_size
    return {
        "embedding": embedding,
        "attention": total(ATTENTION_MODULES),
        "mlp": total(MLP_MODULES),
        # one norm vector per layer norm, plus the final norm
        "norms": (layers * NORMS_PER_LAYER[config.model_type] + 1) * config.hidden_size,
        "lm_head": 0 if config.tie_word_embeddings else embedding,
    }


def count_parameters(config: PretrainedConfig) -> int:
    """The number of parameters of the causal LM that `config` describes, without building it.

    A tied embedding is counted once, as `model.num_parameters()` does.

    >>> from sft_helpers.architectures import load_config
    >>> count_parameters(load_config("llama-3-8b"))
    8030261248
    """
    return sum(parameter_breakdown(config).values())


def resolve_targets(
    config: PretrainedConfig, target_modules: str | Iterable[str]
) -> tuple[str, ...]:
    """The module names that `target_modules` (a preset name or module names) adapts.

    Raises ValueError for an unknown preset or a module the model does not have.

    >>> from sft_helpers.architectures import load_config
    >>> resolve_targets(load_config("mistral-7b"), "attention")
    ('q_proj', 'k_proj', 'v_proj', 'o_proj')
    """
    available = linear_shapes(config)
    if isinstance(target_modules, str):
        if target_modules not in TARGET_PRESETS:
            raise ValueError(
                f"unknown target preset {target_modules!r}: use one of "
                f"{', '.join(TARGET_PRESETS)} or a list of module names"
            )
        return TARGET_PRESETS[target_modules]
    targets = tuple(dict.fromkeys(target_modules))
    if not targets:
        raise ValueError("target_modules is empty: name at least one linear layer")
    missing = [m for m in targets if m not in available]
    if missing:
        raise ValueError(
            f"a {config.model_type} model has no linear layer named {', '.join(missing)}; "
            f"its decoder layers have {', '.join(available)}"
        )
    return targets


def _check_rank(r: int) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"the LoRA rank r must be a positive integer, got {r!r}")


def lora_parameters_per_layer(config: PretrainedConfig, r: int) -> dict[str, int]:
    """LoRA parameters of one adapter per linear layer type: r * (in + out).

    >>> from sft_helpers.architectures import load_config
    >>> lora_parameters_per_layer(load_config("llama-3-8b"), r=16)["q_proj"]
    131072
    """
    _check_rank(r)
    return {m: r * (i + o) for m, (i, o) in linear_shapes(config).items()}


def count_lora_parameters(
    config: PretrainedConfig, r: int, target_modules: str | Iterable[str] = "all-linear"
) -> int:
    """Trainable parameters of LoRA at rank `r` on `target_modules` in every decoder layer.

    This is what PEFT's `print_trainable_parameters` reports as "trainable params" for
    `LoraConfig(r=r, target_modules=...)` (bias="none").

    >>> from sft_helpers.architectures import load_config
    >>> count_lora_parameters(load_config("llama-3-8b"), r=16, target_modules="attention")
    13631488
    """
    per_module = lora_parameters_per_layer(config, r)
    targets = resolve_targets(config, target_modules)
    return config.num_hidden_layers * sum(per_module[m] for m in targets)


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor on B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA.

    >>> lora_scaling(32, 16), lora_scaling(32, 16, use_rslora=True)
    (2.0, 8.0)
    """
    _check_rank(r)
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (alpha / r) * B @ A.

    A starts Kaiming-uniform and B at zero, as in PEFT, so the output equals the base
    layer's until B is trained. `merge()` adds the update into the base weight (no extra
    cost at inference); `unmerge()` takes it out again.

    >>> layer = LoRALinear(nn.Linear(8, 4), r=2, alpha=4)
    >>> x = torch.randn(3, 8)
    >>> torch.equal(layer(x), layer.base(x))
    True
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        _check_rank(r)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(alpha, r, use_rslora)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **like)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **like)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The update (alpha / r) * B @ A, shaped like the base weight (out x in)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight; forward then skips the adapter."""
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged; unmerge() it first")
        self.base.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from the base weight again (up to rounding)."""
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged; there is nothing to unmerge")
        self.base.weight -= self.delta_weight()
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"
