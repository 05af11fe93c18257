"""Greedy generation: `evaluate_sft_model` against a plain `model.generate` loop, one run.

Both answer the same held-out prompts of the course (greedy, the same `max_new_tokens`),
the plain loop 8 prompts at a time in the prompts' order, as a tutorial writes it. The
script prints each one's generated tokens per second (tokens up to the end of turn, the
tokens a reader gets), the ratio, and checks that both produced exactly the same replies:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/generation.py [--max-new-tokens 64] [--prompts 64]
"""

from __future__ import annotations

import argparse
import time

import torch

PLAIN_BATCH = 8


def plain_loop(model, tokenizer, chats, max_new_tokens: int) -> list[str]:
    """The loop a tutorial writes: batches of 8, left padding, `generate`, decode."""
    from sft_helpers.generation import left_padded

    eos = tokenizer.eos_token_id
    replies = []
    for start in range(0, len(chats), PLAIN_BATCH):
        texts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                 for chat in chats[start:start + PLAIN_BATCH]]
        inputs = left_padded(tokenizer, texts, model.device)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        for row in output[:, inputs["input_ids"].shape[1]:].tolist():
            kept = row[: row.index(eos)] if eos in row else row
            replies.append(tokenizer.decode(kept, skip_special_tokens=True))
    return replies


def main() -> None:
    from transformers.utils import logging as transformers_logging

    from sft_helpers.data import read_split
    from sft_helpers.generation import BATCH_SIZE, evaluate_sft_model
    from sft_helpers.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=64)
    args = parser.parse_args()
    transformers_logging.disable_progress_bar()
    model, tokenizer = load_model()
    records = read_split("eval")[: args.prompts]
    chats = [r["messages"] for r in records]

    start = time.perf_counter()
    plain = plain_loop(model, tokenizer, chats, args.max_new_tokens)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = evaluate_sft_model(model, tokenizer, records, max_new_tokens=args.max_new_tokens,
                              do_sample=False, progress=False)
    ours_s = time.perf_counter() - start

    tokens = sum(r["n_tokens"] for r in ours)
    same = sum(a == b["generated"] for a, b in zip(plain, ours, strict=True))
    print(f"{len(records)} prompts, greedy, max_new_tokens={args.max_new_tokens}, "
          f"{tokens} generated tokens, {torch.get_num_threads()} threads")
    print(f"plain generate loop, batch {PLAIN_BATCH}:    {plain_s:6.1f} s  "
          f"{tokens / plain_s:6.1f} tokens/s")
    print(f"evaluate_sft_model, batch {BATCH_SIZE}:    {ours_s:6.1f} s  "
          f"{tokens / ours_s:6.1f} tokens/s")
    print(f"ratio: {plain_s / ours_s:.2f}x; identical replies: {same} of {len(records)}")
    if same != len(records):
        raise SystemExit("the replies differ: the faster path changed what is generated")


if __name__ == "__main__":
    main()
