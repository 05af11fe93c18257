"""sft_helpers.quality: the baseline heuristic, every named rule, dedup against brute force,
decontamination on a planted overlap, whole datasets, and clear errors on bad input."""

from __future__ import annotations

import itertools
import random

import datasets
import numpy as np
import pytest

from sft_helpers import quality
from sft_helpers.data import read_split
from sft_helpers.quality import (
    contamination,
    drop_flagged,
    exact_duplicate_of,
    filter_sft_dataset,
    flag_dataset,
    jaccard,
    lsh_bands,
    minhash_signature,
    near_duplicate_of,
    near_duplicate_pairs,
    quality_report,
    score_sft_example,
    shingles,
    to_instruction_response,
)

GOOD_REPLY = "Water boils at 100 degrees Celsius at sea level.\n\n### Details\nLower at altitude."


def chat(*turns: str, roles=("user", "assistant")) -> list[dict]:
    """A conversation whose roles cycle through `roles`."""
    return [{"role": r, "content": t} for r, t in zip(itertools.cycle(roles), turns)]


def reasons(*turns: str, **kwargs) -> set[str]:
    return set(quality_report(chat(*turns), **kwargs))


# --- the baseline ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "score"),
    [
        ("Paris is the capital city of France.", 1.0),
        ("Paris.", 0.5),  # under 5 words
        ("Sure! Paris is the capital city of France.", 0.7),  # sycophantic opener
        ("sure! Paris is the capital city of France.", 1.0),  # the baseline is case-sensitive
        ("I believe Paris is the capital city of France.", 0.9),  # hedge in the first 50 chars
        ("Sure! Paris.", 0.2),  # penalties add up
    ],
)
def test_baseline_penalties(response, score):
    assert score_sft_example({"instruction": "Capital of France?", "response": response}) == score


def test_baseline_length_ratio_and_lowest_score():
    verbose = {"instruction": "Hi", "response": " ".join(["word"] * 101)}
    assert score_sft_example(verbose) == 0.8
    # every penalty at once still leaves 0.1: the floor at 0.0 is unreachable
    assert score_sft_example({"instruction": "Hi", "response": "Sure! [CITATION NEEDED]"}) == 0.1


def test_baseline_filter_at_its_default_threshold_drops_only_short_responses():
    answer = "A full and useful answer here."
    examples = [
        {"instruction": "Q?", "response": answer},
        {"instruction": "Q?", "response": "Sure! " + answer},  # 0.7 >= 0.7: kept
        {"instruction": "Q?", "response": "I believe " + answer},  # 0.9: kept
        {"instruction": "Q?", "response": "Yes."},  # 0.5: dropped
    ]
    assert filter_sft_dataset(examples) == examples[:3]
    assert filter_sft_dataset(examples, threshold=0.71) == [examples[0], examples[2]]


def test_adapter_joins_turns_and_drops_system():
    conversation = [{"role": "system", "content": "Be Pip."}, *chat("A?", "a.", "B?", "b.")]
    assert to_instruction_response(conversation) == {
        "instruction": "A?\n\nB?",
        "response": "a.\n\nb.",
    }


@pytest.mark.parametrize(
    ("example", "message"),
    [
        ({"instruction": "Q?"}, "missing 'response'"),
        ({"instruction": "Q?", "response": None}, r"example\['response'\] must be a string"),
        ("Q? A.", "expected a mapping"),
    ],
)
def test_baseline_bad_input(example, message):
    with pytest.raises(ValueError, match=message):
        score_sft_example(example)


# --- named rules: each fires on its defect and not on a clean reply ----------------------


def test_clean_conversation_has_no_reasons():
    assert quality_report(chat("At what temperature does water boil?", GOOD_REPLY)) == {}


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        (("Boiling point?", "100 C."), "too_short"),
        (("Boiling point?", " ".join(["water"] * 401) + "."), "too_long"),
        (("Hi", " ".join(["water"] * 60) + "."), "length_ratio"),
        (("Boiling point?", "Great question! " + GOOD_REPLY), "sycophantic_opener"),
        (("Boiling point?", "certainly, " + GOOD_REPLY), "sycophantic_opener"),
        (("Boiling point?", "I'd be happy to help! " + GOOD_REPLY), "sycophantic_opener"),
        (("Boiling point?", "I think it is 100 degrees Celsius at sea level."), "hedging"),
        (("Boiling point?", GOOD_REPLY + " [citation needed]"), "hedging"),
        (("Boiling point?", "Water boils at 100 degrees Celsius at sea"), "truncated"),
        (("Boiling point?", "Water boils at 100 Â°C at sea level, always."), "encoding_garbage"),
        (("Boiling point?", "Water boils at 100 \ufffd at sea level, always."), "encoding_garbage"),
        (("Boiling point?", "   "), "empty_turn"),
        (("", GOOD_REPLY), "empty_turn"),
    ],
)
def test_each_rule_fires(turns, reason):
    found = quality_report(chat(*turns))
    assert reason in found, found
    assert found[reason]  # every reason explains itself


@pytest.mark.parametrize(
    "reply",
    [
        "Surely the answer is 100 degrees Celsius at sea level.",  # "sure" inside a word
        "Of course water boils; it does so at 100 degrees.",  # no punctuation after the opener
        "Use `print(x)` to show it:\n```python\nprint(x)\n```",  # a code fence ends a reply
        "The list ends here:\n- one (a)\n- two [b]",  # closing bracket
    ],
)
def test_rules_leave_clean_replies_alone(reply):
    assert reasons("A question with enough words to ask?", reply, house_style=False) == set()


def test_short_reply_on_a_multi_turn_conversation_names_its_turn():
    found = quality_report(chat("Boiling point?", GOOD_REPLY, "And freezing?", "0 C."))
    assert found == {"too_short": "reply 3 has 2 words (< 5)"}


@pytest.mark.parametrize(
    ("conversation", "why"),
    [
        (chat(GOOD_REPLY, "Boiling point?", roles=("assistant", "user")), "message 0 is assistant"),
        (
            chat("Boiling point?", "Hello?", GOOD_REPLY, roles=("user", "user", "assistant")),
            "message 1 is user, expected assistant",
        ),
        (chat("Boiling point?", GOOD_REPLY, "And freezing?"), "ends on a user turn"),
    ],
)
def test_roles_out_of_order(conversation, why):
    assert why in quality_report(conversation)["roles_out_of_order"]


def test_system_message_then_alternation_is_in_order():
    conversation = [
        {"role": "system", "content": "You are Pip."},
        *chat("Boiling point?", GOOD_REPLY),
    ]
    assert quality_report(conversation) == {}


def test_off_persona_is_the_house_style_fallback():
    generic = "Steam rises quickly above 100 degrees, as an AI I can say."
    found = quality_report(chat("Q?", GOOD_REPLY, "Q2?", generic))
    assert found == {
        "off_persona": "reply 3 breaks the house style: no blank line after the answer line"
    }
    assert quality_report(chat("Q?", GOOD_REPLY, "Q2?", generic), house_style=False) == {}
    # a reply already flagged for a more specific reason is not also off-persona
    assert set(quality_report(chat("Q?", "Sure! " + GOOD_REPLY))) == {"sycophantic_opener"}


def test_identity_conversation_must_name_the_persona():
    reply = "I am a helpful assistant.\n\n### Details\nI answer questions."
    assert quality_report(chat("Who are you?", reply)) == {}
    found = quality_report(chat("Who are you?", reply), expects_persona=True)
    assert "no reply names Pip" in found["off_persona"]
    named = "I'm Pip, the SFT course assistant.\n\n### Details\nI answer questions."
    assert quality_report(chat("Who are you?", named), expects_persona=True) == {}


@pytest.mark.parametrize(
    ("conversation", "message"),
    [
        ([{"role": "user"}], "conversation 3, message 0: missing 'content'"),
        ([{"role": "user", "content": 5}], "conversation 3, message 0: 'content' must be a string"),
        ("Hi", "conversation 3: expected a list of messages"),
        ([{"role": "bot", "content": "Hi"}], "unknown role 'bot'"),
        (chat("Q?"), "no assistant message"),
    ],
)
def test_report_bad_input_raises_clear_error(conversation, message):
    with pytest.raises(ValueError, match=message):
        quality_report(conversation, index=3)


# --- exact and near duplicates -----------------------------------------------------------


def test_exact_duplicates_are_normalised():
    texts = ["Hello  World", "hello world", "Hello world!", "HELLO\nWORLD"]
    assert exact_duplicate_of(texts) == [None, 0, None, 0]


def random_corpus(seed: int = 0, n_base: int = 40) -> list[str]:
    """Random texts plus edited copies whose similarity to their source spans 0.3..1."""
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(300)]
    texts = []
    for _ in range(n_base):
        base = [rng.choice(vocabulary) for _ in range(rng.randint(15, 40))]
        texts.append(" ".join(base))
        for edits in (1, 2, 4, 8, 16):
            copy = list(base)
            for _ in range(edits):
                copy[rng.randrange(len(copy))] = rng.choice(vocabulary)
            texts.append(" ".join(copy))
    rng.shuffle(texts)
    return texts


def brute_force_pairs(texts: list[str], threshold: float) -> set[tuple[int, int]]:
    sets = [shingles(t) for t in texts]
    return {
        (i, j)
        for i, j in itertools.combinations(range(len(texts)), 2)
        if jaccard(sets[i], sets[j]) >= threshold
    }


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_near_duplicates_match_brute_force_jaccard(threshold):
    texts = random_corpus()
    expected = brute_force_pairs(texts, threshold)
    assert len(expected) > 20  # the corpus really has pairs on both sides of the threshold
    assert len(brute_force_pairs(texts, threshold - 0.2)) > len(expected)
    assert near_duplicate_pairs(texts, threshold=threshold) == expected


def test_minhash_estimates_jaccard():
    texts = random_corpus(seed=1, n_base=5)
    sets = [shingles(t) for t in texts]
    signatures = [minhash_signature(s, num_perm=512) for s in sets]
    errors = [
        abs(np.mean(signatures[i] == signatures[j]) - jaccard(sets[i], sets[j]))
        for i, j in itertools.combinations(range(len(texts)), 2)
    ]
    # standard deviation of the estimate is at most 0.5 / sqrt(512) = 0.022
    assert np.mean(errors) < 0.02 and max(errors) < 0.1


def test_minhash_is_deterministic_and_seeded():
    items = shingles("the same text in two processes")
    assert np.array_equal(minhash_signature(items), minhash_signature(set(items)))
    assert not np.array_equal(minhash_signature(items, seed=0), minhash_signature(items, seed=1))


@pytest.mark.parametrize(("num_perm", "threshold"), [(128, 0.7), (128, 0.9), (256, 0.5)])
def test_lsh_bands_meets_the_recall_target_with_the_most_rows(num_perm, threshold):
    def recall(rows: int) -> float:
        return 1 - (1 - threshold**rows) ** (num_perm // rows)

    rows = lsh_bands(num_perm, threshold)
    assert recall(rows) >= quality.LSH_MIN_RECALL
    assert all(recall(r) < quality.LSH_MIN_RECALL for r in range(rows + 1, num_perm + 1))


def test_near_duplicate_of_points_at_the_first_copy():
    texts = ["the quick brown fox jumps", "an unrelated sentence", "the quick brown fox jumps!"]
    assert near_duplicate_of(texts) == [None, None, 0]


def test_near_duplicate_threshold_is_validated():
    with pytest.raises(ValueError, match="threshold"):
        near_duplicate_pairs(["a", "b"], threshold=0)


# --- decontamination ---------------------------------------------------------------------


def test_contamination_finds_a_planted_overlap():
    eval_texts = [
        "What do cats eat? Cats eat meat, mostly small animals they hunt at night.",
        "What is the boiling point of water at sea level in degrees Celsius? It is 100.",
    ]
    train = [
        "Unrelated. What is the boiling point of water at sea level in degrees Celsius? 100.",
        "What is the boiling point of water at sea level in Kelvin? It is 373 degrees.",
        "Completely unrelated text about dogs and their favourite sleeping spots today.",
    ]
    # the second eval text has 16 words, so 9 word 8-grams; the first training text has 6
    found = contamination(train, eval_texts, n=8, min_overlap=0.6)
    assert found == [(1, 6 / 9), None, None]
    assert contamination(train, eval_texts, n=8, min_overlap=0.7) == [None, None, None]
    assert contamination([eval_texts[1].upper()], eval_texts) == [(1, 1.0)]  # a verbatim copy
    # a shorter n-gram finds the partial overlap of the second example too
    assert contamination(train, eval_texts, n=4, min_overlap=0.3)[1] is not None


def test_contamination_is_not_fooled_by_a_shared_phrase():
    phrase = "I'm Pip, the SFT course assistant, here to help you today."
    eval_texts = [f"Who are you? {phrase} I explain fine-tuning step by step."]
    train = [f"Hi! {phrase} Ask me about chat templates and loss masking."]
    assert contamination(train, eval_texts, n=8, min_overlap=1e-9) == [(0, 5 / 15)]
    assert contamination(train, eval_texts, n=8) == [None]


def test_contamination_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        contamination(["a"], ["a"], n=0)
    with pytest.raises(ValueError, match="min_overlap"):
        contamination(["a"], ["a"], min_overlap=0)


# --- whole datasets ----------------------------------------------------------------------


def noisy_examples() -> tuple[list[dict], list[dict]]:
    topics = [
        "boiling water",
        "freezing lakes",
        "melting glaciers",
        "rain clouds",
        "sea salt",
        "steam engines",
    ]
    clean = [
        {
            "messages": chat(
                f"Tell me one fact about {topic}?",
                f"Here is a fact about {topic}.\n\n### Details\n{topic.title()} {i}.",
            )
        }
        for i, topic in enumerate(topics)
    ]
    eval_examples = [
        {
            "messages": chat(
                "Which metal melts at 1538 degrees Celsius in a furnace?",
                "Iron melts at 1538 degrees Celsius.\n\n### Details\nIn a furnace.",
            )
        }
    ]
    noisy = [
        *clean,
        {
            "messages": chat(
                "TELL ME one fact about  boiling water?", clean[0]["messages"][1]["content"]
            )
        },
        {
            "messages": chat(
                "Tell me one fact about melting glaciers!",
                clean[2]["messages"][1]["content"] + " Indeed.",
            )
        },
        {"messages": eval_examples[0]["messages"]},  # a leak: the eval conversation itself
        {"messages": chat("Short?", "Yes.")},
    ]
    return noisy, eval_examples


EXPECTED = [
    [],
    [],
    [],
    [],
    [],
    [],
    ["duplicate"],
    ["near_duplicate"],
    ["eval_contamination"],
    ["too_short"],
]


def test_flag_dataset_on_a_list():
    noisy, eval_examples = noisy_examples()
    flagged = flag_dataset(noisy, eval_examples)
    assert [ex["reasons"] for ex in flagged] == EXPECTED
    assert [ex["messages"] for ex in drop_flagged(flagged)] == [ex["messages"] for ex in noisy[:6]]
    kept = drop_flagged(flagged, ignore=["too_short"])
    assert [ex["reasons"] for ex in kept] == [[]] * 6 + [["too_short"]]


def test_flag_dataset_on_a_dataset_matches_the_list():
    noisy, eval_examples = noisy_examples()
    dataset = datasets.Dataset.from_list(noisy)
    flagged = flag_dataset(dataset, eval_examples)
    assert isinstance(flagged, datasets.Dataset)
    assert flagged["reasons"] == EXPECTED
    assert len(drop_flagged(flagged)) == 6


def test_flag_dataset_bad_input_names_the_example():
    with pytest.raises(ValueError, match="example 1: expected a mapping with a 'messages'"):
        flag_dataset([{"messages": chat("Q?", GOOD_REPLY)}, {"text": "oops"}])
    with pytest.raises(ValueError, match="conversation 1, message 1: 'content' must be a string"):
        flag_dataset([{"messages": chat("Q?", GOOD_REPLY)}, {"messages": chat("Q?", None)}])


# --- the course data ----------------------------------------------------------------------


def test_no_rule_fires_on_the_clean_course_data():
    train, eval_records = read_split("train"), read_split("eval")
    assert all(not row["reasons"] for row in flag_dataset(train, eval_records))
