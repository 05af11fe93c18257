"""Converters from the formats training data comes in (Alpaca, ShareGPT, prompt-completion,
messages) to the course's messages: every format, every file type, and bad rows named."""

from __future__ import annotations

import json

import pytest

from sft_helpers.data import DATA_DIR
from sft_helpers.formats import (
    FORMATS,
    as_dataset,
    detect_format,
    read_examples,
    to_messages,
)

SAMPLES = DATA_DIR / "samples"
SAMPLE_FILES = {"alpaca": "alpaca.jsonl", "sharegpt": "sharegpt.json",
                "prompt_completion": "prompt_completion.csv", "messages": "messages.jsonl"}
USER, BOT = "user", "assistant"


def test_each_format_converts_to_the_same_messages():
    expected = [{"role": USER, "content": "Hi"}, {"role": BOT, "content": "Hello."}]
    rows = {
        "messages": {"messages": expected},
        "alpaca": {"instruction": "Hi", "input": "", "output": "Hello."},
        "sharegpt": {"conversations": [{"from": "human", "value": "Hi"},
                                       {"from": "gpt", "value": "Hello."}]},
        "prompt_completion": {"prompt": "Hi", "completion": "Hello."},
    }
    assert set(rows) == set(FORMATS)
    for name, row in rows.items():
        assert detect_format(row) == name
        assert to_messages(row, name) == expected


def test_alpaca_input_follows_the_instruction_after_a_blank_line():
    row = {"instruction": "Sort these.", "input": "3, 1, 2", "output": "1, 2, 3"}
    assert to_messages(row, "alpaca")[0]["content"] == "Sort these.\n\n3, 1, 2"
    assert to_messages({**row, "input": None}, "alpaca")[0]["content"] == "Sort these."


def test_sharegpt_keeps_system_and_multi_turn_in_order():
    row = {"conversations": [{"from": "system", "value": "Be brief."},
                             {"from": "human", "value": "A?"}, {"from": "gpt", "value": "a"},
                             {"from": "human", "value": "B?"}, {"from": "gpt", "value": "b"}]}
    roles = [m["role"] for m in to_messages(row, "sharegpt")]
    assert roles == ["system", USER, BOT, USER, BOT]


def test_trls_conversational_prompt_completion_is_read():
    row = {"prompt": [{"role": USER, "content": "Hi"}],
           "completion": [{"role": BOT, "content": "Hello."}]}
    assert [m["role"] for m in to_messages(row, "prompt_completion")] == [USER, BOT]


@pytest.mark.parametrize("name", FORMATS)
def test_every_sample_file_reads_detected_and_stated(name):
    records, report = read_examples(SAMPLES / SAMPLE_FILES[name])
    assert report["format"] == name and report["detected"] is True
    assert report["kept"] == report["rows"] == len(records) >= 5 and report["skipped"] == []
    assert all(r["messages"][-1]["role"] == BOT for r in records)
    stated, report = read_examples(SAMPLES / SAMPLE_FILES[name], name)
    assert stated == records and report["detected"] is False


def test_a_csv_cell_keeps_its_newlines_and_commas():
    records, _ = read_examples(SAMPLES / "prompt_completion.csv")
    haiku = next(r["messages"][1]["content"] for r in records
                 if "haiku" in r["messages"][0]["content"])
    assert haiku.count("\n") == 2
    assert any(r["messages"][1]["content"] == "1,440 minutes." for r in records)


@pytest.mark.parametrize("name", ["alpaca", "sharegpt", "messages"])
def test_load_dataset_json_gives_the_same_messages(name, tmp_path):
    path = SAMPLES / SAMPLE_FILES[name]
    records, _ = read_examples(path)
    assert as_dataset(path)["messages"] == [r["messages"] for r in records]


# name: (the format of the good first row, the bad second row, what the error says)
BAD_ROWS = {
    "no known format": ("alpaca", {"question": "Hi", "answer": "Hello"},
                        "line 2: a row in the alpaca format needs the field 'instruction'"),
    "alpaca without output": ("alpaca", {"instruction": "Hi", "output": ""},
                              "line 2: field 'output' must be a non-empty string"),
    "sharegpt unknown role": ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"},
                                                             {"from": "bot", "value": "Hello"}]},
                              "line 2: field 'conversations' turn 1: unknown role 'bot'"),
    "sharegpt turn without value": ("sharegpt", {"conversations": [{"from": "human"}]},
                                    "line 2: field 'conversations' turn 0: expected an object "
                                    "with 'from' and 'value'"),
    "messages with no reply": ("messages", {"messages": [{"role": USER, "content": "Hi"}]},
                               "line 2: conversation: no assistant message"),
    "not an object": ("alpaca", [1, 2], "line 2: expected an object, got list"),
}
GOOD = {"alpaca": {"instruction": "Hi", "output": "Hello."},
        "sharegpt": {"conversations": [{"from": "human", "value": "Hi"},
                                       {"from": "gpt", "value": "Hello."}]},
        "messages": {"messages": [{"role": USER, "content": "Hi"},
                                  {"role": BOT, "content": "Hello."}]}}


@pytest.mark.parametrize("first, bad, message", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_a_bad_row_is_named_by_file_line_and_field_or_skipped_and_counted(tmp_path, first, bad,
                                                                          message):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(GOOD[first]) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        read_examples(path)
    assert str(error.value).startswith(f"mine.jsonl {message}"), str(error.value)
    records, report = read_examples(path, skip_bad=True)
    assert len(records) == 1 and report["rows"] == 2 and report["kept"] == 1
    assert len(report["skipped"]) == 1 and report["skipped"][0].startswith(message)


def test_a_first_row_of_no_known_format_names_the_fields(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "Hi", "answer": "Hello"}) + "\n")
    with pytest.raises(ValueError, match=r"mine.jsonl line 1: fields \['answer', 'question'\] "
                                         r"match no known format; the formats' fields are "
                                         r"messages: messages; sharegpt: conversations; "
                                         r"alpaca: instruction, output"):
        read_examples(path)


def test_a_mixed_file_is_refused_at_the_first_row_of_another_format(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(GOOD["alpaca"]) + "\n" + json.dumps(GOOD["sharegpt"]) + "\n")
    with pytest.raises(ValueError, match="mixed.jsonl line 2: a row in the alpaca format needs "
                                         "the field 'instruction'"):
        read_examples(path)


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"a": 1}\n{oops\n', "bad.jsonl line 2: not valid JSON"),
    ("bad.json", '{"a": 1}', "bad.json: expected a list of rows, got dict"),
    ("bad.json", "[1,", "bad.json: not valid JSON"),
    ("data.txt", "hello", "data.txt: cannot read .txt files; use .jsonl, .json, .csv"),
    ("empty.jsonl", "", "empty.jsonl holds no rows"),
    ("nested.csv", "conversations\n[]\n", "nested.csv: a CSV file holds flat rows only"),
])
def test_bad_files_are_named(tmp_path, name, text, message):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        read_examples(tmp_path / name)


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_text(json.dumps({"instruction": "Hi", "output": ""}) + "\n")
    with pytest.raises(ValueError, match="none of its 1 rows is a valid alpaca row"):
        read_examples(path, skip_bad=True)


def test_an_unknown_format_is_named():
    with pytest.raises(ValueError, match="unknown data format 'openai'; the formats are messages"):
        to_messages({"messages": []}, "openai")
