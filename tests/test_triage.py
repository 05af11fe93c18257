"""The capstone task: raw rows are filtered by named problems, replies are scored exactly."""

from __future__ import annotations

import json

import pytest

from sft_helpers.data import DATA_DIR, read_conversations, read_jsonl, write_jsonl
from sft_helpers.triage import (
    EVAL_FILE,
    RAW_FILE,
    TRAIN_FILE,
    parse_triage,
    raw_problems,
    to_conversation,
    training_records,
    triage_reply,
    triage_scores,
)

CLEAN = {"id": "r0", "message": "The lock on bike 2231 will not open and the meter is running.",
         "category": "bug", "urgent": True}
EVAL = [{"id": "e0", "message": "How do I change the email address on my account?",
         "category": "account", "urgent": False}]


def row(id_, **changes):
    return {**CLEAN, "id": id_, **changes}


def test_each_problem_is_named_and_a_clean_row_passes():
    rows = [
        CLEAN,
        row("r1", message="   "),
        row("r2", category="Billing "),
        row("r3", urgent="yes"),
        row("r4", message="The app shows Ã© everywhere since the update."),
        row("r5", message="log line " * 70),
        row("r6", message=EVAL[0]["message"].replace("email", "e-mail")),
        row("r7"),
        row("r8", message="Hi! " + CLEAN["message"]),
    ]
    assert raw_problems(rows, EVAL) == {
        "r1": "empty", "r2": "bad_label", "r3": "bad_label", "r4": "garbage", "r5": "too_long",
        "r6": "eval_leak", "r7": "exact_duplicate", "r8": "near_duplicate",
    }


def test_the_first_copy_is_kept_and_an_empty_row_also_with_a_bad_label_is_empty():
    rows = [row("a"), row("b"), row("c", message="", category="refund")]
    assert raw_problems(rows, []) == {"b": "exact_duplicate", "c": "empty"}


def test_the_filter_finds_exactly_the_planted_defects_of_the_shipped_data():
    truth = json.loads((DATA_DIR / "capstone_defects.json").read_text())
    assert raw_problems(read_jsonl(RAW_FILE), read_jsonl(EVAL_FILE)) == truth


def test_the_shipped_training_file_is_the_filtered_raw_data(tmp_path):
    rebuilt = tmp_path / TRAIN_FILE.name
    write_jsonl(training_records(read_jsonl(RAW_FILE), read_jsonl(EVAL_FILE)), rebuilt)
    assert rebuilt.read_bytes() == TRAIN_FILE.read_bytes()
    records = read_conversations(TRAIN_FILE)  # what `python -m sft_helpers.train` reads
    assert all(parse_triage(r["messages"][-1]["content"]) for r in records)


def test_a_conversation_is_the_stripped_message_and_the_triage_reply():
    chat = to_conversation(row("x", message="  Refund me twice charged!  ", category="billing",
                               urgent=True))
    assert chat == [
        {"role": "user", "content": "Refund me twice charged!"},
        {"role": "assistant", "content": '{"category": "billing", "urgent": true}'},
    ]
    with pytest.raises(ValueError, match="row 'y': category 'refund' is not one of"):
        to_conversation(row("y", category="refund"))


@pytest.mark.parametrize("reply, expected", [
    ('{"category": "bug", "urgent": true}', {"category": "bug", "urgent": True}),
    ('  {"category": "other", "urgent": false}\n', {"category": "other", "urgent": False}),
    ('{"urgent": true, "category": "bug"}', None),
    ('{"category": "bug", "urgent": true, "note": "x"}', None),
    ('{"category": "refund", "urgent": true}', None),
    ('{"category": "bug", "urgent": "yes"}', None),
    ('{"category": "bug", "urgent": 1}', None),
    ("Category: bug. Urgent: yes.", None),
    ('["bug", true]', None),
])
def test_parse_triage_accepts_exactly_the_schema(reply, expected):
    assert parse_triage(reply) == expected


def test_triage_scores_count_each_part():
    eval_rows = [{"category": "bug", "urgent": True}, {"category": "billing", "urgent": False},
                 {"category": "other", "urgent": False}, {"category": "feature", "urgent": False}]
    results = [
        {"generated": triage_reply("bug", True), "stop_reason": "eos"},
        {"generated": triage_reply("billing", True), "stop_reason": "eos"},
        {"generated": triage_reply("account", False), "stop_reason": "max_new_tokens"},
        {"generated": "It is a feature request.", "stop_reason": "eos"},
    ]
    assert triage_scores(results, eval_rows) == {
        "valid JSON": 0.75, "category": 0.5, "urgent": 0.5, "both right": 0.25, "stop rate": 0.75,
    }
    with pytest.raises(ValueError, match="pair each of the 4 eval rows"):
        triage_scores(results[:3], eval_rows)
