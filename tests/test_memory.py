"""sft_helpers.memory: hand-computed cases, measured footprints and activations, the command."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from sft_helpers.architectures import config_from_dict, load_config
from sft_helpers.memory import (
    TRL_ADAPTER_DTYPES,
    activation_bytes,
    adapter_activation_bytes,
    estimate_memory,
    footprint,
    main,
    quant_constant_bytes,
    saved_tensor_bytes,
)
from sft_helpers.models import load_model

LLAMA_8B_PARAMS = 8_030_261_248
LLAMA_8B_LORA_R16 = 41_943_040
# Small enough to count by hand: per layer q, o 64x64, k, v 64x32, gate, up, down 64x128.
HAND = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "vocab_size": 100, "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def hand():
    return config_from_dict(HAND)


def test_full_fine_tuning_of_llama_3_8b_in_mixed_precision():
    e = estimate_memory(load_config("llama-3-8b"), "full")
    assert e.weights == e.gradients == 2 * LLAMA_8B_PARAMS
    assert e.master_weights == 4 * LLAMA_8B_PARAMS  # the float32 copy the optimizer updates
    assert e.optimizer_states == 2 * 4 * LLAMA_8B_PARAMS  # AdamW: 2 float32 states
    assert e.quant_constants == e.adapters == 0
    assert e.total == 16 * LLAMA_8B_PARAMS + e.activations
    sgd = estimate_memory(load_config("llama-3-8b"), "full", optimizer="sgd")
    assert sgd.optimizer_states == 0 and sgd.total == e.total - e.optimizer_states


def test_full_fine_tuning_in_pure_bf16_is_8_bytes_per_parameter():
    e = estimate_memory(load_config("llama-3-8b"), "full", mixed_precision=False)
    assert e.master_weights == 0
    assert e.optimizer_states == 2 * 2 * LLAMA_8B_PARAMS  # AdamW: 2 states, bf16 like the params
    assert e.total == 8 * LLAMA_8B_PARAMS + e.activations


def test_mixed_precision_in_float32_needs_no_master_copy():
    e = estimate_memory(load_config("llama-3-8b"), "full", compute_dtype=torch.float32)
    assert e.master_weights == 0 and e.total == 16 * LLAMA_8B_PARAMS + e.activations


def test_lora_adapters_are_float32_and_only_they_train():
    e = estimate_memory(load_config("llama-3-8b"), "lora", lora_r=16)
    assert e.weights == 2 * LLAMA_8B_PARAMS
    assert e.adapters == e.gradients == 4 * LLAMA_8B_LORA_R16
    assert e.optimizer_states == 8 * LLAMA_8B_LORA_R16
    assert e.master_weights == 0


def test_qlora_adapters_are_bf16_as_trl_leaves_them_unless_told():
    config = load_config("llama-3-8b")
    e = estimate_memory(config, "qlora", lora_r=16)
    assert e.adapters == e.gradients == 2 * LLAMA_8B_LORA_R16
    assert e.optimizer_states == 4 * LLAMA_8B_LORA_R16
    plain = estimate_memory(config, "qlora", lora_r=16, adapter_dtype=torch.float32)
    assert plain.adapters == 4 * LLAMA_8B_LORA_R16


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_trl_adapter_dtypes_are_what_the_pinned_trl_does(quantization, tmp_path):
    from sft_helpers.data import read_split
    from sft_helpers.training import train_sft

    model, tokenizer = load_model("tiny", quantization=quantization, dtype=torch.float32)
    conversations = [record["messages"] for record in read_split("train")[:2]]
    trainer = train_sft(model, tokenizer, conversations, output_dir=tmp_path, max_steps=1,
                        batch_size=2, peft_config=LoraConfig(r=4, target_modules="all-linear"),
                        progress=False)
    dtypes = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert dtypes == {TRL_ADAPTER_DTYPES["qlora" if quantization else "lora"]}


def test_qlora_weights_by_hand(hand):
    e = estimate_memory(hand, "qlora", compute_dtype=torch.float32)
    quantized = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # 73,728 weights
    unquantized = 100 * 64 + (2 * 2 + 1) * 64  # tied embedding once, 5 norms
    assert e.weights == quantized // 2 + 4 * unquantized == 63_744
    bf16_loaded = estimate_memory(hand, "qlora", upcast_unquantized=False)
    assert bf16_loaded.weights == quantized // 2 + 2 * unquantized


def test_qlora_constants_by_hand(hand):
    # Per matrix: one uint8 per 64 weights, one float32 per 256 blocks, a float32 offset,
    # the 16-entry NF4 table and the 256-entry 8-bit table (float32).
    def double(blocks):
        return blocks + 4 * (-(-blocks // 256) + 1) + 4 * 16 + 4 * 256

    per_layer = 2 * double(64) + 2 * double(32) + 3 * double(128)
    assert estimate_memory(hand, "qlora").quant_constants == 2 * per_layer == 16_496
    single = 2 * (2 * (64 * 4 + 64) + 2 * (32 * 4 + 64) + 3 * (128 * 4 + 64))
    assert estimate_memory(hand, "qlora", double_quant=False).quant_constants == single == 5_504


def test_double_quantization_bits_per_parameter():
    n = 8192 * 8192
    tables = 4 * (16 + 256)
    assert (quant_constant_bytes(n) - tables) * 8 / n == pytest.approx(0.127, abs=5e-4)
    assert (quant_constant_bytes(n, double_quant=False) - 4 * 16) * 8 / n == 0.5


def test_70b_in_4_bit_is_about_35_gb_of_weights_plus_the_rest():
    e = estimate_memory(load_config("llama-3-70b"), "qlora")
    unquantized = 2 * 128_256 * 8192 + (2 * 80 + 1) * 8192
    packed = e.weights - 4 * unquantized
    assert 34e9 < packed < 35.5e9
    assert 40e9 < e.weights + e.quant_constants + e.adapters < 46e9
    assert e.total > 50e9  # the optimizer, gradients and activations are not free


def test_methods_order_and_checkpointing_saves_memory():
    config = load_config("llama-3-8b")
    totals = [estimate_memory(config, m).total for m in ("qlora", "lora", "full")]
    assert totals == sorted(totals)
    on = estimate_memory(config, "qlora", seq_len=4096)
    off = estimate_memory(config, "qlora", seq_len=4096, gradient_checkpointing=False)
    assert off.activations > 5 * on.activations
    assert estimate_memory(config, "qlora", batch_size=2).activations == pytest.approx(
        2 * estimate_memory(config, "qlora").activations
    )


def test_adapter_activations_by_hand(hand):
    # float32 activations: each adapter keeps r float32 values per token
    assert adapter_activation_bytes(hand, 4, "attention", act_bytes=4) == 4 * 4 * 4
    # bf16 activations: PEFT's float32 copy of each adapted layer's input is kept as well
    assert adapter_activation_bytes(hand, 4, ("q_proj", "down_proj"), 2) == (8 + 64 + 128) * 4
    # bf16 adapters on float32 activations (QLoRA as TRL runs it): a bf16 copy of the input
    assert adapter_activation_bytes(hand, 4, ("q_proj", "down_proj"), 4, 2) == (8 + 64 + 128) * 2


def test_logits_by_hand(hand):
    acts = activation_bytes(hand, batch_size=2, seq_len=5, gradient_checkpointing=True,
                            act_bytes=2)
    assert acts["logits"] == 2 * 5 * 100 * 4 and acts["logits_grad"] == 2 * acts["logits"]


def _train_mode(method: str, checkpointing: bool):
    model, _ = load_model("tiny", quantization="nf4" if method == "qlora" else None)
    model.train()
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if method != "full":
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
        for parameter in model.parameters():  # in the dtype TRL's SFTTrainer leaves them in
            if parameter.requires_grad:
                parameter.data = parameter.data.to(TRL_ADAPTER_DTYPES[method])
    return model


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_activation_estimate_matches_the_saved_tensors(method, checkpointing):
    # On the CPU in float32, measured: what autograd keeps for backward after the forward.
    model = _train_mode(method, checkpointing)
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    measured = saved_tensor_bytes(lambda: model(input_ids=ids, labels=ids).loss, model)
    adapters = None if method == "full" else adapter_activation_bytes(
        model.config, 8, "all-linear", act_bytes=4,
        adapter_bytes=TRL_ADAPTER_DTYPES[method].itemsize)
    acts = activation_bytes(model.config, batch_size=2, seq_len=64, act_bytes=4,
                            gradient_checkpointing=checkpointing,
                            adapter_bytes_per_layer=adapters)
    assert measured == pytest.approx(acts["layers"] + acts["logits"], rel=0.02)


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_estimate_matches_the_measured_footprint_of_a_loaded_model(quantization):
    model, _ = load_model("tiny", quantization=quantization, dtype=torch.float32)
    measured = footprint(model)
    method = "qlora" if quantization else "full"
    e = estimate_memory(model.config, method, compute_dtype=torch.float32)
    assert measured["quant_constants"] == e.quant_constants
    rotary_buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert measured["weights"] == e.weights + rotary_buffers


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "qlora4"}, "method must be one of"),
        ({"optimizer": "adam9"}, "optimizer must be one of"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"seq_len": 1.5}, "seq_len must be a positive integer"),
        ({"compute_dtype": torch.int8}, "compute_dtype must be a floating-point"),
        ({"adapter_dtype": torch.int8}, "adapter_dtype must be a floating-point"),
        ({"target_modules": ("qkv_proj",)}, "no linear layer named qkv_proj"),
        ({"lora_r": 0}, "rank r must be a positive integer"),
    ],
)
def test_bad_input_is_rejected(kwargs, message):
    arguments = {"method": "lora", **kwargs}
    with pytest.raises(ValueError, match=message):
        estimate_memory(load_config("mistral-7b"), arguments.pop("method"), **arguments)


def test_command_prints_the_table(capsys):
    args = ["--model", "llama-3-8b", "--method", "qlora", "--r", "16", "--seq-len", "2048",
            "--batch", "1", "--gpu-gib", "12"]
    assert main(args) == 0
    out = capsys.readouterr().out
    total = estimate_memory(load_config("llama-3-8b"), "qlora").total
    assert f"total{total / 1e9:>26.3f}" in out
    assert "quant_constants" in out and "does NOT fit in 12 GiB" in out


def test_command_reads_a_config_file(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HAND))
    assert main(["--model", str(path), "--method", "full", "--dtype", "float32"]) == 0
    assert "weights" in capsys.readouterr().out


def test_command_rejects_an_unknown_model():
    with pytest.raises(SystemExit, match="unknown model 'llama-9b'"):
        main(["--model", "llama-9b"])
