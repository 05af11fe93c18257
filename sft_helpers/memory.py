"""How much memory fine-tuning takes: full fine-tuning, LoRA and QLoRA, itemized, from a config.

`estimate_memory(config, method)` adds up seven parts, in bytes:

- weights: the base model. full and lora: every parameter in `compute_dtype`. qlora: the
  linear layers of the decoder blocks packed two 4-bit codes per byte; everything else
  (embeddings, norms, lm_head, biases; a tied embedding once) unquantized, in float32 when
  `upcast_unquantized` (PEFT's `prepare_model_for_kbit_training` casts them so), else in
  `compute_dtype`.
- quant_constants (qlora): per quantized matrix of n weights, bitsandbytes keeps one absmax
  per block of 64 (float32; with `double_quant`, uint8 plus one float32 per 256 blocks and a
  float32 offset) and its lookup tables (16 float32, plus 256 float32 with `double_quant`).
- adapters (lora, qlora): the LoRA parameters, in the dtype TRL's `SFTTrainer` leaves them
  in (`TRL_ADAPTER_DTYPES`: PEFT's float32 on a plain base, bfloat16 on a 4-bit one), or
  `adapter_dtype`.
- master_weights (full, `mixed_precision`): a float32 copy of every parameter, which the
  optimizer updates; the `compute_dtype` weights are rounded from it after each step.
- gradients: one per trainable parameter, in that parameter's dtype.
- optimizer_states: AdamW keeps 2 tensors per trainable parameter (torch's AdamW in the
  parameter's dtype; float32 with `mixed_precision`), SGD none.
- activations: see `activation_bytes`.

Full fine-tuning in bf16 takes 16 bytes per parameter with `mixed_precision`, counted as
DeepSpeed splits them: 2 for the weights, 2 for the gradients, 4 for the master weights, 8
for AdamW. FSDP's mixed precision, and a float32 model trained under bf16 autocast, keep
float32 weights and gradients instead: 4 + 4 + 8, the same 16. Without `mixed_precision`
everything is in bf16, 8 bytes per parameter: the Trainer on a model loaded in bf16.

What it leaves out: the CUDA context and kernels' workspaces (a few hundred MB), allocator
fragmentation, and transient buffers other than the logits' gradient.

    >>> from sft_helpers.architectures import load_config
    >>> estimate = estimate_memory(load_config("llama-3-8b"), "qlora")
    >>> round(estimate.weights / 1e9, 2), round(estimate.total / 1e9, 1)
    (7.69, 13.3)

Run `python -m sft_helpers.memory --model llama-3-70b --method qlora` for the table.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from sft_helpers.architectures import ARCHITECTURES, load_config
from sft_helpers.lora import (
    NORMS_PER_LAYER,
    count_lora_parameters,
    count_parameters,
    head_dim,
    linear_shapes,
    resolve_targets,
)
from sft_helpers.quant import BLOCKSIZE, DOUBLE_QUANT_BLOCKSIZE

METHODS = ("full", "lora", "qlora")
# Tensors an optimizer keeps per trainable parameter, each the parameter's size.
OPTIMIZER_STATES = {"adamw": 2, "sgd": 0}
# The LoRA weights' dtype after the pinned TRL's SFTTrainer has wrapped the model: PEFT's
# default float32 (autocast_adapter_dtype=True), cast to bfloat16 when the base is quantized.
TRL_ADAPTER_DTYPES = {"lora": torch.float32, "qlora": torch.bfloat16}
FLOAT32_BYTES = 4
NF4_TABLE_BYTES = 16 * FLOAT32_BYTES
DYNAMIC_TABLE_BYTES = 256 * FLOAT32_BYTES
GB = 1e9
GIB = 2**30
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each part of a fine-tuning run's memory (see the module docstring)."""

    weights: int
    quant_constants: int
    adapters: int
    master_weights: int
    gradients: int
    optimizer_states: int
    activations: int

    @property
    def total(self) -> int:
        """All parts added up."""
        return sum(asdict(self).values())


def dtype_bytes(dtype: torch.dtype, name: str = "compute_dtype") -> int:
    """Bytes per element of a floating-point dtype (`name` is the argument it came as).

    >>> dtype_bytes(torch.bfloat16)
    2
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point torch.dtype, got {dtype!r}")
    return torch.finfo(dtype).bits // 8


def quantized_numels(config: PretrainedConfig) -> list[int]:
    """The number of weights of each matrix a 4-bit load quantizes: the blocks' linear layers.

    The embedding and lm_head stay unquantized (transformers keeps the output layer out of
    4-bit), and so do norms and biases.

    >>> from sft_helpers.architectures import load_config
    >>> len(quantized_numels(load_config("llama-3-8b")))  # 7 per layer x 32 layers
    224
    """
    per_layer = [i * o for i, o in linear_shapes(config).values()]
    return per_layer * config.num_hidden_layers


def quant_constant_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of bitsandbytes' quantization constants for one 4-bit matrix of `numel` weights.

    >>> quant_constant_bytes(4096 * 4096, double_quant=False)  # float32 per 64 weights
    1048640
    >>> quant_constant_bytes(4096 * 4096)  # uint8 per 64, float32 per 64 * 256, offset
    267332
    """
    blocks = math.ceil(numel / BLOCKSIZE)
    if not double_quant:
        return blocks * FLOAT32_BYTES + NF4_TABLE_BYTES
    blocks2 = math.ceil(blocks / DOUBLE_QUANT_BLOCKSIZE)
    return blocks + (blocks2 + 1) * FLOAT32_BYTES + NF4_TABLE_BYTES + DYNAMIC_TABLE_BYTES


def _norm_bytes(hidden: int, act_bytes: int, frozen: bool) -> int:
    # output, float32 input copy and 1/rms; the float32 normalized values only when the
    # norm's weight is trained (its gradient needs them)
    return hidden * act_bytes + (hidden + 1 + (0 if frozen else hidden)) * FLOAT32_BYTES


def layer_activation_bytes(config: PretrainedConfig, act_bytes: int, frozen: bool = False) -> int:
    """Bytes one decoder layer saves for backward, per token (activations in `act_bytes`).

    - each RMSNorm: its output, the float32 copy of its input and the float32 1/rms per
      token; and the float32 normalized values when the norms are trained (not `frozen`);
    - attention: q and k after RoPE, v, the attention output, and the float32 log-sum-exp
      per head of a memory-efficient kernel (SDPA, flash): no seq_len x seq_len matrix;
    - the gated MLP: gate output, its activation, up output and their product.

    >>> from sft_helpers.architectures import load_config
    >>> layer_activation_bytes(load_config("llama-3-8b"), act_bytes=2)
    217224
    """
    hidden = config.hidden_size
    q_size = config.num_attention_heads * head_dim(config)
    kv_size = config.num_key_value_heads * head_dim(config)
    norm = _norm_bytes(hidden, act_bytes, frozen)
    attention = (2 * q_size + 2 * kv_size) * act_bytes + config.num_attention_heads * FLOAT32_BYTES
    mlp = 4 * config.intermediate_size * act_bytes
    return NORMS_PER_LAYER[config.model_type] * norm + attention + mlp


def adapter_activation_bytes(
    config: PretrainedConfig,
    r: int,
    target_modules: str | tuple[str, ...],
    act_bytes: int,
    adapter_bytes: int = FLOAT32_BYTES,
) -> int:
    """Bytes the LoRA adapters of one decoder layer save for backward, per token.

    Each adapter keeps A's output (r values in the adapters' dtype, `adapter_bytes` each);
    when the activations' dtype differs from the adapters', PEFT casts each adapted layer's
    input to the adapters' dtype, and that copy is kept too.

    >>> from sft_helpers.architectures import load_config
    >>> adapter_activation_bytes(load_config("llama-3-8b"), 16, "all-linear", act_bytes=4)
    448
    """
    shapes = linear_shapes(config)
    targets = resolve_targets(config, target_modules)
    copies = 0 if act_bytes == adapter_bytes else sum(shapes[m][0] for m in targets)
    return (len(targets) * r + copies) * adapter_bytes


def activation_bytes(
    config: PretrainedConfig,
    *,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    act_bytes: int,
    adapter_bytes_per_layer: int | None = None,
) -> dict[str, int]:
    """Activation memory at the peak of a training step, in bytes, by kind.

    - layers: without checkpointing, what every layer saves (`layer_activation_bytes`),
      and with LoRA its adapters (`adapter_bytes_per_layer` per token; None for full
      fine-tuning, where the norms are trained too); with
      checkpointing, only each layer's input. Plus the final norm.
    - recompute: with checkpointing, one layer's saved tensors, rebuilt during backward.
    - logits: the float32 log-softmax (seq_len x vocab per sequence) cross-entropy keeps.
    - logits_grad: the float32 gradients of the log-softmax and of the logits, alive together
      at the start of backward.

    `act_bytes` is the activations' dtype size: the compute dtype, or 4 after
    `prepare_model_for_kbit_training` (it upcasts the embedding, so the hidden states are
    float32, and bitsandbytes' 4-bit layers return their input's dtype).

    >>> from sft_helpers.architectures import load_config
    >>> activation_bytes(load_config("smollm2-135m"), batch_size=1, seq_len=8,
    ...                  gradient_checkpointing=True, act_bytes=2)["logits"]
    1572864
    """
    tokens = batch_size * seq_len
    hidden = config.hidden_size
    frozen = adapter_bytes_per_layer is not None
    per_token = layer_activation_bytes(config, act_bytes, frozen) + (adapter_bytes_per_layer or 0)
    one_layer = tokens * per_token
    final_norm = tokens * _norm_bytes(hidden, act_bytes, frozen)
    layers = config.num_hidden_layers
    vocab = tokens * config.vocab_size
    saved = layers * tokens * hidden * act_bytes if gradient_checkpointing else layers * one_layer
    return {
        "layers": saved + final_norm,
        "recompute": one_layer if gradient_checkpointing else 0,
        "logits": vocab * FLOAT32_BYTES,
        "logits_grad": 2 * vocab * FLOAT32_BYTES,
    }


def _check_arguments(method: str, optimizer: str, batch_size: int, seq_len: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(
            f"optimizer must be one of {', '.join(OPTIMIZER_STATES)}, got {optimizer!r}"
        )
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def estimate_memory(
    config: PretrainedConfig,
    method: str,
    *,
    lora_r: int = 16,
    target_modules: str | tuple[str, ...] = "all-linear",
    batch_size: int = 1,
    seq_len: int = 2048,
    optimizer: str = "adamw",
    gradient_checkpointing: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    upcast_unquantized: bool = True,
    adapter_dtype: torch.dtype | None = None,
    mixed_precision: bool = True,
) -> MemoryEstimate:
    """The memory of fine-tuning `config`'s model with `method` (full, lora, qlora), itemized.

    See the module docstring for each part's formula. `lora_r`, `target_modules` and
    `adapter_dtype` (None: `TRL_ADAPTER_DTYPES[method]`) matter for lora and qlora only;
    `double_quant` and `upcast_unquantized` for qlora only; `mixed_precision` for full only.

    >>> from sft_helpers.architectures import load_config
    >>> full = estimate_memory(load_config("llama-3-8b"), "full")
    >>> full.weights == full.gradients == 2 * 8_030_261_248
    True
    >>> (full.total - full.activations) // 8_030_261_248  # bytes per parameter
    16
    """
    _check_arguments(method, optimizer, batch_size, seq_len)
    compute = dtype_bytes(compute_dtype)
    n_params = count_parameters(config)
    quantized = quantized_numels(config)
    upcast = method == "qlora" and upcast_unquantized
    act = FLOAT32_BYTES if upcast else compute
    if method == "qlora":
        weights = sum(math.ceil(n / 2) for n in quantized) + (n_params - sum(quantized)) * act
        constants = sum(quant_constant_bytes(n, double_quant) for n in quantized)
    else:
        weights, constants = n_params * compute, 0
    if method == "full":
        adapters, trainable_bytes, adapter_acts = 0, n_params * compute, None
        master = n_params * FLOAT32_BYTES if mixed_precision and compute != FLOAT32_BYTES else 0
        state_bytes = n_params * FLOAT32_BYTES if mixed_precision else trainable_bytes
    else:
        adapter_bytes = dtype_bytes(adapter_dtype or TRL_ADAPTER_DTYPES[method], "adapter_dtype")
        adapters = count_lora_parameters(config, lora_r, target_modules) * adapter_bytes
        trainable_bytes = state_bytes = adapters
        master = 0
        adapter_acts = adapter_activation_bytes(config, lora_r, target_modules, act,
                                                adapter_bytes)
    activations = activation_bytes(
        config,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        act_bytes=act,
        adapter_bytes_per_layer=adapter_acts,
    )
    return MemoryEstimate(
        weights=weights,
        quant_constants=constants,
        adapters=adapters,
        master_weights=master,
        gradients=trainable_bytes,
        optimizer_states=OPTIMIZER_STATES[optimizer] * state_bytes,
        activations=sum(activations.values()),
    )


def format_estimate(estimate: MemoryEstimate, title: str = "") -> str:
    """The estimate as a table: one row per part and the total, in GB and GiB.

    >>> from sft_helpers.architectures import load_config
    >>> print(format_estimate(estimate_memory(load_config("smollm2-135m"), "lora")))
    ... # doctest: +ELLIPSIS
    part                         GB      GiB
    weights                   0.269    0.251
    ...
    total                     1.721    1.602
    """
    rows = [f"{title}\n" if title else "", f"{'part':<20}{'GB':>11}{'GiB':>9}"]
    for part, value in [*asdict(estimate).items(), ("total", estimate.total)]:
        rows.append(f"{part:<20}{value / GB:>11.3f}{value / GIB:>9.3f}")
    return "\n".join(rows).lstrip("\n")


def footprint(model: torch.nn.Module) -> dict[str, int]:
    """Measured bytes of a loaded model: `weights` (parameters and buffers) and
    `quant_constants` (every tensor of bitsandbytes' 4-bit quantization states).

    Each storage is counted once, so a tied embedding counts once.

    >>> footprint(torch.nn.Linear(4, 2, bias=False))
    {'weights': 32, 'quant_constants': 0}
    """
    seen: set[int] = set()

    def new_bytes(tensors) -> int:
        total = 0
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    weights = new_bytes([*model.parameters(), *model.buffers()])
    states = [p.quant_state for p in model.parameters() if hasattr(p, "quant_state")]
    constants = new_bytes(t for state in states for t in _state_tensors(state))
    return {"weights": weights, "quant_constants": constants}


def _state_tensors(state) -> list[torch.Tensor]:
    tensors = [state.absmax, state.code, state.offset]
    if state.state2 is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def saved_tensor_bytes(step: Callable[[], torch.Tensor], exclude: torch.nn.Module) -> int:
    """Bytes autograd saves for backward while `step()` runs (a forward pass that returns a
    loss), leaving out `exclude`'s own parameters and buffers: the activations, measured.

    Each storage is counted once. Works on any device, so the activation formula can be
    checked on a CPU.

    >>> layer = torch.nn.Linear(4, 3)
    >>> saved_tensor_bytes(lambda: layer(torch.ones(2, 4)).square().sum(), layer)
    56
    """
    skip = {t.untyped_storage().data_ptr() for t in [*exclude.parameters(), *exclude.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip and storage.device.type != "meta":
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(saved.values())


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sft_helpers.memory",
        description="Can I fine-tune this model on my GPU? Estimated memory, itemized.",
    )
    parser.add_argument("--model", default="llama-3-8b",
                        help=f"one of {', '.join(ARCHITECTURES)}, or a config.json path")
    parser.add_argument("--method", choices=METHODS, default="qlora")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--targets", default="all-linear",
                        help="'all-linear', 'attention' or module names joined by commas")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZER_STATES), default="adamw")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16",
                        help="compute dtype (float16 on a T4)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--no-mixed-precision", action="store_true",
                        help="full fine-tuning with everything in --dtype (no float32 master "
                             "weights and optimizer states)")
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--gpu-gib", type=float, help="your GPU's memory in GiB, to compare")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command line: print the estimate for a bundled architecture or a config file."""
    args = _parse(argv)
    if args.model not in ARCHITECTURES and not Path(args.model).exists():
        sys.exit(f"unknown model {args.model!r}: use one of {', '.join(ARCHITECTURES)} "
                 "or the path of a config.json")
    targets = args.targets if "," not in args.targets else tuple(args.targets.split(","))
    try:
        estimate = estimate_memory(
            load_config(args.model), args.method, lora_r=args.r, target_modules=targets,
            batch_size=args.batch, seq_len=args.seq_len, optimizer=args.optimizer,
            gradient_checkpointing=not args.no_gradient_checkpointing,
            compute_dtype=DTYPES[args.dtype], double_quant=not args.no_double_quant,
            mixed_precision=not args.no_mixed_precision,
        )
    except ValueError as error:
        sys.exit(f"error: {error}")
    title = (f"{args.model}, {args.method}, r={args.r}, batch {args.batch} x "
             f"{args.seq_len} tokens, {args.optimizer}, {args.dtype}")
    print(format_estimate(estimate, title))
    if args.gpu_gib is not None:
        need = estimate.total / GIB
        verdict = "fits" if need <= args.gpu_gib else "does NOT fit"
        print(f"\n{verdict} in {args.gpu_gib:g} GiB (estimate {need:.1f} GiB, plus the CUDA "
              "context and fragmentation: keep ~10% free)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
