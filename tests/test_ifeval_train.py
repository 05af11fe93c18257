"""The instruction-following training mixture (ifeval_train.jsonl) is what its data card says.

Every row is a one-turn conversation whose user prompt is a request followed by 1-3 verifiable
instructions worded as IFEval words them (`ifeval.describe`), and whose reply follows every
one of them under IFEval's strict rules (`ifeval.check`). The rows fit the course's training
window, and their requests are held out from the eval prompts by meaning, not just by string:
the instruction sentences are boilerplate shared on purpose, so they are removed before the
requests are compared.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter

import pytest

from sft_helpers import ifeval
from sft_helpers.data import (
    DATA_DIR,
    DETAILS_HEADING,
    names_persona,
    read_jsonl,
    validate_conversation,
)
from sft_helpers.quality import (
    CONTAMINATION_NGRAM,
    NEAR_DUPLICATE_THRESHOLD,
    contamination,
    jaccard,
    normalise,
    shingles,
    word_ngrams,
)

MIN_ROWS = 150
MIN_PER_INSTRUCTION = 8
MAX_INSTRUCTIONS = 3
# Held out by meaning: a train request and an eval request may share no word 8-gram, and
# their character-shingle Jaccard must stay below this (stricter than the 0.7 that makes a
# near duplicate inside one split).
MAX_HELD_OUT_JACCARD = 0.5
FIELDS = {"id", "category", "messages", "instruction_id_list", "kwargs"}
REPEAT = "combination:repeat_prompt"

ROWS = read_jsonl(DATA_DIR / "ifeval_train.jsonl")


def prompt_of(row) -> str:
    return row["messages"][0]["content"]


def reply_of(row) -> str:
    return row["messages"][1]["content"]


def instructions(row):
    return list(zip(row["instruction_id_list"], row["kwargs"], strict=True))


def sentence(instruction_id: str, kwargs) -> str:
    """The instruction as the prompt states it: IFEval's wording, via `ifeval.describe`."""
    return ifeval.describe(instruction_id, **kwargs)


def request_of(prompt: str, ids, kwargs) -> str:
    """The prompt without its instruction sentences: what the user actually asks for.

    >>> request_of("Describe a kite. Answer with less than 20 words.",
    ...            ["length_constraints:number_words"],
    ...            [{"relation": "less than", "num_words": 20}])
    'Describe a kite.'
    """
    for instruction_id, arguments in zip(ids, kwargs, strict=True):
        text = sentence(instruction_id, arguments)
        if text not in prompt:
            raise ValueError(f"the prompt does not state {instruction_id}: {text!r}")
        prompt = prompt.replace(text, " ")
    return " ".join(prompt.split())


@functools.cache  # read lazily: only the held-out tests need the eval file
def eval_rows() -> tuple[dict, ...]:
    return tuple(ifeval.load_ifeval("eval"))


@functools.cache
def eval_requests() -> tuple[str, ...]:
    return tuple(
        request_of(r["prompt"], r["instruction_id_list"], r["kwargs"]) for r in eval_rows()
    )


TRAIN_REQUESTS = [request_of(prompt_of(r), r["instruction_id_list"], r["kwargs"]) for r in ROWS]


@functools.cache  # every request is compared with every eval request: shingle each once
def shingle_set(text: str) -> frozenset[str]:
    return frozenset(shingles(text))


def test_enough_rows_with_unique_ids():
    ids = [row["id"] for row in ROWS]
    assert len(ROWS) >= MIN_ROWS
    assert len(set(ids)) == len(ids), [i for i, n in Counter(ids).items() if n > 1]


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row["id"])
def test_row_is_a_one_turn_conversation(row):
    assert set(row) == FIELDS
    assert row["category"] == "instructions"
    validate_conversation(row["messages"])
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row["id"])
def test_instructions_are_valid_and_aligned_with_their_arguments(row):
    # validate_prompt checks the lengths agree and every kwargs is exactly its instruction's.
    ifeval.validate_prompt({**row, "prompt": prompt_of(row)}, row["id"])
    ids = row["instruction_id_list"]
    assert 1 <= len(ids) <= MAX_INSTRUCTIONS
    assert len(set(ids)) == len(ids), "an instruction is listed twice"


def test_every_instruction_is_taught_often_enough():
    counts = Counter(i for row in ROWS for i in row["instruction_id_list"])
    assert set(counts) == set(ifeval.INSTRUCTIONS)
    assert min(counts.values()) >= MIN_PER_INSTRUCTION, counts


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row["id"])
def test_prompt_states_each_instruction_in_ifeval_words(row):
    request = request_of(prompt_of(row), row["instruction_id_list"], row["kwargs"])
    assert len(request.split()) >= 3, f"no request left once the instructions go: {request!r}"


@pytest.mark.parametrize(
    "row", [r for r in ROWS if REPEAT in r["instruction_id_list"]], ids=lambda row: row["id"]
)
def test_repeat_prompt_argument_is_the_request_before_the_repeat_sentence(row):
    kwargs = row["kwargs"][row["instruction_id_list"].index(REPEAT)]
    before, repeat_sentence, after = prompt_of(row).partition(sentence(REPEAT, kwargs))
    assert repeat_sentence and not after.strip(), "the repeat sentence must end the prompt"
    assert kwargs["prompt_to_repeat"] == before.strip()


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row["id"])
def test_reply_follows_every_instruction_strictly(row):
    followed = ifeval.follows(row, reply_of(row))
    broken = [i for i, ok in zip(row["instruction_id_list"], followed, strict=True) if not ok]
    assert not broken, f"{row['id']} breaks {broken}"


@pytest.mark.parametrize(
    "row", [r for r in ROWS if REPEAT in r["instruction_id_list"]], ids=lambda row: row["id"]
)
def test_repeated_request_does_not_follow_the_other_instructions_by_itself(row):
    # The repeated text contains the other instruction sentences; the answer after it must
    # follow them on its own (otherwise a keyword or "P.S." in the copy would pass for free).
    kwargs = row["kwargs"][row["instruction_id_list"].index(REPEAT)]
    answer = reply_of(row).strip()[len(kwargs["prompt_to_repeat"].strip()) :]
    others = [(i, k) for i, k in instructions(row) if i != REPEAT]
    assert all(ifeval.check(i, answer, **k) for i, k in others)


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row["id"])
def test_reply_is_plain_text_not_the_house_style(row):
    # These rows teach explicit instructions; the house style and persona belong elsewhere.
    assert DETAILS_HEADING not in reply_of(row)
    assert not names_persona(reply_of(row))


def test_conversations_fit_the_training_window():
    from sft_helpers.models import load_tokenizer
    from sft_helpers.training import RECIPE

    max_length = RECIPE["training"]["max_length"]
    tokenizer = load_tokenizer()
    # The tokens the trainer sees: the chat template renders SmolLM2's default system prompt.
    lengths = {
        row["id"]: len(
            tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
        )
        for row in ROWS
    }
    too_long = {i: n for i, n in lengths.items() if n > max_length}
    assert not too_long, f"longer than max_length={max_length}: {too_long}"


def test_train_requests_are_not_near_duplicates_of_each_other():
    sets = [shingle_set(t) for t in TRAIN_REQUESTS]
    pairs = [
        (ROWS[i]["id"], ROWS[j]["id"])
        for i, j in itertools.combinations(range(len(sets)), 2)
        if jaccard(sets[i], sets[j]) >= NEAR_DUPLICATE_THRESHOLD
    ]
    assert not pairs


def test_no_train_prompt_is_an_eval_prompt():
    eval_prompts = {normalise(r["prompt"]) for r in eval_rows()}
    eval_asks = {normalise(t) for t in eval_requests()}
    assert not [r["id"] for r in ROWS if normalise(prompt_of(r)) in eval_prompts]
    assert not [
        r["id"] for r, t in zip(ROWS, TRAIN_REQUESTS, strict=True) if normalise(t) in eval_asks
    ]


def test_train_requests_share_no_word_8gram_with_eval_requests():
    eval_grams = {g for t in eval_requests() for g in word_ngrams(t, CONTAMINATION_NGRAM)}
    shared = {
        row["id"]: sorted(set(word_ngrams(t, CONTAMINATION_NGRAM)) & eval_grams)
        for row, t in zip(ROWS, TRAIN_REQUESTS, strict=True)
    }
    assert not {i: g for i, g in shared.items() if g}


def test_train_requests_are_held_out_from_eval_requests_by_shingles():
    eval_sets = [shingle_set(t) for t in eval_requests()]
    close = {}
    for row, text in zip(ROWS, TRAIN_REQUESTS, strict=True):
        best = max(jaccard(shingle_set(text), e) for e in eval_sets)
        if best >= MAX_HELD_OUT_JACCARD:
            close[row["id"]] = round(best, 3)
    assert not close, f"train requests too close to an eval request: {close}"


def test_train_replies_do_not_copy_eval_references():
    # The course's own contamination rule, on whole texts: no train conversation covers most
    # of the 8-grams of an eval prompt with its reference.
    train = [f"{t}\n{reply_of(r)}" for r, t in zip(ROWS, TRAIN_REQUESTS, strict=True)]
    evals = [
        f"{t}\n{r.get('reference') or ''}"
        for r, t in zip(eval_rows(), eval_requests(), strict=True)
    ]
    leaks = {ROWS[i]["id"]: hit for i, hit in enumerate(contamination(train, evals)) if hit}
    assert not leaks


def test_the_data_card_states_the_files_counts():
    card = (DATA_DIR / "DATA_CARD.md").read_text(encoding="utf-8")
    card = card.split("## IFEval training mixture (`ifeval_train.jsonl`)")[1]
    uses = Counter(i for row in ROWS for i in row["instruction_id_list"])
    for instruction_id in ifeval.INSTRUCTIONS:
        assert f"| `{instruction_id}` | {uses[instruction_id]} |" in card
    sizes = Counter(len(row["instruction_id_list"]) for row in ROWS)
    assert f"{len(ROWS)} one-turn conversations" in card
    stated = f"{sizes[1]} rows carry one instruction and {sizes[2]} two ({sum(uses.values())} "
    assert stated in card and not sizes[3], "the card says no row has three instructions"
