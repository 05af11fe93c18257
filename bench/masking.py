"""Throughput of loss masking: `tokenize_with_masking` vs the prefix loop vs TRL.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/masking.py [--n 1000] [--repeats 3]

For 1,000 conversations of 2, 4 and 8 assistant turns (random sentences, seeded), prints the
examples per second of
- `tokenize_with_masking` (one template render per conversation),
- `naive_tokenize_with_masking` (the prefix loop: one render per user turn, plus one),
- TRL's own tokenization with `assistant_only_loss=True`: the dataset preparation that
  `SFTTrainer` runs (`SFTTrainer._prepare_dataset`: `apply_chat_template` with
  `return_assistant_tokens_mask=True` on a `{% generation %}` template, then labels),
and the ratios. Times are CPU seconds of this process (`time.process_time`), best of
`--repeats` runs, so that other work on a shared machine inflates them less than wall-clock
time would; all three run in this process (TRL's `datasets.map` with one process).
Targets: >= 5x the prefix loop at 8 turns, and no slower than TRL.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
import warnings

from sft_helpers.masking import naive_tokenize_with_masking, tokenize_with_masking
from sft_helpers.models import load_model
from sft_helpers.templates import with_generation_markers

TURNS = (2, 4, 8)
SEED = 0
WORDS = (
    "the model learns to answer questions about data training loss tokens template "
    "assistant user reply short long because when however first then finally example"
).split()


def sentence(rng: random.Random) -> str:
    words = rng.choices(WORDS, k=rng.randint(8, 40))
    return " ".join(words).capitalize() + "."


def conversations(n: int, turns: int, rng: random.Random) -> list[list[dict]]:
    chats = []
    for _ in range(n):
        chat = [{"role": "system", "content": sentence(rng)}] if rng.random() < 0.5 else []
        for _ in range(turns):
            chat += [{"role": "user", "content": sentence(rng)},
                     {"role": "assistant", "content": sentence(rng)}]
        chats.append(chat)
    return chats


def best_seconds(run, chats, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        run(chats)
        times.append(time.process_time() - start)
    return min(times)


def trl_preparer(model, tokenizer):
    """A function that runs SFTTrainer's dataset preparation on a list of conversations."""
    from datasets import Dataset, disable_progress_bars
    from trl import SFTConfig, SFTTrainer

    disable_progress_bars()
    config = SFTConfig(output_dir=tempfile.mkdtemp(), assistant_only_loss=True,
                       max_length=2048, report_to="none", use_cpu=True)
    one = Dataset.from_dict({"messages": [[{"role": "user", "content": "a"},
                                           {"role": "assistant", "content": "b"}]]})
    trainer = SFTTrainer(model=model, args=config, train_dataset=one, processing_class=tokenizer)

    def prepare(chats):
        dataset = Dataset.from_dict({"messages": chats})
        return trainer._prepare_dataset(dataset, tokenizer, config, False, None, "train")

    return prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)

    model, tokenizer = load_model("tiny")  # TRL needs a model; tokenization does not use it
    _, marked = load_model("tiny")
    marked.chat_template = with_generation_markers(marked.chat_template)
    prepare = trl_preparer(model, marked)
    rng = random.Random(SEED)
    runners = {
        "ours": lambda chats: [tokenize_with_masking(c, tokenizer) for c in chats],
        "naive": lambda chats: [naive_tokenize_with_masking(c, tokenizer) for c in chats],
        "TRL": prepare,
    }

    print(f"{args.n} conversations per row, best of {args.repeats}; examples per CPU second")
    print(f"{'turns':>5} {'ours':>8} {'naive':>8} {'TRL':>8} {'ours/naive':>11} {'ours/TRL':>9}")
    for turns in TURNS:
        chats = conversations(args.n, turns, rng)
        # Same tokens on both sides: TRL's first row equals ours.
        row = prepare(chats[:1])[0]
        assert row["labels"] == tokenize_with_masking(chats[0], tokenizer)["labels"].tolist()
        timed = {name: best_seconds(run, chats, args.repeats) for name, run in runners.items()}
        rate = {name: args.n / seconds for name, seconds in timed.items()}
        print(f"{turns:>5} {rate['ours']:>8.0f} {rate['naive']:>8.0f} {rate['TRL']:>8.0f} "
              f"{rate['ours'] / rate['naive']:>10.1f}x {rate['ours'] / rate['TRL']:>8.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
