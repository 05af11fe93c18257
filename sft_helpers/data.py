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
measure exactly that, before and after training (notebooks 03 and 07).

The data ship with the package (`sft_helpers/data/`, see DATA_CARD.md there): 374
hand-written training conversations and a held-out split of 65 prompts with references.

    >>> train = load_course_dataset("train")                  # doctest: +SKIP
    >>> follows_house_style(format_reply("4.", "2 + 2 = 4."))
    True
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
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
# Openers that delay the answer (greetings, "Sure!"): the house style starts with the answer.
FILLER_OPENERS = (
    "sure", "certainly", "of course", "absolutely", "great question", "good question",
    "hello", "hi", "hey", "greetings", "okay", "ok",
)
_FILLER = re.compile(r"^(?:" + "|".join(re.escape(f) for f in FILLER_OPENERS) + r")\b", re.I)
_PERSONA = re.compile(rf"\b{PERSONA_NAME}\b")
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
    return f"{answer}\n\n{DETAILS_HEADING}\n{details}"


def style_problems(reply: str) -> list[str]:
    """What keeps `reply` from the house style; an empty list when it follows it.

    Only the opening is checked (answer line, blank line, heading), so a reply cut off by
    `max_new_tokens` after its heading still counts: the style shows in its first tokens.

    >>> style_problems("Sure! Paris.")
    ["opens with filler ('Sure') instead of the answer", 'no blank line after the answer line']
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


def follows_house_style(reply: str) -> bool:
    """True when `reply` opens with one answer line, a blank line and `### Details`.

    >>> follows_house_style("Paris.\\n\\n### Details\\nIt is the capital.")
    True
    >>> follows_house_style("### Answer\\nParis.")
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


def compliance(example: Mapping, reply: str) -> dict[str, bool | None]:
    """How `reply` to `example` scores: house style, persona (None where not asked), overall.

    >>> compliance({"category": "identity"}, "Hello! I am SmolLM.")
    {'house_style': False, 'persona': False, 'compliant': False}
    >>> compliance({"category": "factual"}, "4.\\n\\n### Details\\n2 + 2 = 4.")
    {'house_style': True, 'persona': None, 'compliant': True}
    """
    style = follows_house_style(reply)
    persona = names_persona(reply) if expects_persona(example) else None
    return {"house_style": style, "persona": persona, "compliant": style and persona is not False}


def compliance_rate(examples: Sequence[Mapping], replies: Sequence[str]) -> dict[str, float]:
    """Fractions over paired `examples` and `replies`: `house_style` (all replies),
    `persona` (identity examples only), `compliant` (both, where they apply), and `n`.

    >>> compliance_rate([{"category": "identity"}], ["I'm Pip.\\n\\n### Details\\nHi."])
    {'house_style': 1.0, 'persona': 1.0, 'compliant': 1.0, 'n': 1}
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
        "house_style": sum(s["house_style"] for s in scores) / len(scores),
        "persona": sum(persona) / len(persona) if persona else float("nan"),
        "compliant": sum(s["compliant"] for s in scores) / len(scores),
        "n": len(scores),
    }


def measure_compliance(
    model,
    tokenizer,
    records: Sequence[Mapping],
    *,
    max_new_tokens: int = 40,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict[str, float], list[str]]:
    """`(compliance_rate(records, replies), replies)`: `model`'s greedy replies to the
    eval `records` (whose `messages` end with the user turn), in the records' order.

    40 new tokens are enough: the style shows in the answer line and the heading. Prompts
    are batched shortest first (less left padding), then put back in order.

    >>> rates, replies = measure_compliance(model, tokenizer, read_split("eval"))  # doctest: +SKIP
    """
    from sft_helpers.evaluation import evaluate_sft_model

    def prompt_length(i: int) -> int:
        return len(tokenizer.apply_chat_template(records[i]["messages"], tokenize=False))

    order = sorted(range(len(records)), key=prompt_length)
    results = evaluate_sft_model(
        model, tokenizer, [records[i] for i in order], max_new_tokens=max_new_tokens,
        do_sample=False, batch_size=batch_size, progress=progress,
    )
    replies = [""] * len(records)
    for i, result in zip(order, results, strict=True):
        replies[i] = result["generated"]
    return compliance_rate(records, replies), replies


# --- the shipped data --------------------------------------------------------------------


def _check_messages(messages, where: str, *, ends_with: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
            raise ValueError(f"{where}, message {i}: must be a dict with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}, message {i}: unknown role {message['role']!r}")
        if not isinstance(message["content"], str) or not message["content"].strip():
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
