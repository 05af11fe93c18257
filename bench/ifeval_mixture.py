"""The training-mixture experiment of notebook 07, run once and saved.

The mixed adapter is the course recipe (`sft_helpers.training.RECIPE`, the same budget as
the course adapter) trained on the 374 course conversations plus the 172 instruction-following
ones of `ifeval_train.jsonl`. This script trains it (cached like every course adapter),
generates its greedy replies to the benchmark's prompts (`ifeval.benchmark`) and to the 65
held-out course prompts (`evaluation.measure_compliance`), prints their scores and writes
the replies, with the adapter's cache key, recipe and training time:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ifeval_mixture.py [--profile P] \
        [--write bench/results/ifeval_mixture.json]

Notebook 07 scores the saved replies instead of spending four minutes of its time limit on
them; it checks that the saved key is the one the current recipe and data give, so a change
to either makes it ask for this script to be run again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None, help="model profile (default: the course's)")
    parser.add_argument("--write", type=Path, help="a JSON file to write the replies to")
    args = parser.parse_args()

    from sft_helpers.data import read_split
    from sft_helpers.evaluation import format_rate, measure_compliance
    from sft_helpers.ifeval import benchmark, mixture_folder
    from sft_helpers.models import DEFAULT_PROFILE
    from sft_helpers.training import (
        adapter_key,
        course_adapter,
        load_course_model,
        recipe_with,
        training_log,
    )

    profile = args.profile or DEFAULT_PROFILE
    data_dir = mixture_folder()
    adapter = course_adapter(profile=profile, data_dir=data_dir)
    model, tokenizer = load_course_model(adapter, merge=True)
    scores, ifeval_replies = benchmark(model, tokenizer, progress=False)
    table, course_replies = measure_compliance(model, tokenizer, read_split("eval"),
                                              progress=False)
    log = training_log(adapter)
    print(f"mixed adapter ({profile}): trained {log['train_seconds']:.0f} s")
    for level in ("prompt_strict", "instruction_strict"):
        print(f"  IFEval's rule, {level:18}: {format_rate(scores['ifeval'][level])}")
        print(f"  whole replies, {level:18}: {format_rate(scores['whole'][level])}")
    for metric in ("house_style", "stopped", "loops"):
        print(f"  course prompts, {metric:17}: {format_rate(table[metric])}")
    if args.write:
        saved = {"profile": profile,
                 "adapter_key": adapter_key(recipe_with(profile=profile), data_dir),
                 "config": log["config"], "train_seconds": log["train_seconds"],
                 "ifeval": ifeval_replies, "course": course_replies}
        args.write.write_text(json.dumps(saved, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
