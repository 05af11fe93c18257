"""The course on one CUDA GPU, in one prepared run of a few minutes.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/gpu_check.py [--steps 8]

Loads the default model in NF4 on CUDA, trains the capstone's QLoRA recipe
(configs/capstone.yaml) for a few steps, generates the capstone's held-out triage replies,
and prints one table: the dtype the course picks for this GPU, peak CUDA memory of the
training steps next to `sft_helpers.memory`'s estimate, training tokens/s and generation
tokens/s. Without CUDA it says so and exits with status 0 (CI never has a GPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "capstone.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (this script runs on a GPU machine)")
        return 0

    from transformers.utils import logging as transformers_logging

    from sft_helpers.architectures import load_config
    from sft_helpers.data import read_conversations, read_jsonl
    from sft_helpers.generation import evaluate_sft_model
    from sft_helpers.memory import GB, estimate_memory
    from sft_helpers.models import load_model
    from sft_helpers.runtime import pick_dtype
    from sft_helpers.train import load_train_config
    from sft_helpers.training import run_summary, train_arguments, train_sft
    from sft_helpers.triage import EVAL_FILE

    transformers_logging.disable_progress_bar()
    dtype = pick_dtype("cuda")
    with tempfile.TemporaryDirectory() as work:
        config = load_train_config(CONFIG, output_dir=work, max_steps=args.steps)
        training = config["training"]
        model, tokenizer = load_model(config["model"]["profile"], quantization="nf4",
                                      device="cuda")
        records = read_conversations(Path(config["data"]["train"]))
        torch.cuda.reset_peak_memory_stats()
        trainer = train_sft(model, tokenizer, [r["messages"] for r in records],
                            output_dir=work, progress=False, **train_arguments(config))
        peak = torch.cuda.max_memory_allocated()
        summary = run_summary(trainer)
        prompts = [{"instruction": row["message"]} for row in read_jsonl(EVAL_FILE)]
        trainer.model.eval()
        torch.cuda.synchronize()
        start = time.perf_counter()
        results = evaluate_sft_model(trainer.model, tokenizer, prompts, max_new_tokens=32,
                                     do_sample=False, progress=False)
        torch.cuda.synchronize()
        generation_s = time.perf_counter() - start
    estimate = estimate_memory(
        load_config("smollm2-135m"), "qlora", lora_r=config["lora"]["r"],
        batch_size=training["batch_size"], seq_len=training["max_length"], compute_dtype=dtype,
        gradient_checkpointing=False,  # the course turns it off (sft_helpers.training)
    )
    generated = sum(r["n_tokens"] for r in results)
    rows = {
        "device": torch.cuda.get_device_name(),
        "compute capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "dtype chosen (pick_dtype)": str(dtype).removeprefix("torch."),
        "training steps": f"{len(summary['loss'])} of {training['batch_size']} x "
                          f"<= {training['max_length']} tokens",
        "peak CUDA memory, training": f"{peak / GB:.2f} GB",
        "estimate (sft_helpers.memory)": f"{estimate.total / GB:.2f} GB "
                                         f"(measured / estimate {peak / estimate.total:.2f})",
        "training tokens/s": f"{summary['train_tokens'] / summary['train_seconds']:.0f}",
        "generation tokens/s": f"{generated / generation_s:.0f} ({len(prompts)} prompts, "
                               f"greedy, {generated} tokens)",
        "loss, first -> last step": f"{summary['loss'][0]:.3f} -> {summary['loss'][-1]:.3f}",
    }
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
