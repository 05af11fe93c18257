"""The capstone task: triage a PedalShare customer message into one line of JSON.

The raw support export (`capstone_raw.jsonl`: id, message, category, urgent) is checked row
by row with `raw_problems`, the clean rows become chat conversations with
`to_conversation` (the user's message, then the reply `{"category": ..., "urgent": ...}`),
and a model's replies are scored with `parse_triage` and `triage_scores`, next to the
majority-class baseline (`majority_prediction`) and a prompted untrained model
(`prompted`: instructions and `few_shot_examples`), with `confusion` matrices and the
precision and recall of `urgent` (`detection`).

    >>> triage_reply("bug", True)
    '{"category": "bug", "urgent": true}'
    >>> parse_triage('{"category": "bug", "urgent": true}')
    {'category': 'bug', 'urgent': True}
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence

import pandas as pd

from sft_helpers.data import DATA_DIR
from sft_helpers.evaluation import rate
from sft_helpers.generation import stop_count
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


# The prompting baseline: the task as the data card defines it, in a system message.
TRIAGE_INSTRUCTIONS = (
    "You triage customer messages for PedalShare, a bike-sharing app. Reply with one line "
    'of JSON and nothing else: {"category": CATEGORY, "urgent": URGENT}. CATEGORY is '
    '"billing" (charges, refunds, prices, payment methods, subscriptions), "bug" (the app, '
    'a bike or a dock misbehaving), "account" (login, password, email, phone, deletion, '
    'verification), "feature" (suggestions and requests) or "other" (anything else). '
    "URGENT is true when the customer is blocked right now, money is being lost right now "
    "or safety is at stake, and false otherwise; a feature request is never urgent."
)


def few_shot_examples(rows: Sequence[Mapping]) -> list[Mapping]:
    """The first of `rows` (the training rows) for each (category, urgent) pair that occurs,
    in `TRIAGE_CATEGORIES` order, urgent first: one worked example of every kind of answer."""
    if not rows:
        raise ValueError("few_shot_examples of no rows: pass the training rows")
    chosen = {}
    for row in rows:
        chosen.setdefault((row["category"], row["urgent"]), row)
    return [chosen[key] for key in sorted(
        chosen, key=lambda key: (TRIAGE_CATEGORIES.index(key[0]), not key[1]))]


def prompted(message: str, examples: Sequence[Mapping]) -> dict:
    """An `evaluate_sft_model` item that asks an untrained model for the triage: the
    instructions as the system message, each example as a user turn and its triage reply,
    then `message`.

    >>> [m["role"] for m in prompted("Hi", [{"message": "Ok", "category": "other",
    ...                                      "urgent": False}])["messages"]]
    ['system', 'user', 'assistant', 'user']
    """
    shots = [m for row in examples for m in to_conversation(row)]
    return {"messages": [{"role": "system", "content": TRIAGE_INSTRUCTIONS}, *shots,
                         {"role": "user", "content": message.strip()}]}


def predictions(results: Sequence[Mapping]) -> list[dict | None]:
    """`parse_triage` of each `evaluate_sft_model` record's reply (None where invalid)."""
    return [parse_triage(r["generated"]) for r in results]


def majority_prediction(rows: Sequence[Mapping]) -> dict:
    """The majority-class baseline: the most common category and the most common urgency
    of `rows` (the training rows), as one prediction to give every message. Ties go to
    the category listed first in `TRIAGE_CATEGORIES`, and to `False`.

    >>> majority_prediction([{"category": "bug", "urgent": True},
    ...                      {"category": "bug", "urgent": False},
    ...                      {"category": "other", "urgent": False}])
    {'category': 'bug', 'urgent': False}
    """
    if not rows:
        raise ValueError("majority_prediction of no rows: pass the training rows")
    for row in rows:
        problem = _label_problem(row)
        if problem is not None:
            raise ValueError(f"row {row.get('id')!r}: {problem}")
    categories = Counter(row["category"] for row in rows)
    urgent = Counter(row["urgent"] for row in rows)
    return {
        "category": max(TRIAGE_CATEGORIES, key=categories.__getitem__),  # the first of a tie
        "urgent": urgent[True] > urgent[False],
    }


def _check_paired(predicted: Sequence, eval_rows: Sequence[Mapping]) -> None:
    if len(predicted) != len(eval_rows) or not eval_rows:
        raise ValueError(f"pair each of the {len(eval_rows)} eval rows with one prediction, "
                         f"got {len(predicted)}")


def outcomes(predicted: Sequence[Mapping | None], eval_rows: Sequence[Mapping]) -> dict:
    """Per eval row, whether the prediction (a `parse_triage` result, None when invalid) is
    "valid JSON", has the right "category" and "urgent", and "both right"; lists of bools
    in eval order, for rates and for paired comparisons (`evaluation.paired_difference`)."""
    _check_paired(predicted, eval_rows)
    found = {"valid JSON": [], "category": [], "urgent": [], "both right": []}
    for p, row in zip(predicted, eval_rows, strict=True):
        category = p is not None and p["category"] == row["category"]
        urgent = p is not None and p["urgent"] == row["urgent"]
        for name, value in (("valid JSON", p is not None), ("category", category),
                            ("urgent", urgent), ("both right", category and urgent)):
            found[name].append(value)
    return found


def prediction_rates(predicted: Sequence[Mapping | None],
                     eval_rows: Sequence[Mapping]) -> dict[str, dict]:
    """Each of the `outcomes` as k of n with its 95% interval (`evaluation.rate`): the
    scores of any predictor, a model's parsed replies or a baseline's answers."""
    return {name: rate(sum(values), len(values))
            for name, values in outcomes(predicted, eval_rows).items()}


def triage_scores(results: Sequence[Mapping], eval_rows: Sequence[Mapping]) -> dict[str, dict]:
    """A model's rates over paired `evaluate_sft_model` records and eval rows: "valid
    JSON" (exactly the schema), "category" and "urgent" (right; an invalid reply is wrong),
    "both right" (`prediction_rates`) and "stop rate" (the model closed its turn)."""
    table = prediction_rates(predictions(results), eval_rows)
    return {**table, "stop rate": rate(stop_count(results), len(results))}


def confusion(predicted: Sequence[Mapping | None], eval_rows: Sequence[Mapping],
              field: str = "category") -> pd.DataFrame:
    """Counts of (true value, predicted value) for `field` ("category" or "urgent"): one row
    per true value, one column per predicted value plus "invalid" (no valid JSON). The
    diagonal holds the right answers; a row sums to the eval rows with that value."""
    _check_paired(predicted, eval_rows)
    values = {"category": list(TRIAGE_CATEGORIES), "urgent": [True, False]}.get(field)
    if values is None:
        raise ValueError(f"field must be 'category' or 'urgent', not {field!r}")
    table = pd.DataFrame(0, index=pd.Index(values, name=f"true {field}"),
                         columns=pd.Index([*values, "invalid"], name="predicted"))
    for p, row in zip(predicted, eval_rows, strict=True):
        table.loc[row[field], "invalid" if p is None else p[field]] += 1
    return table


def detection(predicted: Sequence[Mapping | None], eval_rows: Sequence[Mapping],
              field: str = "urgent", positive=True) -> dict:
    """Precision, recall and F1 of predicting `field == positive`, read off `confusion`:
    precision is the share of the messages called positive that are (a `rate`, None when
    none is called positive), recall the share of the positive messages that are called
    positive (an invalid reply is a miss), F1 their harmonic mean, 2 TP / (2 TP + FP + FN)."""
    table = confusion(predicted, eval_rows, field)
    if positive not in table.index:
        raise ValueError(f"{positive!r} is not a value of {field!r}")
    tp = int(table.loc[positive, positive])
    called = int(table[positive].sum())
    actual = int(table.loc[positive].sum())
    return {
        "precision": rate(tp, called) if called else None,
        "recall": rate(tp, actual) if actual else None,
        "f1": 2 * tp / (called + actual) if called + actual else None,
    }
