"""Exercise checks of notebook 08: wrong answers get a hint, the reference answer passes."""

from __future__ import annotations

import pytest

from sft_helpers.checks import (
    ExerciseError,
    check_both_right,
    check_data_format,
    check_triage_reply,
)

ROW = {"id": "raw-0007", "message": "Charged twice for one ride!", "category": "billing",
       "urgent": True}
EVAL_ROWS = [{"category": "bug", "urgent": True}, {"category": "billing", "urgent": False}]
RESULTS = [{"generated": '{"category": "bug", "urgent": true}', "stop_reason": "eos"},
           {"generated": '{"category": "billing", "urgent": true}', "stop_reason": "eos"}]


def test_triage_reply_accepts_the_exact_json(capsys):
    check_triage_reply(ROW, '{"category": "billing", "urgent": true}')
    assert "Correct" in capsys.readouterr().out


@pytest.mark.parametrize("answer, hint", [
    ("billing, urgent", "one line of JSON"),
    ('{"urgent": true, "category": "billing"}', "in this order"),
    ('{"category": "billing", "urgent": false}', "labels"),
    ('{"category":"billing","urgent":true}', "spacing"),
])
def test_triage_reply_rejects_with_a_hint(answer, hint):
    with pytest.raises(ExerciseError, match=hint):
        check_triage_reply(ROW, answer)


def test_both_right_accepts_the_share_and_names_the_valid_json_confusion(capsys):
    check_both_right(RESULTS, EVAL_ROWS, 0.5)
    assert "50.0%" in capsys.readouterr().out
    with pytest.raises(ExerciseError, match="share of valid JSON"):
        check_both_right(RESULTS, EVAL_ROWS, 1.0)
    with pytest.raises(ExerciseError, match="parse each reply"):
        check_both_right(RESULTS, EVAL_ROWS, 0.25)


def test_data_format():
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}
    check_data_format(row, "sharegpt")
    for wrong in ("messages", "alpaca", "ShareGPT", None):
        with pytest.raises(ExerciseError, match="which one's fields does it hold"):
            check_data_format(row, wrong)
