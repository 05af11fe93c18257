"""A labelled noisy dataset, to measure the quality filters of `sft_helpers.quality`.

`inject_defect` plants one named defect (from `DEFECTS`) in a copy of a clean conversation;
`build_noisy_dataset` mixes the course's training conversations with such copies, each row
labelled with its defect (`CLEAN` for none), and the shipped `noisy_train.jsonl` is that set.
`precision_recall` and `filter_table` then score a filter's flags against the labels. The
same authors planted the defects and wrote the rules, so those scores flatter the rules.

    >>> precision_recall([True, False], ["too_short", "too_short"], "too_short")
    (1.0, 0.5)
"""

from __future__ import annotations

import copy
import random
import string
from collections.abc import Sequence
from pathlib import Path

from sft_helpers.data import DATA_DIR, read_jsonl
from sft_helpers.quality import answered, messages_of

CLEAN = "none"  # the label of an example with no injected defect
DEFECTS = (
    "duplicate",
    "near_duplicate",
    "sycophantic_opener",
    "too_short",
    "truncated",
    "roles_out_of_order",
    "empty_turn",
    "off_persona",
    "eval_contamination",
)
# The defects `inject_defect` plants inside a conversation (the others add rows).
IN_PLACE_DEFECTS = tuple(d for d in DEFECTS
                         if d not in ("duplicate", "near_duplicate", "eval_contamination"))
INJECTED_OPENERS = ("Sure! ", "Certainly! ", "Great question! ", "Absolutely! ", "Of course, ")
# A generic-assistant reply: no persona, no house style.
OFF_PERSONA_REPLY = "As an AI language model, I don't have a name, but here is what I know: {}"
NOISY_PER_DEFECT = 12
NOISY_FILE = DATA_DIR / "noisy_train.jsonl"


def _reply_index(conversation, rng: random.Random) -> int:
    return rng.choice([i for i, m in enumerate(conversation) if m["role"] == "assistant"])


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0]


def inject_defect(conversation, defect: str, rng: random.Random) -> list[dict]:
    """A copy of `conversation` with one defect from `DEFECTS` planted in it ("duplicate" and
    "near_duplicate" return the copy to add next to the source; "eval_contamination" needs
    an eval conversation, see `build_noisy_dataset`). The input is left untouched.

    >>> chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    >>> inject_defect(chat, "roles_out_of_order", random.Random(0))[0]["role"]
    'assistant'
    """
    chat = copy.deepcopy(list(conversation))
    k = _reply_index(chat, rng)
    reply = chat[k]["content"]
    if defect == "duplicate":
        return chat
    if defect == "near_duplicate":  # drop one word inside a line: Jaccard stays high
        words = reply.split(" ")
        del words[rng.choice([i for i in range(1, len(words) - 1) if "\n" not in words[i]])]
        chat[k]["content"] = " ".join(words)
    elif defect == "sycophantic_opener":
        chat[k]["content"] = rng.choice(INJECTED_OPENERS) + reply
    elif defect == "too_short":
        chat[k]["content"] = (
            " ".join(_first_line(reply).split()[: rng.randint(1, 3)]).rstrip(".") + "."
        )
    elif defect == "truncated":  # cut at 40-80% of the words, mid-sentence
        words = reply.split(" ")
        cut = max(1, int(len(words) * rng.uniform(0.4, 0.8)))
        chat[k]["content"] = " ".join(words[:cut]).rstrip(string.punctuation)
    elif defect == "roles_out_of_order":  # the first user turn and its reply swap places
        first = next(i for i, m in enumerate(chat) if m["role"] == "user")
        chat[first], chat[first + 1] = chat[first + 1], chat[first]
    elif defect == "empty_turn":
        chat[rng.choice([i for i, m in enumerate(chat) if m["role"] != "system"])]["content"] = ""
    elif defect == "off_persona":
        chat[k]["content"] = OFF_PERSONA_REPLY.format(_first_line(reply))
    else:
        raise ValueError(f"cannot inject {defect!r}; expected one of {DEFECTS[:-1]}")
    return chat


def build_noisy_dataset(
    clean: Sequence, eval_examples: Sequence, per_defect: int = NOISY_PER_DEFECT, seed: int = 0
) -> list[dict]:
    """The clean conversations mixed with `per_defect` injected examples of each defect,
    shuffled, each row {"messages", "defect"} with defect `CLEAN` ("none") or a name from
    `DEFECTS`. In-place defects replace a clean conversation; duplicates and near
    duplicates are added copies of a clean one (always placed after their source, so the
    copy is the one a filter should drop); contamination adds eval conversations verbatim,
    their reference as the reply. Other fields of the examples (id, category) are kept.
    """
    rng = random.Random(seed)
    rows = [{**ex, "messages": messages_of(ex, i), "defect": CLEAN} for i, ex in enumerate(clean)]
    picked = rng.sample(range(len(rows)), per_defect * (len(IN_PLACE_DEFECTS) + 2))
    for n, i in enumerate(picked[: per_defect * len(IN_PLACE_DEFECTS)]):
        defect = IN_PLACE_DEFECTS[n // per_defect]
        rows[i] = {
            **rows[i],
            "messages": inject_defect(rows[i]["messages"], defect, rng),
            "defect": defect,
        }
    sources = picked[per_defect * len(IN_PLACE_DEFECTS) :]  # clean rows that get a copy
    copies = []
    for n, i in enumerate(sources):
        defect = "duplicate" if n < per_defect else "near_duplicate"
        copies.append(
            {
                **rows[i],
                "messages": inject_defect(rows[i]["messages"], defect, rng),
                "defect": defect,
            }
        )
    leaks = [  # an eval conversation with its reference reply, as a training example
        {
            **{key: value for key, value in ex.items() if key != "reference"},
            "messages": answered(ex, i),
            "defect": "eval_contamination",
        }
        for i, ex in enumerate(rng.sample(list(eval_examples), per_defect))
    ]
    order = list(range(len(rows) + len(copies) + len(leaks)))
    rng.shuffle(order)
    position = {item: place for place, item in enumerate(order)}
    for n, source in enumerate(sources):  # a copy must come after its source
        copy_item = len(rows) + n
        if position[copy_item] < position[source]:
            position[copy_item], position[source] = position[source], position[copy_item]
    everything = rows + copies + leaks
    return [everything[item] for item in sorted(position, key=position.get)]


def with_defect(clean: Sequence, defect: str, rate: float, seed: int = 0) -> list[dict]:
    """The clean examples (rows with `messages`) in their order, `defect` planted
    (`inject_defect`) in a seeded `rate` share of them, each row labelled with its "defect"
    (`CLEAN` or `defect`). Notebook 06 trains on such a set to see whether the model learns
    the defect.

    >>> chat = {"messages": [{"role": "user", "content": "Hi?"},
    ...                      {"role": "assistant", "content": "Hello."}]}
    >>> [row["defect"] for row in with_defect([chat] * 4, "too_short", 0.5)]
    ['none', 'too_short', 'none', 'too_short']
    """
    if defect not in IN_PLACE_DEFECTS:
        raise ValueError(f"with_defect plants a defect in place: one of {IN_PLACE_DEFECTS}, "
                         f"not {defect!r}")
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must be a share between 0 and 1, not {rate!r}")
    rng = random.Random(seed)
    rows = [{**ex, "messages": messages_of(ex, i), "defect": CLEAN} for i, ex in enumerate(clean)]
    for i in sorted(rng.sample(range(len(rows)), round(rate * len(rows)))):
        rows[i] = {**rows[i], "messages": inject_defect(rows[i]["messages"], defect, rng),
                   "defect": defect}
    return rows


def load_noisy_dataset(path: Path = NOISY_FILE) -> list[dict]:
    """The shipped labelled noisy set: `build_noisy_dataset` of the course's train split
    with the eval split's leaks, seed 0, one JSON object per line. A bad line raises
    `ValueError` naming the line.

    Rebuild it (after the course data change) with:
    `write_jsonl(build_noisy_dataset(read_split("train"), read_split("eval")), NOISY_FILE)`.
    """
    rows = read_jsonl(path)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or row.get("defect") not in (CLEAN, *DEFECTS):
            raise ValueError(f"{Path(path).name} line {number}: no known 'defect' label")
    return rows


# --- measuring a filter ---------------------------------------------------------------------


def precision_recall(
    flagged: Sequence[bool], labels: Sequence[str], defect: str | None = None
) -> tuple[float | None, float | None]:
    """Precision (flagged examples that carry the defect) and recall (examples with the
    defect that are flagged). `defect=None` counts every label other than `CLEAN` as a
    defect. A ratio with nothing to divide by is None, never NaN.

    >>> precision_recall([True, True, False], ["too_short", "none", "too_short"], "too_short")
    (0.5, 0.5)
    """
    if len(flagged) != len(labels):
        raise ValueError(f"{len(flagged)} flags but {len(labels)} labels")
    positive = [label != CLEAN if defect is None else label == defect for label in labels]
    hits = sum(f and p for f, p in zip(flagged, positive, strict=True))
    n_flagged, n_positive = sum(map(bool, flagged)), sum(positive)
    return (
        hits / n_flagged if n_flagged else None,
        hits / n_positive if n_positive else None,
    )


def filter_table(
    reasons: Sequence[Sequence[str]], labels: Sequence[str], baseline_kept: Sequence[bool]
) -> list[dict]:
    """One row per defect label: how many examples carry it, the share of them the baseline
    drops (its recall; with one score for all defects it has no per-defect precision), and
    the precision and recall of the named rule of the same name. A last row, "any defect",
    scores dropping every flagged example against every injected defect.

    >>> table = filter_table([["too_short"], []], ["too_short", "none"], [False, True])
    >>> [(row["defect"], row["baseline recall"], row["rule precision"]) for row in table]
    [('too_short', 1.0, 1.0), ('any defect', 1.0, 1.0)]
    """
    dropped = [not kept for kept in baseline_kept]
    rows = []
    for defect in sorted(set(labels) - {CLEAN}):
        precision, recall = precision_recall([defect in r for r in reasons], labels, defect)
        rows.append(
            {
                "defect": defect,
                "examples": sum(label == defect for label in labels),
                "baseline precision": None,
                "baseline recall": precision_recall(dropped, labels, defect)[1],
                "rule precision": precision,
                "rule recall": recall,
            }
        )
    base_precision, base_recall = precision_recall(dropped, labels)
    precision, recall = precision_recall([bool(r) for r in reasons], labels)
    rows.append(
        {
            "defect": "any defect",
            "examples": sum(label != CLEAN for label in labels),
            "baseline precision": base_precision,
            "baseline recall": base_recall,
            "rule precision": precision,
            "rule recall": recall,
        }
    )
    return rows
