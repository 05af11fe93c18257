"""Peak CUDA memory of real QLoRA training steps next to `sft_helpers.memory.estimate_memory`.

    python bench/qlora_memory.py --model llama-3-8b --seq-len 2048 --batch 1 --steps 3

Builds a bundled architecture (or a config.json) with random weights in the compute dtype
(nothing is downloaded), quantizes its block linears to NF4 with double quantization as a
4-bit load does, then runs the QLoRA recipe: `prepare_model_for_kbit_training` (upcast,
gradient checkpointing), LoRA on every linear layer, AdamW. It prints, in GB, the estimate's
parts, the memory allocated before the first step (weights, constants, adapters) and the
peak allocated during the steps (`torch.cuda.max_memory_allocated`), each next to the
estimate. Without a CUDA device it says so and exits (status 0); `--device cpu` runs the
same steps on the CPU as a smoke test, without memory figures.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

from sft_helpers.architectures import load_config
from sft_helpers.memory import DTYPES, GB, estimate_memory, format_estimate

SEED = 0


def quantize_linears(model: torch.nn.Module, compute_dtype: torch.dtype, device: str) -> int:
    """Replace each linear layer of the decoder blocks by an NF4 `Linear4bit` (double
    quantization), as `from_pretrained(..., quantization_config=nf4)` does; returns how many."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    ]
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        quantized = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
        ).to(device)
        if linear.bias is not None:
            quantized.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(model.get_submodule(parent), child, quantized)
        del linear
    # what a 4-bit load sets, and what prepare_model_for_kbit_training looks for
    model.is_loaded_in_4bit = True
    return len(targets)


def build_qlora(config, compute_dtype: torch.dtype, r: int, device: str) -> torch.nn.Module:
    """Random-weight model of `config`, quantized to NF4, prepared for k-bit training, LoRA."""
    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    quantize_linears(model, compute_dtype, device)
    if device == "cuda":
        torch.cuda.empty_cache()
    with warnings.catch_warnings():  # PEFT still calls the deprecated checkpointing API
        warnings.simplefilter("ignore", FutureWarning)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model.config.use_cache = False
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3-8b", help="bundled name or config.json")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures peak CUDA memory, so there is nothing "
              "to measure here (use --device cpu for a smoke test without memory figures)")
        return 0
    config = load_config(args.model)
    dtype = DTYPES[args.dtype]
    estimate = estimate_memory(config, "qlora", lora_r=args.r, batch_size=args.batch,
                               seq_len=args.seq_len, compute_dtype=dtype,
                               adapter_dtype=torch.float32)  # plain PEFT, not TRL
    print(format_estimate(estimate, f"estimate: {args.model}, QLoRA r={args.r}, batch "
                                    f"{args.batch} x {args.seq_len}, {args.dtype}"))
    model = build_qlora(config, dtype, args.r, args.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=args.device,
                        generator=torch.Generator(args.device).manual_seed(SEED))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    model.train()
    for step in range(args.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        print(f"step {step}: loss {loss.item():.3f}, {time.perf_counter() - start:.2f} s")
    if not cuda:
        print("ran on the CPU: no memory figures (this is a smoke test of the steps)")
        return 0
    peak = torch.cuda.max_memory_allocated()
    static_estimate = estimate.weights + estimate.quant_constants + estimate.adapters
    print(f"\n{'':<36}{'measured GB':>12}{'estimate GB':>12}{'ratio':>8}")
    for label, measured, estimated in (
        ("before the first step (model)", static, static_estimate),
        ("peak during the steps", peak, estimate.total),
    ):
        print(f"{label:<36}{measured / GB:>12.2f}{estimated / GB:>12.2f}"
              f"{measured / estimated:>8.2f}")
    print(f"device: {torch.cuda.get_device_name()}; reserved at the end: "
          f"{torch.cuda.memory_reserved() / GB:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
