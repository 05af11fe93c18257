"""The capstone's ticket-triage data is what its data card says: clean rows are clean, and
every planted defect listed in capstone_defects.json really is that defect (and nothing else).

The detectors below are the plain definitions of each defect, built on sft_helpers.quality;
they are the ground truth's check, not the notebook's filter.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter

import pytest

from sft_helpers.data import DATA_DIR
from sft_helpers.quality import (
    GARBAGE,
    NEAR_DUPLICATE_THRESHOLD,
    contamination,
    jaccard,
    normalise,
    shingles,
)

CATEGORIES = ("billing", "bug", "account", "feature", "other")
FIELDS = ("id", "message", "category", "urgent")
MAX_WORDS = 120  # longer than this is a pasted log or email, not a support message
MIN_PER_CATEGORY = {"raw": 25, "eval": 6}
URGENT_SHARE = (0.25, 0.35)
# How many of each defect the data card says were planted.
PLANTED = {
    "exact_duplicate": 6,
    "near_duplicate": 4,
    "empty": 3,
    "bad_label": 3,
    "garbage": 2,
    "too_long": 2,
    "eval_leak": 4,
}


def read_jsonl(name: str) -> list[dict]:
    lines = (DATA_DIR / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


RAW = read_jsonl("capstone_raw.jsonl")
EVAL = read_jsonl("capstone_eval.jsonl")
DEFECTS = json.loads((DATA_DIR / "capstone_defects.json").read_text(encoding="utf-8"))
CLEAN = [row for row in RAW if row["id"] not in DEFECTS]
EVAL_TEXTS = [row["message"] for row in EVAL]


@functools.cache  # every message is compared with every other: shingle each one once
def shingle_set(text: str) -> frozenset[str]:
    return frozenset(shingles(text))


EVAL_SHINGLES = [shingle_set(text) for text in EVAL_TEXTS]


def most_similar(text: str, others: list[frozenset[str]]) -> float:
    """The highest Jaccard similarity of `text`'s shingles to any of `others` (0.0 if none)."""
    own = shingle_set(text)
    return max((jaccard(own, other) for other in others), default=0.0)


def detected(row: dict, earlier_clean: list[str], other_clean: list[str]) -> set[str]:
    """The defect names whose definition `row` meets. `earlier_clean` are the clean messages
    before it in the file (an exact copy repeats one of them); `other_clean` are all clean
    messages except its own (a near copy is similar to one but not identical)."""
    text = row["message"]
    found = set()
    if normalise(text) in {normalise(m) for m in earlier_clean}:
        found.add("exact_duplicate")
    near = [shingle_set(m) for m in other_clean if normalise(m) != normalise(text)]
    if text.strip() and most_similar(text, near) >= NEAR_DUPLICATE_THRESHOLD:
        found.add("near_duplicate")
    if not text.strip():
        found.add("empty")
    if row["category"] not in CATEGORIES:
        found.add("bad_label")
    if GARBAGE.search(text):
        found.add("garbage")
    if len(text.split()) > MAX_WORDS:
        found.add("too_long")
    leaks = contamination([text], EVAL_TEXTS)[0] is not None
    if leaks or (text.strip() and most_similar(text, EVAL_SHINGLES) >= NEAR_DUPLICATE_THRESHOLD):
        found.add("eval_leak")
    return found


def clean_before(index: int) -> list[str]:
    return [row["message"] for row in RAW[:index] if row["id"] not in DEFECTS]


def clean_except(row_id: str) -> list[str]:
    return [row["message"] for row in CLEAN if row["id"] != row_id]


# --- schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "pattern", "count"),
    [(RAW, r"raw-\d{4}", 200), (EVAL, r"ceval-\d{2}", 40)],
    ids=["raw", "eval"],
)
def test_schema(rows, pattern, count):
    assert len(rows) == count
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == len(ids), "ids must be unique"
    for row in rows:
        assert tuple(row) == FIELDS, f"{row['id']}: fields {tuple(row)}"
        assert re.fullmatch(pattern, row["id"]), row["id"]
        assert isinstance(row["message"], str), row["id"]
        assert isinstance(row["category"], str), row["id"]
        assert isinstance(row["urgent"], bool), row["id"]


def test_defect_file_names_real_rows_with_known_defects():
    ids = {row["id"] for row in RAW}
    assert set(DEFECTS) <= ids
    assert Counter(DEFECTS.values()) == PLANTED


def test_eval_labels_valid_and_eval_rows_distinct():
    assert all(row["category"] in CATEGORIES for row in EVAL)
    normalised = [normalise(text) for text in EVAL_TEXTS]
    assert len(set(normalised)) == len(normalised)
    for i, text in enumerate(EVAL_TEXTS):
        assert text.strip() and len(text.split()) <= MAX_WORDS and not GARBAGE.search(text)
        others = EVAL_SHINGLES[:i] + EVAL_SHINGLES[i + 1 :]
        assert most_similar(text, others) < NEAR_DUPLICATE_THRESHOLD, EVAL[i]["id"]


@pytest.mark.parametrize(("name", "rows"), [("raw", CLEAN), ("eval", EVAL)])
def test_category_balance_and_urgent_share(name, rows):
    counts = Counter(row["category"] for row in rows)
    assert set(counts) == set(CATEGORIES)
    assert min(counts.values()) >= MIN_PER_CATEGORY[name], counts
    share = sum(row["urgent"] for row in rows) / len(rows)
    assert URGENT_SHARE[0] <= share <= URGENT_SHARE[1], share


def test_feature_requests_are_never_urgent():
    """A suggestion never blocks anyone now: an urgent feature row would be a mislabel."""
    assert not any(row["urgent"] for row in [*RAW, *EVAL] if row["category"] == "feature")


# --- planted defects -----------------------------------------------------------------------


@pytest.mark.parametrize("index", [i for i, row in enumerate(RAW) if row["id"] in DEFECTS])
def test_each_planted_defect_is_exactly_that_defect(index):
    row = RAW[index]
    found = detected(row, clean_before(index), clean_except(row["id"]))
    assert found == {DEFECTS[row["id"]]}, f"{row['id']} {row['message'][:60]!r}"


def test_no_unlisted_row_is_defective():
    """The same detectors, run on every clean row against the other clean rows, find nothing."""
    for index, row in enumerate(RAW):
        if row["id"] not in DEFECTS:
            found = detected(row, clean_before(index), clean_except(row["id"]))
            assert not found, f"{row['id']} is {found} but not listed: {row['message'][:60]!r}"


def test_detectors_fire_on_a_planted_example():
    """The detectors can fail: a clean row made into each defect is caught."""
    row, others = CLEAN[0], clean_except(CLEAN[0]["id"])
    copy = {**row, "message": row["message"] + " Thanks!"}
    assert detected(copy, [], [row["message"], *others]) == {"near_duplicate"}
    assert detected(row, [row["message"]], others) == {"exact_duplicate"}
    leak = {**row, "message": "Hello. " + EVAL_TEXTS[0]}
    assert detected(leak, [], others) == {"eval_leak"}
    assert detected({**row, "category": "Bug"}, [], others) == {"bad_label"}


def test_urgent_labels_cover_each_kind_of_urgency():
    """Urgent rows exist in billing, bug and account (money now, blocked now, safety)."""
    urgent = Counter(row["category"] for row in CLEAN if row["urgent"])
    assert all(urgent[category] >= 8 for category in ("billing", "bug", "account"))


# --- the data card states these numbers ----------------------------------------------------

CARD = (DATA_DIR / "DATA_CARD.md").read_text(encoding="utf-8").split("## Capstone data")[1]


def table_row(*cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def test_data_card_counts_match_the_files():
    for category in CATEGORIES:
        raw = [row for row in CLEAN if row["category"] == category]
        evals = [row for row in EVAL if row["category"] == category]
        urgent = sum(row["urgent"] for row in raw), sum(row["urgent"] for row in evals)
        assert table_row(category, len(raw), urgent[0], len(evals), urgent[1]) in CARD
    n_raw, n_eval = sum(r["urgent"] for r in CLEAN), sum(r["urgent"] for r in EVAL)
    assert (
        table_row(
            "all",
            len(CLEAN),
            f"{n_raw} ({n_raw / len(CLEAN):.1%})",
            len(EVAL),
            f"{n_eval} ({n_eval / len(EVAL):.1%})",
        )
        in CARD
    )
    for defect, count in PLANTED.items():
        assert f"| `{defect}` | {count} |" in CARD


def test_data_card_near_duplicate_similarity_range():
    similarities = [
        most_similar(row["message"], [shingle_set(m) for m in clean_except(row["id"])])
        for row in RAW
        if DEFECTS.get(row["id"]) == "near_duplicate"
    ]
    assert f"Jaccard {min(similarities):.2f} to {max(similarities):.2f}" in CARD
