"""The capstone task: raw rows are filtered by named problems, replies are scored exactly."""

from __future__ import annotations

import json

import pytest

from sft_helpers.data import DATA_DIR, read_conversations, read_jsonl, write_jsonl
from sft_helpers.triage import (
    EVAL_FILE,
    RAW_FILE,
    TRAIN_FILE,
    TRIAGE_CATEGORIES,
    TRIAGE_INSTRUCTIONS,
    confusion,
    detection,
    few_shot_examples,
    majority_prediction,
    outcomes,
    parse_triage,
    prediction_rates,
    prompted,
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


EVAL_ROWS = [{"category": "bug", "urgent": True}, {"category": "billing", "urgent": False},
             {"category": "other", "urgent": False}, {"category": "feature", "urgent": False},
             {"category": "bug", "urgent": True}]
RESULTS = [
    {"generated": triage_reply("bug", True), "stop_reason": "eos"},
    {"generated": triage_reply("billing", True), "stop_reason": "eos"},
    {"generated": triage_reply("account", False), "stop_reason": "max_new_tokens"},
    {"generated": "It is a feature request.", "stop_reason": "eos"},
    {"generated": triage_reply("account", False), "stop_reason": "eos"},
]


def test_triage_scores_count_each_part_as_k_of_n():
    scores = triage_scores(RESULTS, EVAL_ROWS)
    assert {name: (r["k"], r["n"]) for name, r in scores.items()} == {
        "valid JSON": (4, 5), "category": (2, 5), "urgent": (2, 5), "both right": (1, 5),
        "stop rate": (4, 5),
    }
    low, high = scores["category"]["ci"]
    assert 0 < low < 0.4 < high < 1
    with pytest.raises(ValueError, match="pair each of the 5 eval rows"):
        triage_scores(RESULTS[:3], EVAL_ROWS)
    with pytest.raises(ValueError, match="pair each of the 0 eval rows"):
        triage_scores([], [])


def test_a_baseline_is_scored_like_a_model_from_its_predictions():
    always = [{"category": "bug", "urgent": True}] * len(EVAL_ROWS)
    found = outcomes(always, EVAL_ROWS)
    assert found["category"] == [True, False, False, False, True]
    assert found["both right"] == [True, False, False, False, True]
    assert {name: r["k"] for name, r in prediction_rates(always, EVAL_ROWS).items()} == {
        "valid JSON": 5, "category": 2, "urgent": 2, "both right": 2}
    with pytest.raises(ValueError, match="pair each of the 5 eval rows with one prediction, got 1"):
        prediction_rates(always[:1], EVAL_ROWS)


def test_majority_prediction_takes_the_most_common_labels_of_the_training_rows():
    rows = [row(f"r{i}", category=c, urgent=u) for i, (c, u) in enumerate(
        [("other", False), ("other", True), ("bug", False), ("feature", True)])]
    assert majority_prediction(rows) == {"category": "other", "urgent": False}  # 2 of 4 urgent
    assert majority_prediction(rows[2:]) == {"category": "bug", "urgent": False}  # ties
    raw, eval_rows = read_jsonl(RAW_FILE), read_jsonl(EVAL_FILE)
    problems = raw_problems(raw, eval_rows)
    clean = [r for r in raw if r["id"] not in problems]
    assert majority_prediction(clean) == {"category": "bug", "urgent": False}  # 40 bugs of 176
    with pytest.raises(ValueError, match="no rows"):
        majority_prediction([])
    with pytest.raises(ValueError, match="row 'r9': category 'refund'"):
        majority_prediction([*rows, row("r9", category="refund")])


def test_confusion_counts_true_against_predicted_with_invalid_replies_apart():
    predicted = [parse_triage(r["generated"]) for r in RESULTS]
    table = confusion(predicted, EVAL_ROWS)
    assert table.loc["bug", "bug"] == 1 and table.loc["bug", "account"] == 1
    assert table.loc["feature", "invalid"] == 1 and table.loc["other", "account"] == 1
    assert table.to_numpy().sum() == len(EVAL_ROWS)
    assert table.loc["bug"].sum() == 2 and table.loc["account"].sum() == 0
    urgent = confusion(predicted, EVAL_ROWS, "urgent")
    assert urgent.loc[True].tolist() == [1, 1, 0] and urgent.loc[False].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="field must be 'category' or 'urgent', not 'mood'"):
        confusion(predicted, EVAL_ROWS, "mood")
    with pytest.raises(ValueError, match="pair each of the 5 eval rows with one prediction, got 4"):
        confusion(predicted[:4], EVAL_ROWS)


def test_detection_gives_precision_recall_and_f1_of_urgent():
    predicted = [parse_triage(r["generated"]) for r in RESULTS]
    found = detection(predicted, EVAL_ROWS)
    # Called urgent: rows 0 (right) and 1 (wrong); urgent: rows 0 and 4 (4 is missed).
    assert (found["precision"]["k"], found["precision"]["n"]) == (1, 2)
    assert (found["recall"]["k"], found["recall"]["n"]) == (1, 2)
    assert found["f1"] == pytest.approx(0.5)
    never = detection([majority_prediction([CLEAN | {"urgent": False}])] * 5, EVAL_ROWS)
    assert never["precision"] is None and never["recall"]["k"] == 0 and never["f1"] == 0
    assert detection(predicted, EVAL_ROWS, "category", "other")["recall"]["k"] == 0
    with pytest.raises(ValueError, match="'refund' is not a value of 'category'"):
        detection(predicted, EVAL_ROWS, "category", "refund")


def test_few_shot_examples_take_the_first_row_of_each_kind_of_answer():
    rows = [row("a", category="other", urgent=False), row("b", category="bug", urgent=False),
            row("c"), row("d"), row("e", category="other", urgent=False)]
    assert [r["id"] for r in few_shot_examples(rows)] == ["c", "b", "a"]  # bug/True first
    with pytest.raises(ValueError, match="no rows"):
        few_shot_examples([])


def test_a_prompted_item_is_instructions_then_examples_then_the_message():
    item = prompted("  My bike will not lock!  ", [CLEAN])
    roles = [m["role"] for m in item["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert item["messages"][0]["content"] == TRIAGE_INSTRUCTIONS
    assert all(f'"{c}"' in TRIAGE_INSTRUCTIONS for c in TRIAGE_CATEGORIES)
    assert item["messages"][2]["content"] == triage_reply("bug", True)
    assert item["messages"][-1]["content"] == "My bike will not lock!"
    with pytest.raises(ValueError, match="row 'r9': category 'refund'"):
        prompted("Hi", [row("r9", category="refund")])
