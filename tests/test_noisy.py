"""sft_helpers.noisy: every planted defect is caught by the rule of its name, the labelled set
is a seeded build, and precision/recall count what they say."""

from __future__ import annotations

import copy
import itertools
import random

import pytest

from sft_helpers import noisy
from sft_helpers.data import read_split, write_jsonl
from sft_helpers.noisy import (
    DEFECTS,
    NOISY_PER_DEFECT,
    build_noisy_dataset,
    filter_table,
    inject_defect,
    load_noisy_dataset,
    precision_recall,
)
from sft_helpers.quality import flag_dataset, quality_report


def chat(*turns: str, roles=("user", "assistant")) -> list[dict]:
    """A conversation whose roles cycle through `roles`."""
    return [{"role": r, "content": t} for r, t in zip(itertools.cycle(roles), turns)]


def house_style_chat(i: int) -> list[dict]:
    """A clean conversation in house style whose words depend on `i` (distinct texts)."""
    rng = random.Random(i)
    words = [f"{rng.choice('bcdfgklmnprstvz')}{rng.choice('aeiou')}{j}{i}" for j in range(24)]
    return chat(
        f"What do {' '.join(words[:5])} mean?",
        f"They mean {' '.join(words[5:9])}.\n\n### Details\n{' '.join(words[9:])}.",
    )


@pytest.mark.parametrize("defect", [d for d in DEFECTS if d != "eval_contamination"])
def test_each_injected_defect_is_caught_by_its_rule(defect):
    source = house_style_chat(3)
    injected = inject_defect(source, defect, random.Random(0))
    assert source == house_style_chat(3)  # the input is untouched
    if defect in ("duplicate", "near_duplicate"):
        flagged = flag_dataset([{"messages": source}, {"messages": injected}])
        assert flagged[1]["reasons"] == [defect]
    else:
        found = quality_report(injected)
        assert defect in found, found


def test_inject_rejects_unknown_defect():
    with pytest.raises(ValueError, match="cannot inject 'eval_contamination'"):
        inject_defect(house_style_chat(1), "eval_contamination", random.Random(0))


def test_build_noisy_dataset_labels_and_order():
    clean = [{"messages": house_style_chat(i)} for i in range(120)]
    eval_examples = [{"messages": house_style_chat(i)} for i in range(1000, 1020)]
    noisy = build_noisy_dataset(clean, eval_examples, per_defect=4, seed=1)
    labels = [row["defect"] for row in noisy]
    assert len(noisy) == 120 + 3 * 4
    assert all(labels.count(d) == 4 for d in DEFECTS)
    assert labels.count("none") == 120 - 6 * 4
    assert noisy == build_noisy_dataset(clean, eval_examples, per_defect=4, seed=1)
    assert noisy != build_noisy_dataset(clean, eval_examples, per_defect=4, seed=2)
    flagged = flag_dataset(noisy, eval_examples)
    table = {
        row["defect"]: row
        for row in filter_table([r["reasons"] for r in flagged], labels, [True] * len(labels))
    }
    # on this synthetic data every rule finds exactly its defect: copies come after sources
    assert all(table[d]["rule recall"] == 1.0 for d in DEFECTS), table
    assert all(table[d]["rule precision"] == 1.0 for d in DEFECTS), table
    assert table["any defect"]["baseline recall"] == 0.0  # the baseline kept everything here


def test_precision_recall_edge_cases():
    assert precision_recall([False, False], ["none", "too_short"]) == (None, 0.0)
    assert precision_recall([True], ["none"], "too_short") == (0.0, None)
    with pytest.raises(ValueError, match="2 flags but 1 labels"):
        precision_recall([True, False], ["none"])


# --- the shipped noisy set -----------------------------------------------------------------


def test_shipped_noisy_set_is_the_seeded_build():
    train, eval_records = read_split("train"), read_split("eval")
    shipped = load_noisy_dataset()
    assert shipped == build_noisy_dataset(train, eval_records, seed=0)
    labels = [row["defect"] for row in shipped]
    assert all(labels.count(d) == NOISY_PER_DEFECT for d in DEFECTS)


def test_load_noisy_dataset_names_a_bad_line(tmp_path):
    path = tmp_path / "noisy.jsonl"
    write_jsonl([{"messages": [], "defect": "none"}, {"messages": [], "defect": "typo"}], path)
    with pytest.raises(ValueError, match="noisy.jsonl line 2: no known 'defect'"):
        load_noisy_dataset(path)
    path.write_text('{"defect": "none"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_noisy_dataset(path)


def test_with_defect_plants_the_defect_in_the_given_share():
    clean = read_split("train")
    before = copy.deepcopy(clean)
    rows = noisy.with_defect(clean, "sycophantic_opener", 0.3, seed=1)
    assert clean == before  # the input is left untouched
    planted = [row["defect"] != noisy.CLEAN for row in rows]
    assert sum(planted) == round(0.3 * len(clean))
    for row, source, is_planted in zip(rows, clean, planted, strict=True):
        assert (row["messages"] != source["messages"]) == is_planted
        assert row["id"] == source["id"]
        assert ("sycophantic_opener" in quality_report(row["messages"])) == is_planted
    assert noisy.with_defect(clean, "sycophantic_opener", 0.3, seed=1) == rows


@pytest.mark.parametrize(("defect", "rate", "message"), [
    ("duplicate", 0.3, "plants a defect in place"),
    ("typo", 0.3, "plants a defect in place"),
    ("too_short", 1.5, "between 0 and 1"),
])
def test_with_defect_rejects_bad_arguments(defect, rate, message):
    with pytest.raises(ValueError, match=message):
        noisy.with_defect(read_split("train")[:4], defect, rate)
