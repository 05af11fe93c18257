"""The capstone task: triage a PedalShare customer message into one line of JSON.

The raw support export (`capstone_raw.jsonl`: id, message, category, urgent) is checked row
by row with `raw_problems`, the clean rows become chat conversations with
`to_conversation` (the user's message, then the reply `{"category": ..., "urgent": ...}`),
and a model's replies are scored with `parse_triage` and `triage_scores`.

    >>> triage_reply("bug", True)
    '{"category": "bug", "urgent": true}'
    >>> parse_triage('{"category": "bug", "urgent": true}')
    {'category': 'bug', 'urgent': True}
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from sft_helpers.data import DATA_DIR
from sft_helpers.generation import stop_rate
from sft_helpers.quality import (
    GARBAGE,
    NEAR_DUPLICATE_THRESHOLD,
    exact_duplicate_of,
    jaccard,
    near_duplicate_of,
    shingles,
)

TRIAGE_CATEGORIES = ("billing", "bug", "account", "feature", "other")
RAW_FILE = DATA_DIR / "capstone_raw.jsonl"
EVAL_FILE = DATA_DIR / "capstone_eval.jsonl"
# What `python -m sft_helpers.train --config configs/capstone.yaml` trains on: the clean raw
# rows as conversations (tests/test_triage.py checks it equals `training_records(raw)`).
TRAIN_FILE = DATA_DIR / "capstone_train.jsonl"
MAX_MESSAGE_WORDS = 120  # support messages are a few sentences; longer is a pasted log or email
# The rules in the order they are tried; a row gets the first that fires.
PROBLEMS = (
    "empty", "bad_label", "garbage", "too_long", "eval_leak", "exact_duplicate", "near_duplicate",
)


def triage_reply(category: str, urgent: bool) -> str:
    """The reply the model is trained to give: one line of JSON, two keys in a fixed order."""
    return json.dumps({"category": category, "urgent": urgent})


def _label_problem(row: Mapping) -> str | None:
    if row.get("category") not in TRIAGE_CATEGORIES:
        return f"category {row.get('category')!r} is not one of {TRIAGE_CATEGORIES}"
    if not isinstance(row.get("urgent"), bool):
        return f"urgent must be true or false, not {row.get('urgent')!r}"
    return None


def _leaks(messages: Sequence[str], eval_messages: Sequence[str]) -> list[bool]:
    # Brute force is fine at this size (200 x 40 pairs). Shingle similarity, not shared
    # n-grams: a leak with one word changed shares few long n-grams but nearly all shingles.
    eval_sets = [shingles(m) for m in eval_messages]
    return [
        any(jaccard(shingles(m), other) >= NEAR_DUPLICATE_THRESHOLD for other in eval_sets)
        for m in messages
    ]


def raw_problems(rows: Sequence[Mapping], eval_rows: Sequence[Mapping]) -> dict[str, str]:
    """`{row id: problem}` for every raw row that must not be trained on, with the first of
    `PROBLEMS` that applies: an empty message, a label outside the schema, encoding garbage,
    a message over `MAX_MESSAGE_WORDS`, a copy of an eval message (`eval_leak`), or a
    later copy (exact or near) of an earlier row. Clean rows are absent.

    >>> raw_problems([{"id": "r1", "message": " ", "category": "bug", "urgent": False}], [])
    {'r1': 'empty'}
    """
    messages = [str(row.get("message", "")) for row in rows]
    leaks = _leaks(messages, [row["message"] for row in eval_rows])
    exact = exact_duplicate_of(messages)
    near = near_duplicate_of(messages)
    found = {}
    for i, (row, message) in enumerate(zip(rows, messages, strict=True)):
        checks = {
            "empty": not message.strip(),
            "bad_label": _label_problem(row) is not None,
            "garbage": GARBAGE.search(message) is not None,
            "too_long": len(message.split()) > MAX_MESSAGE_WORDS,
            "eval_leak": leaks[i],
            "exact_duplicate": exact[i] is not None,
            "near_duplicate": near[i] is not None,
        }
        problem = next((name for name in PROBLEMS if checks[name]), None)
        if problem is not None:
            found[row["id"]] = problem
    return found


def to_conversation(row: Mapping) -> list[dict[str, str]]:
    """The chat for one row: the customer's message (stripped), then the triage reply."""
    problem = _label_problem(row)
    if problem is not None:
        raise ValueError(f"row {row.get('id')!r}: {problem}")
    return [
        {"role": "user", "content": row["message"].strip()},
        {"role": "assistant", "content": triage_reply(row["category"], row["urgent"])},
    ]


def training_records(rows: Sequence[Mapping], eval_rows: Sequence[Mapping]) -> list[dict]:
    """The rows that `raw_problems` passes, as `{"id", "category", "messages"}` records
    (the format `python -m sft_helpers.train` reads)."""
    problems = raw_problems(rows, eval_rows)
    return [
        {"id": row["id"], "category": row["category"], "messages": to_conversation(row)}
        for row in rows if row["id"] not in problems
    ]


def parse_triage(reply: str) -> dict | None:
    """The reply's `{"category", "urgent"}` when it is exactly valid triage JSON, else None.

    >>> parse_triage('{"category": "refund", "urgent": false}') is None
    True
    """
    try:
        value = json.loads(reply.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or list(value) != ["category", "urgent"]:
        return None
    return value if _label_problem(value) is None else None


def triage_scores(results: Sequence[Mapping], eval_rows: Sequence[Mapping]) -> dict[str, float]:
    """Fractions over paired `evaluate_sft_model` records and eval rows: "valid JSON"
    (exactly the schema), "category" and "urgent" (right where valid), "both right" and
    "stop rate" (the model closed its turn).
    """
    if len(results) != len(eval_rows) or not results:
        raise ValueError(f"pair each of the {len(eval_rows)} eval rows with one result, "
                         f"got {len(results)}")
    parsed = [parse_triage(r["generated"]) for r in results]
    right = [
        (p is not None and p["category"] == row["category"],
         p is not None and p["urgent"] == row["urgent"])
        for p, row in zip(parsed, eval_rows, strict=True)
    ]
    n = len(results)
    return {
        "valid JSON": sum(p is not None for p in parsed) / n,
        "category": sum(c for c, _ in right) / n,
        "urgent": sum(u for _, u in right) / n,
        "both right": sum(c and u for c, u in right) / n,
        "stop rate": stop_rate(results),
    }
