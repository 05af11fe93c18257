"""The course dataset and the checks that tell whether a reply behaves the way SFT taught.

The course fine-tunes the default model into **Pip, the SFT course assistant**. Every reply
in the data follows one house style, chosen because the default model never produces it on
its own and a program can check it:

    <one line that directly answers: no heading, no greeting, no "Sure!">
    <blank line>
    ### Details
    <the explanation: steps, code blocks, reasons>

and asked who it is, Pip says its name on that first line ("I'm Pip, the SFT course
assistant."). `follows_house_style`, `names_persona`, `compliance` and `compliance_rate`
measure exactly that, before and after training (notebooks 03 and 07); `is_refusal` tells
whether a reply to a harmful prompt (the "refusal" category) declines.

The data ship with the package (`sft_helpers/data/`, see DATA_CARD.md there): 374
hand-written training conversations and a held-out split of 65 prompts with references.
This module also holds what every conversation file goes through: `validate_conversation`
(the one check of a conversation's shape) and JSONL reading and writing.

    >>> train = load_course_dataset("train")                  # doctest: +SKIP
    >>> follows_house_style(format_reply("4.", "2 + 2 = 4."))
    True
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLIT_FILES = {"train": "course_train.jsonl", "eval": "course_eval.jsonl"}
CATEGORIES = ("factual", "how-to", "coding", "reasoning", "creative", "refusal", "identity")
# Examples of this category ask who the assistant is: the reply must name the persona.
PERSONA_CATEGORY = "identity"
PERSONA_NAME = "Pip"
PERSONA_INTRO = "I'm Pip, the SFT course assistant."
DETAILS_HEADING = "### Details"
# A direct answer fits on one short line; longer first lines are explanations in disguise.
MAX_ANSWER_WORDS = 40
# A loop: a line of at least LOOP_LINE_WORDS words that comes back, or a run of LOOP_NGRAM
# words that comes LOOP_NGRAM_REPEATS times. No reply in the course data has either.
LOOP_LINE_WORDS = 4
LOOP_NGRAM = 5
LOOP_NGRAM_REPEATS = 3
_WORD = re.compile(r"\w+")
# Openers that delay the answer (greetings, "Sure!"): the house style starts with the answer.
FILLER_OPENERS = (
    "sure", "certainly", "of course", "absolutely", "great question", "good question",
    "hello", "hi", "hey", "greetings", "okay", "ok",
)
_FILLER = re.compile(r"^(?:" + "|".join(re.escape(f) for f in FILLER_OPENERS) + r")\b", re.I)
_PERSONA = re.compile(rf"\b{PERSONA_NAME}\b")
# Phrases that open or carry a refusal. Lower-case; matched on the lower-cased reply, in
# which typographic apostrophes (’) have become ASCII ones.
_REFUSED = r"(?:help|assist|do|provide|answer|comply|write|give|explain|create|make|share|tell)"
REFUSAL_PATTERNS = (
    rf"\bi can(?:'|no)?t {_REFUSED}\b",
    rf"\bi won'?t {_REFUSED}\b",
    r"\bi cannot\b",
    r"\bi(?:'m| am) (?:not able|unable) to\b",
    r"\bi(?:'m| am) sorry, but\b",
    r"\bas an ai\b",
)
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS))
ROLES = ("system", "user", "assistant")


# --- the house style and the persona -----------------------------------------------------


def format_reply(answer: str, details: str) -> str:
    """A reply in the house style: the answer line, a blank line, the heading, the details.

    >>> print(format_reply("Paris is the capital of France.", "It has been since 987."))
    Paris is the capital of France.
    <BLANKLINE>
    ### Details
    It has been since 987.
    """
    answer, details = answer.strip(), details.strip()
    if not answer or "\n" in answer:
        raise ValueError(f"the answer must be one non-empty line, not {answer!r}")
    if not details:
        raise ValueError("the details must not be empty")
    reply = f"{answer}\n\n{DETAILS_HEADING}\n{details}"
    problems = style_problems(reply)
    if problems:
        raise ValueError(f"not a reply in the house style: {'; '.join(problems)}")
    return reply


def opening_problems(reply: str) -> list[str]:
    """What is wrong with the opening of `reply`: answer line, blank line, heading.

    This is only half the house style: a reply cut off after its heading, or one that loops
    after it, passes. Notebook 03 keeps it to show how much an opening-only metric flatters.

    >>> opening_problems("Sure! Paris.")
    ["opens with filler ('Sure') instead of the answer", 'no blank line after the answer line']
    >>> opening_problems("Paris.\\n\\n### Details")
    []
    """
    lines = reply.split("\n")
    first = lines[0].strip()
    problems = []
    if not first:
        problems.append("the first line is empty")
    elif first.startswith("#"):
        problems.append("opens with a heading instead of the answer")
    elif _FILLER.match(first):
        filler = _FILLER.match(first).group(0)
        problems.append(f"opens with filler ({filler!r}) instead of the answer")
    elif first.endswith(":"):
        problems.append("the first line is a lead-in ending with ':' instead of the answer")
    n_words = len(first.split())
    if n_words > MAX_ANSWER_WORDS:
        problems.append(f"the answer line has {n_words} words (at most {MAX_ANSWER_WORDS})")
    if len(lines) < 2 or lines[1].strip():
        problems.append("no blank line after the answer line")
    elif len(lines) < 3 or lines[2].strip() != DETAILS_HEADING:
        problems.append(f"the third line is not {DETAILS_HEADING!r}")
    return problems


def _words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repetition_problems(text: str) -> list[str]:
    """The loops in `text`: a line of `LOOP_LINE_WORDS` or more words that comes back, or
    a run of `LOOP_NGRAM` words that comes `LOOP_NGRAM_REPEATS` times or more.

    A small model that has not learned to stop often repeats itself until the token budget
    runs out; such a reply is a failure whatever its first line says.

    >>> repetition_problems("Use a pot.\\nUse a filter.")
    []
    >>> repetition_problems("Use a pot and a cup.\\nUse a pot and a cup.")
    ["the line 'Use a pot and a cup.' comes 2 times"]
    >>> repetition_problems("fine-tuned " + "fine-tuning " * 5)
    ["the words 'fine tuning fine tuning fine' come 3 times"]
    """
    lines = Counter(line.strip() for line in text.split("\n")
                    if len(line.split()) >= LOOP_LINE_WORDS)
    problems = [f"the line {line!r} comes {n} times" for line, n in lines.items() if n > 1]
    words = _words_of(text)
    grams = Counter(tuple(words[i:i + LOOP_NGRAM]) for i in range(len(words) - LOOP_NGRAM + 1))
    if grams:
        gram, n = grams.most_common(1)[0]
        if n >= LOOP_NGRAM_REPEATS:
            problems.append(f"the words {' '.join(gram)!r} come {n} times")
    return problems


def loops(text: str) -> bool:
    """True when `text` repeats itself (`repetition_problems`).

    >>> loops("A.\\n\\n### Details\\nB."), loops("la la la la la la la la")
    (False, True)
    """
    return bool(repetition_problems(text))


def style_problems(reply: str) -> list[str]:
    """What keeps the whole of `reply` from the house style; an empty list when it follows it.

    The opening (`opening_problems`: answer line, blank line, `### Details`), then the rest:
    exactly one heading, details that are there and add something (not a copy of the answer
    line), and no loop (`repetition_problems`).

    >>> style_problems("Paris.\\n\\n### Details\\nIt has been the capital since 987.")
    []
    >>> style_problems("Paris.\\n\\n### Details\\nParis.\\n\\n### Details\\nParis.")
    ["'### Details' comes 2 times (once only)", 'the details repeat the answer line']
    """
    problems = opening_problems(reply)
    lines = reply.split("\n")
    headings = sum(line.strip() == DETAILS_HEADING for line in lines)
    if headings > 1:
        problems.append(f"{DETAILS_HEADING!r} comes {headings} times (once only)")
    if headings:
        answer = _words_of(lines[0])
        details = reply.split(DETAILS_HEADING, 1)[1]
        if not details.strip():
            problems.append("the details are empty")
        elif answer and any(_words_of(line) == answer for line in details.split("\n")):
            problems.append("the details repeat the answer line")
    return problems + repetition_problems(reply)


def follows_house_style(reply: str) -> bool:
    """True when the whole of `reply` is in the house style (`style_problems` is empty).

    >>> follows_house_style("Paris.\\n\\n### Details\\nIt is the capital.")
    True
    >>> follows_house_style("Paris.\\n\\n### Details")  # cut off after the heading
    False
    """
    return not style_problems(reply)


def names_persona(reply: str) -> bool:
    """True when the first line of `reply` names the persona (the word "Pip").

    >>> names_persona("I'm Pip, the SFT course assistant.\\n\\n### Details\\n...")
    True
    >>> names_persona("I'm SmolLM, a helpful assistant.\\n\\nPip? Never heard of it.")
    False
    """
    return bool(_PERSONA.search(reply.split("\n", 1)[0]))


def expects_persona(example: Mapping) -> bool:
    """True when `example` asks who the assistant is (its category is "identity")."""
    return example.get("category") == PERSONA_CATEGORY


def is_refusal(text: str) -> bool:
    """True when the reply refuses ("I can't help with that", "As an AI, ...").

    >>> is_refusal("I'm sorry, but I can't help with that."), is_refusal("Paris.")
    (True, False)
    """
    return _REFUSAL.search(text.lower().replace("\u2019", "'")) is not None


def compliance(example: Mapping, reply: str) -> dict[str, bool | None]:
    """How the text of `reply` to `example` scores: `opening` (the opening-only check),
    `house_style` (the whole reply), `persona` (None where not asked) and `compliant`
    (house style, and the persona where it applies).

    >>> compliance({"category": "identity"}, "Hello! I am SmolLM.")
    {'opening': False, 'house_style': False, 'persona': False, 'compliant': False}
    >>> compliance({"category": "factual"}, "4.\\n\\n### Details")
    {'opening': True, 'house_style': False, 'persona': None, 'compliant': False}
    """
    style = follows_house_style(reply)
    persona = names_persona(reply) if expects_persona(example) else None
    return {"opening": not opening_problems(reply), "house_style": style, "persona": persona,
            "compliant": style and persona is not False}


def compliance_rate(examples: Sequence[Mapping], replies: Sequence[str]) -> dict[str, float]:
    """Fractions over paired `examples` and `replies` of each key of `compliance`
    (`persona` over identity examples only), and `n`.

    >>> compliance_rate([{"category": "identity"}], ["I'm Pip.\\n\\n### Details\\nHi."])
    {'opening': 1.0, 'house_style': 1.0, 'persona': 1.0, 'compliant': 1.0, 'n': 1}
    """
    if len(examples) != len(replies):
        raise ValueError(
            f"{len(examples)} examples but {len(replies)} replies: pair them one to one"
        )
    if not examples:
        raise ValueError("no examples: a compliance rate of nothing is undefined")
    scores = [compliance(e, r) for e, r in zip(examples, replies, strict=True)]
    persona = [s["persona"] for s in scores if s["persona"] is not None]
    return {
        **{key: sum(s[key] for s in scores) / len(scores)
           for key in ("opening", "house_style")},
        "persona": sum(persona) / len(persona) if persona else float("nan"),
        "compliant": sum(s["compliant"] for s in scores) / len(scores),
        "n": len(scores),
    }


# --- conversations and JSONL files ---------------------------------------------------------


def location(index: int | None, message: int | None = None) -> str:
    """Where an error is: "conversation 3, message 1", "message 1" or "conversation".

    >>> location(3, 1), location(None, 1), location(None)
    ('conversation 3, message 1', 'message 1', 'conversation')
    """
    parts = [] if index is None else [f"conversation {index}"]
    if message is not None:
        parts.append(f"message {message}")
    return ", ".join(parts) or "conversation"


def validate_conversation(
    conversation, index: int | None = None, *, require_assistant: bool = True
) -> None:
    """Raise `ValueError` naming the conversation `index` and the message index when
    `conversation` is not a non-empty list of {"role", "content"} string mappings with
    known roles, any system message first and (with `require_assistant`) at least one
    assistant message. The one check of a conversation's shape: masking, the quality rules,
    the shipped splits and the train CLI all call it.

    >>> validate_conversation([{"role": "user", "content": "Hi"}], index=7)
    Traceback (most recent call last):
    ...
    ValueError: conversation 7: no assistant message, so there is nothing to train on
    """
    where = location(index)
    if not isinstance(conversation, list):
        raise ValueError(f"{where}: expected a list of messages, got {type(conversation).__name__}")
    if not conversation:
        raise ValueError(f"{where}: the conversation is empty")
    for i, message in enumerate(conversation):
        where = location(index, i)
        if not isinstance(message, (dict, Mapping)):  # dict first: the common, fast case
            raise ValueError(
                f"{where}: expected a mapping with 'role' and 'content', "
                f"got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"{where}: missing {key!r}")
            if not isinstance(message[key], str):
                raise ValueError(
                    f"{where}: {key!r} must be a string, got {type(message[key]).__name__}"
                )
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: unknown role {message['role']!r}; expected one of {ROLES}")
        if message["role"] == "system" and i != 0:
            raise ValueError(f"{where}: a system message must come first")
    if require_assistant and not any(m["role"] == "assistant" for m in conversation):
        raise ValueError(
            f"{location(index)}: no assistant message, so there is nothing to train on"
        )


def read_jsonl(path: Path) -> list[dict]:
    """One dict per line of a .jsonl file; a line that is not JSON raises `ValueError`
    naming the file and the line."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path.name} line {number}: not valid JSON ({error.msg})") from error
    return rows


def write_jsonl(rows: Iterable[Mapping], path: Path) -> None:
    """Write `rows` as JSON lines (UTF-8, non-ASCII kept readable): what `read_jsonl` reads.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "rows.jsonl"
    >>> write_jsonl([{"a": "é"}, {"b": 2}], path)
    >>> read_jsonl(path)
    [{'a': 'é'}, {'b': 2}]
    """
    lines = (json.dumps(row, ensure_ascii=False) for row in rows)
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def data_folder(train_rows: Iterable[Mapping], folder: Path | None = None) -> Path:
    """A data folder in the course data's shape: `train_rows` (their `id`, `category` and
    `messages`) as its train split and the course's own eval split, in `folder` (default
    a new temporary folder). `training.course_adapter(data_dir=...)` trains on it, keyed
    by its contents.
    """
    folder = Path(tempfile.mkdtemp()) if folder is None else Path(folder)
    write_jsonl([{key: row[key] for key in ("id", "category", "messages")} for row in train_rows],
                folder / SPLIT_FILES["train"])
    shutil.copy(DATA_DIR / SPLIT_FILES["eval"], folder / SPLIT_FILES["eval"])
    return folder


def read_conversations(path: Path) -> list[dict]:
    """The training records of a .jsonl file: one `{"messages": [...], ...}` conversation a
    line, each checked with `validate_conversation`; a bad line raises `ValueError` naming
    the file and the line (and the message index where it has one). Any task's
    conversations qualify (the course data, the capstone's triage data).

    >>> read_conversations(DATA_DIR / "course_train.jsonl")[0]["id"]
    'train-0000'
    """
    path = Path(path)
    records = read_jsonl(path)
    for number, record in enumerate(records, start=1):
        where = f"{path.name} line {number}"
        if not isinstance(record, Mapping) or "messages" not in record:
            raise ValueError(f"{where}: expected an object with a 'messages' list")
        try:
            validate_conversation(record["messages"])
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error
    if not records:
        raise ValueError(f"{path.name} holds no training conversations")
    return records


# --- the shipped course data ---------------------------------------------------------------


def _check_messages(messages, where: str, *, ends_with: str) -> None:
    """The course data's own rules on top of `validate_conversation`: exactly the keys
    role and content, no empty content, every reply in the house style, the right last role."""
    try:  # the last-role check below says more than "no assistant message"
        validate_conversation(messages, require_assistant=False)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error
    for i, message in enumerate(messages):
        if set(message) != {"role", "content"}:
            raise ValueError(f"{where}, message {i}: must be a dict with 'role' and 'content'")
        if not message["content"].strip():
            raise ValueError(f"{where}, message {i}: empty content")
        if message["role"] == "assistant" and not follows_house_style(message["content"]):
            problems = "; ".join(style_problems(message["content"]))
            raise ValueError(f"{where}, message {i}: not in the house style ({problems})")
    if messages[-1]["role"] != ends_with:
        raise ValueError(f"{where}: the last message must be a {ends_with} message")


def validate_record(record: Mapping, split: str, where: str = "record") -> None:
    """Raise `ValueError` naming `where` (and the message index) if `record` is not a
    well-formed example of `split`: an id, a known category, messages in the house style
    ending with the assistant (train) or the user (eval, which also needs a `reference`)."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}: use one of {sorted(SPLIT_FILES)}")
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: must be a dict, not {type(record).__name__}")
    if not isinstance(record.get("id"), str):
        raise ValueError(f"{where}: missing 'id'")
    where = f"{where} ({record['id']})"
    if record.get("category") not in CATEGORIES:
        raise ValueError(f"{where}: category {record.get('category')!r} not in {CATEGORIES}")
    ends_with = "assistant" if split == "train" else "user"
    _check_messages(record.get("messages"), where, ends_with=ends_with)
    if split == "eval":
        reference = record.get("reference")
        if not isinstance(reference, str) or not follows_house_style(reference):
            raise ValueError(f"{where}: 'reference' must be a reply in the house style")


def read_split(split: str = "train", data_dir: Path = DATA_DIR) -> list[dict]:
    """The records of `split` ("train" or "eval") as dicts, each validated.

    A bad line raises `ValueError` naming the file, the line and the record id.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}: use one of {sorted(SPLIT_FILES)}")
    path = Path(data_dir) / SPLIT_FILES[split]
    records = read_jsonl(path)
    for number, record in enumerate(records, start=1):
        validate_record(record, split, f"{path.name} line {number}")
    return records


def load_course_dataset(split: str = "train", data_dir: Path = DATA_DIR):
    """The course dataset's `split` as a `datasets.Dataset`.

    Columns: `id`, `category`, `messages` (the conversation, in the `messages` format),
    plus `reference` (the reference reply) in the eval split, whose `messages` end with
    the user turn to answer.

    >>> load_course_dataset("eval").column_names             # doctest: +SKIP
    ['id', 'category', 'messages', 'reference']
    """
    from datasets import Dataset

    return Dataset.from_list(read_split(split, data_dir))


def is_multi_turn(record: Mapping) -> bool:
    """True when the conversation has more than one user turn."""
    return sum(m["role"] == "user" for m in record["messages"]) > 1
