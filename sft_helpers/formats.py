"""Your own data: the formats training sets come in, converted to the course's `messages`.

Four shapes cover most instruction data you will meet:

- **messages** (OpenAI-style, what the course and TRL train on):
  `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}`;
- **alpaca**: `{"instruction": ..., "input": ..., "output": ...}` (`input` may be empty or
  missing; when present it follows the instruction after a blank line);
- **sharegpt**: `{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}`,
  roles `system`, `human` and `gpt`;
- **prompt_completion**: `{"prompt": ..., "completion": ...}`, one user turn and its reply
  (TRL's conversational variant, lists of messages in both fields, is read too).

`read_examples` reads `.jsonl`, `.json` (a list of rows) and `.csv` (a header row; the flat
formats only), detects the format from the first row when none is given, converts every row
and checks it with `data.validate_conversation`. A bad row raises `ValueError` naming the
file, the line (or list item) and the field; with `skip_bad=True` bad rows are left out and
counted, never dropped silently.

    >>> to_messages({"instruction": "Add 2 and 2.", "output": "4"}, "alpaca")
    [{'role': 'user', 'content': 'Add 2 and 2.'}, {'role': 'assistant', 'content': '4'}]
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

from sft_helpers.data import read_jsonl, validate_conversation

FORMATS = ("messages", "alpaca", "sharegpt", "prompt_completion")
# The fields that identify a format (a row holding all of one set is of that format).
SIGNATURES = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
SUFFIXES = (".jsonl", ".json", ".csv")
# CSV cells are text: only the formats without nested lists fit in a table.
CSV_FORMATS = ("alpaca", "prompt_completion")


def detect_format(row) -> str:
    """The format whose fields `row` holds (`SIGNATURES`); `ValueError` naming the fields
    when none or several match.

    >>> detect_format({"conversations": []}), detect_format({"prompt": "a", "completion": "b"})
    ('sharegpt', 'prompt_completion')
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    found = [name for name, fields in SIGNATURES.items() if all(f in row for f in fields)]
    if len(found) != 1:
        known = "; ".join(f"{name}: {', '.join(fields)}" for name, fields in SIGNATURES.items())
        what = "no known format" if not found else f"several formats ({', '.join(found)})"
        raise ValueError(f"fields {sorted(row)} match {what}; the formats' fields are {known}")
    return found[0]


def _text(row: Mapping, field: str, *, required: bool = True) -> str:
    value = row.get(field)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValueError(f"field {field!r} must be a non-empty string, not {value!r}")
    return value


def _alpaca(row: Mapping) -> list[dict]:
    instruction, extra = _text(row, "instruction"), _text(row, "input", required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": _text(row, "output")}]


def _sharegpt(row: Mapping) -> list[dict]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise ValueError(f"field 'conversations' must be a list, not {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        where = f"field 'conversations' turn {i}"
        if not isinstance(turn, Mapping) or not {"from", "value"} <= set(turn):
            raise ValueError(f"{where}: expected an object with 'from' and 'value'")
        if turn["from"] not in SHAREGPT_ROLES:
            raise ValueError(f"{where}: unknown role {turn['from']!r}; expected one of "
                             f"{sorted(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def _prompt_completion(row: Mapping) -> list[dict]:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):
        return [*prompt, *completion]  # TRL's conversational prompt-completion
    return [{"role": "user", "content": _text(row, "prompt")},
            {"role": "assistant", "content": _text(row, "completion")}]


CONVERTERS = {
    "messages": lambda row: row["messages"],
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "prompt_completion": _prompt_completion,
}


def to_messages(row, format: str) -> list[dict]:
    """`row` (in `format`) as a checked list of `{"role", "content"}` messages.

    >>> to_messages({"conversations": [{"from": "human", "value": "Hi"},
    ...                                {"from": "gpt", "value": "Hello."}]}, "sharegpt")
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'}]
    """
    if format not in CONVERTERS:
        raise ValueError(f"unknown data format {format!r}; the formats are {', '.join(FORMATS)}")
    if not isinstance(row, Mapping):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    missing = [field for field in SIGNATURES[format] if field not in row]
    if missing:
        raise ValueError(f"a row in the {format} format needs the field {missing[0]!r}; "
                         f"it has {sorted(row)}")
    messages = CONVERTERS[format](row)
    validate_conversation(messages)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _rows(path: Path) -> list[tuple[str, object]]:
    """`(where, row)` pairs: "line N" for .jsonl and .csv, "item N" for a .json list."""
    if path.suffix == ".jsonl":
        return [(f"line {number}", row) for number, row in enumerate(read_jsonl(path), start=1)]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path.name}: not valid JSON ({error.msg}, line {error.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path.name}: expected a list of rows, got {type(data).__name__}")
        return [(f"item {number}", row) for number, row in enumerate(data, start=1)]
    # A CSV record may span lines (quoted newlines): name the line where it starts.
    reader = csv.DictReader(text.splitlines(keepends=True))
    rows, start = [], 2
    for record in reader:
        rows.append((f"line {start}", dict(record)))
        start = reader.line_num + 1
    return rows


def read_examples(
    path: str | Path, format: str | None = None, *, skip_bad: bool = False
) -> tuple[list[dict], dict]:
    """`(records, report)`: the rows of `path` as `{"messages": [...]}` records, and a
    report `{"format", "detected", "rows", "kept", "skipped"}` (`skipped` lists
    `"<where>: <problem>"` for each row left out with `skip_bad=True`).

    `format=None` detects the format from the first row (`detected` is then True); every
    row must then be of that format.

    >>> from sft_helpers.data import DATA_DIR
    >>> records, report = read_examples(DATA_DIR / "samples" / "alpaca.jsonl")
    >>> report["format"], report["detected"], report["kept"] == report["rows"]
    ('alpaca', True, True)
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path.name}: cannot read {path.suffix or 'a file without a suffix'}"
                         f" files; use {', '.join(SUFFIXES)}")
    rows = _rows(path)
    if not rows:
        raise ValueError(f"{path.name} holds no rows")
    detected = format is None
    if detected:
        where, first = rows[0]
        try:
            format = detect_format(first)
        except ValueError as error:
            raise ValueError(f"{path.name} {where}: {error}") from error
    if path.suffix == ".csv" and format not in CSV_FORMATS:
        raise ValueError(f"{path.name}: a CSV file holds flat rows only ({', '.join(CSV_FORMATS)})"
                         f"; write {format} rows as .jsonl or .json")
    records, skipped = [], []
    for where, row in rows:
        try:
            records.append({"messages": to_messages(row, format)})
        except ValueError as error:
            if not skip_bad:
                raise ValueError(f"{path.name} {where}: {error}") from error
            skipped.append(f"{where}: {error}")
    if not records:
        raise ValueError(f"{path.name}: none of its {len(rows)} rows is a valid {format} row")
    report = {"format": format, "detected": detected, "rows": len(rows), "kept": len(records),
              "skipped": skipped}
    return records, report


def as_dataset(path: str | Path, format: str | None = None):
    """A `datasets.Dataset` with one `messages` column, read with
    `datasets.load_dataset("json", ...)` (a .jsonl or .json file) and converted row by row
    with `to_messages`, the format detected from the first row when not given.
    """
    from datasets import load_dataset

    path = Path(path)
    raw = load_dataset("json", data_files=str(path), split="train")
    format = format or detect_format(raw[0])

    def convert(row, index):
        try:
            return {"messages": to_messages(row, format)}
        except ValueError as error:
            raise ValueError(f"{path.name} row {index + 1}: {error}") from error

    return raw.map(convert, with_indices=True, remove_columns=raw.column_names)
