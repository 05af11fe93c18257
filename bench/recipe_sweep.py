"""The course recipe, chosen by measurement: train a handful of settings, score each one.

Each setting is the course recipe (`sft_helpers.training.RECIPE`) with a few values changed.
Every run trains the course adapter through `course_adapter` (so it is cached, and the
notebook that uses the chosen one loads it), then answers the 65 held-out prompts greedily
with room for a whole reply and prints, for each: training seconds, eval loss on the
held-out references, and the whole-reply metrics with k/n and 95% intervals (house style,
stop rate, loop rate, persona), next to the untrained model's:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/recipe_sweep.py [--only NAME ...] [--replies DIR] \
        [--write bench/results/recipe_sweep.json]

`--write` puts the rows it ran into the saved table (replacing rows of the same name).
Every row but the last two trained on the course data before seven of its replies, whose
details opened by repeating the answer line, were fixed; the last two train the chosen recipe
on the fixed data (a rerun of the whole sweep trains every row on today's data).
Timings come from the session that ran each row (the saved table holds three sessions on
machines of one kind: compare times within one); settings that run while the machine is
busy with other work read slower. The rows up to "96 x 1" trained padded batches, the "x 4" rows
after them padding-free ones (`train_sft`'s default since; the same loss, a faster step:
bench/training_speed.py), under the Makefile's allocator settings.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

# The recipe the course used before this sweep; every setting below changes it, and names
# all its steps and batch size, so a rerun trains exactly these runs whatever RECIPE is now.
EARLIER = {"max_steps": 24, "batch_size": 4, "learning_rate": 3e-3,
           "lr_scheduler": "constant_with_warmup", "max_length": 192, "layers": list(range(18, 30))}
# The recipe the course used before the rows that vary the layers (the top 12, 32 x 4), and
# the same on all 30 layers.
PREVIOUS = {**EARLIER, "max_steps": 32}
ALL_LAYERS = {**PREVIOUS, "layers": None}
SETTINGS = {
    "old: lr 3e-3 constant, 24 x 4": EARLIER,
    "lr 1e-3 constant": {**EARLIER, "learning_rate": 1e-3},
    "lr 3e-3 cosine": {**EARLIER, "lr_scheduler": "cosine"},
    "lr 3e-3 cosine, max_length 256": {**EARLIER, "lr_scheduler": "cosine", "max_length": 256},
    "lr 3e-3 cosine, 40 x 4, top 6 layers": {
        **EARLIER, "lr_scheduler": "cosine", "max_steps": 40, "layers": list(range(24, 30)),
    },
    "lr 3e-3 constant, 48 x 2": {**EARLIER, "max_steps": 48, "batch_size": 2},
    "lr 2e-3 constant, 48 x 2": {**EARLIER, "learning_rate": 2e-3, "max_steps": 48,
                                 "batch_size": 2},
    "lr 3e-3 constant, 96 x 1": {**EARLIER, "max_steps": 96, "batch_size": 1},
    "lr 3e-3 constant, 32 x 4": PREVIOUS,
    "lr 3e-3 constant, 48 x 4": {**EARLIER, "max_steps": 48},
    # The same 32 x 4 with another seed: how far one run's scores move by chance.
    "lr 3e-3 constant, 32 x 4, seed 1": {**PREVIOUS, "seed": 1},
    "lr 5e-3 constant, 32 x 4": {**PREVIOUS, "learning_rate": 5e-3},
    "lr 3e-3 constant, 32 x 4, r 16": {**PREVIOUS, "r": 16, "alpha": 32},
    "lr 2e-3 cosine, 64 x 4": {**PREVIOUS, "max_steps": 64, "learning_rate": 2e-3,
                               "lr_scheduler": "cosine", "warmup_steps": 4},
    # Where the adapters go: backpropagation reaches down to the lowest adapted layer.
    "lr 3e-3 constant, 32 x 4, layers 8-29": {**PREVIOUS, "layers": list(range(8, 30))},
    "lr 3e-3 constant, 32 x 4, layers 8-29, seed 1": {**PREVIOUS, "layers": list(range(8, 30)),
                                                       "seed": 1},
    "lr 3e-3 constant, 24 x 4, all 30 layers": {**ALL_LAYERS, "max_steps": 24},
    "lr 3e-3 constant, 32 x 4, all 30 layers": ALL_LAYERS,
    "lr 3e-3 constant, 32 x 4, all 30 layers, seed 1": {**ALL_LAYERS, "seed": 1},
    "lr 4e-3 constant, 32 x 4, all 30 layers": {**ALL_LAYERS, "learning_rate": 4e-3},
    "lr 4e-3 constant, 32 x 4, all 30 layers, seed 1": {**ALL_LAYERS, "learning_rate": 4e-3,
                                                        "seed": 1},
    # The chosen recipe again, on the course data after seven replies whose details opened by
    # repeating the answer line were fixed (the rows above trained on the data before).
    "lr 4e-3 constant, 32 x 4, all 30 layers, details fixed": {**ALL_LAYERS,
                                                               "learning_rate": 4e-3},
    "lr 4e-3 constant, 32 x 4, all 30 layers, details fixed, seed 1": {
        **ALL_LAYERS, "learning_rate": 4e-3, "seed": 1},
}
UNTRAINED = "untrained model"
COLUMNS = ("house_style", "stopped", "loops", "persona", "opening")


def score(model, tokenizer, records, references, save: Path | None) -> dict:
    from sft_helpers.evaluation import eval_loss, measure_compliance

    start = time.perf_counter()
    table, results = measure_compliance(model, tokenizer, records, progress=False)
    seconds = time.perf_counter() - start
    if save is not None:
        save.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return {**table, "eval loss": eval_loss(model, tokenizer, references)["loss"],
            "generate s": seconds}


def summary(name: str, config: dict | None, train_s: float | None, scores: dict) -> dict:
    """One row of the table as data (`config`: the whole recipe trained, None for the
    untrained model): what `--write` saves and notebook 03 plots."""
    return {"recipe": name, "config": config, "train_seconds": train_s,
            "eval_loss": scores["eval loss"], **{c: scores[c] for c in COLUMNS}}


def merged(path: Path, rows: list[dict]) -> list[dict]:
    """The table in `path` with `rows` put in: a row of the same recipe name is replaced in
    place, a new one is added at the end (so `--only` runs add to the saved table).

    >>> merged(Path("no-such-file.json"), [{"recipe": "a"}])
    [{'recipe': 'a'}]
    """
    saved = json.loads(path.read_text()) if path.exists() else []
    fresh = {r["recipe"]: r for r in rows}
    kept = [fresh.pop(r["recipe"], r) for r in saved]
    return kept + list(fresh.values())


def row(name: str, train_s: float | None, scores: dict) -> str:
    from sft_helpers.evaluation import format_rate

    train = "-" if train_s is None else f"{train_s:.0f}"
    cells = [format_rate(scores[c]) for c in COLUMNS]
    return (f"| {name} | {train} | {scores['eval loss']:.2f} | " + " | ".join(cells)
            + f" | {scores['generate s']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*",
                        help=f"names of the settings to run ({UNTRAINED!r} included)")
    parser.add_argument("--replies", type=Path, help="a folder to write each run's replies to")
    parser.add_argument("--write", type=Path, help="a JSON file to write the table to")
    args = parser.parse_args()
    if args.replies:
        args.replies.mkdir(parents=True, exist_ok=True)

    def save(name: str) -> Path | None:
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        return args.replies / f"{slug}.json" if args.replies else None

    from sft_helpers.data import read_split
    from sft_helpers.models import load_model
    from sft_helpers.training import course_adapter, load_course_model, training_log

    records = read_split("eval")
    references = [r["messages"] + [{"role": "assistant", "content": r["reference"]}]
                  for r in records]
    print("| recipe | train s | eval loss | " + " | ".join(COLUMNS) + " | generate s |")
    print("|---" * (len(COLUMNS) + 4) + "|")
    base, tokenizer = load_model()
    rows = []
    if not args.only or UNTRAINED in args.only:
        scores = score(base, tokenizer, records, references, save("untrained"))
        rows.append(summary(UNTRAINED, None, None, scores))
        print(row(UNTRAINED, None, scores), flush=True)
    for name, settings in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        adapter = course_adapter(**settings)
        model, _ = load_course_model(adapter, merge=True)
        train_s = training_log(adapter)["train_seconds"]
        scores = score(model, tokenizer, records, references, save(name))
        rows.append(summary(name, training_log(adapter)["config"], train_s, scores))
        print(row(name, train_s, scores), flush=True)
    if args.write:
        args.write.write_text(json.dumps(merged(args.write, rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
