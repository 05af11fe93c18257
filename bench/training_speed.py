"""Training throughput of the course recipe as `train_sft` runs it, against earlier settings.

Every run trains the course recipe's LoRA adapter (`sft_helpers.training.RECIPE`) from the
default model, on the same conversations in the same order (one seed), with one setting
changed, each in a process of its own:

- collation: a batch padded to its longest conversation (TRL's default collator, what
  `train_sft` did before) or padding-free (the conversations of a batch concatenated into
  one row, positions restarting at each; what `train_sft` does now);
- glibc's memory allocator: its defaults, which hand freed blocks of more than a few MB
  back to the system, so that every step maps its large buffers anew and pays a page fault
  per 4 KB page touched; or the settings the Makefile exports (`MALLOC_*`, read from it
  here), which keep freed memory for the next step;
- the positions TRL's fused LM head scores: every one (what TRL does off CUDA) or only
  those with a label (`train_sft`'s `trained_positions_only`, what it does now).

It prints, side by side from one run, the real (non-pad) tokens trained per second of
each (per step, the first step left out: it pays for allocating buffers), each one's ratio
to the earlier settings (padded, glibc's defaults) at the recipe's batch size, and the
largest difference between the padded and the padding-free loss at any step (the two
compute the same loss; `LOSS_TOLERANCE` is what float32 rounding may change), and whether
scoring only the trained positions gave the same loss at every step:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/training_speed.py [--conversations 48]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"
# Padded and padding-free batches add the same per-token losses in a different order;
# float32 rounding, carried through a few optimizer steps, moves the logged loss by less.
LOSS_TOLERANCE = 1e-3


def allocator_settings() -> dict[str, str]:
    """The `export MALLOC_...` lines of the Makefile, the one place they are set."""
    found = dict(re.findall(r"^export (MALLOC_\w+) := (\S+)$", MAKEFILE.read_text(), re.M))
    if not found:
        raise SystemExit(f"{MAKEFILE} exports no MALLOC_ settings")
    return found


def measure(n: int, batch_size: int, padding_free: bool, trained_only: bool) -> dict:
    """Train `n / batch_size` steps (the seeded shuffle gives every batch size the same `n`
    conversations); the tokens/s of steps 2 onwards and the loss per step."""
    from sft_helpers.data import read_split
    from sft_helpers.models import load_model
    from sft_helpers.training import (
        RECIPE,
        loss_history,
        steady_tokens_per_s,
        step_clock,
        train_arguments,
        train_sft,
    )

    model, tokenizer = load_model(RECIPE["model"]["profile"])
    conversations = [r["messages"] for r in read_split("train")]
    clock = step_clock()
    arguments = {**train_arguments(RECIPE), "batch_size": batch_size,
                 "max_steps": n // batch_size}
    with tempfile.TemporaryDirectory() as work:
        trainer = train_sft(model, tokenizer, conversations, output_dir=work, progress=False,
                            padding_free=padding_free, trained_positions_only=trained_only,
                            callbacks=[clock], **arguments)
    return {"tokens_per_s": steady_tokens_per_s(trainer, clock),
            "loss": loss_history(trainer), "steps": len(clock.seconds)}


def in_process(n: int, batch_size: int, padding_free: bool, trained_only: bool,
               allocator: dict) -> dict:
    """`measure` in a fresh Python process whose environment has exactly `allocator`'s
    MALLOC_ settings (glibc reads them when a process starts)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | allocator
    out = subprocess.run(
        [sys.executable, __file__, "--measure", str(n), str(batch_size), str(int(padding_free)),
         str(int(trained_only))],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=48,
                        help="conversations each run trains on")
    parser.add_argument("--measure", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        n, batch, padding_free, trained_only = args.measure
        print(json.dumps(measure(n, batch, bool(padding_free), bool(trained_only))))
        return

    from sft_helpers.training import RECIPE

    batch = RECIPE["training"]["batch_size"]
    if batch == 1 or args.conversations % batch:
        parser.error(f"the recipe's batch size is {batch}: padding has nothing to remove "
                     "at 1, and --conversations must be a multiple of it")
    kept = allocator_settings()
    every, trained = "every position", "trained positions"
    earliest = (batch, "padded", "glibc defaults", every)
    before_head = (batch, "padding-free", "freed memory kept", every)
    today = (batch, "padding-free", "freed memory kept", trained)
    settings = [  # (batch, collation, allocator, positions the LM head scores)
        earliest,
        (batch, "padding-free", "glibc defaults", every),
        before_head,
        today,
        (1, "one conversation", "glibc defaults", every),
        (1, "one conversation", "freed memory kept", every),
    ]
    runs = {(size, collation, allocator, head): in_process(
                args.conversations, size, collation == "padding-free", head == trained,
                kept if allocator == "freed memory kept" else {})
            for size, collation, allocator, head in settings}
    earlier = runs[earliest]["tokens_per_s"]
    print(f"{args.conversations} conversations per run, the course recipe otherwise "
          f"(allocator settings kept: {', '.join(f'{k}={v}' for k, v in kept.items())})")
    print("| batch | collation | allocator | LM head scores | steps | real tokens/s "
          "| vs earlier settings |")
    print("|---|---|---|---|---|---|---|")
    for (size, collation, allocator, head), run in runs.items():
        print(f"| {size} | {collation} | {allocator} | {head} | {run['steps']} | "
              f"{run['tokens_per_s']:.0f} | {run['tokens_per_s'] / earlier:.2f} |")
    course = runs[today]
    print(f"the course recipe as train_sft runs it (`make`), against the same recipe with the "
          f"earlier settings: {course['tokens_per_s'] / earlier:.2f}x")
    print(f"scoring only the trained positions: "
          f"{course['tokens_per_s'] / runs[before_head]['tokens_per_s']:.2f}x, the same loss "
          f"at every step: {course['loss'] == runs[before_head]['loss']}")
    gap = max(abs(a - b) for a, b in zip(runs[earliest]["loss"], course["loss"], strict=True))
    verdict = "within" if gap <= LOSS_TOLERANCE else "OUTSIDE"
    print(f"loss, padded vs padding-free, largest gap over {course['steps']} steps: "
          f"{gap:.2e} ({verdict} the tolerance {LOSS_TOLERANCE:g})")


if __name__ == "__main__":
    main()
