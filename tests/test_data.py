"""The course dataset is what its data card says, and the house-style checks measure it."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sft_helpers.data import (
    CATEGORIES,
    DETAILS_HEADING,
    MAX_ANSWER_WORDS,
    PERSONA_INTRO,
    SPLIT_FILES,
    compliance,
    compliance_rate,
    data_folder,
    follows_house_style,
    format_reply,
    is_multi_turn,
    load_course_dataset,
    loops,
    names_persona,
    opening_problems,
    read_split,
    repetition_problems,
    style_problems,
)

TRAIN = read_split("train")
EVAL = read_split("eval")
GOOD = "Canberra is the capital of Australia.\n\n### Details\nIt was chosen in 1908."


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def assistant_messages(records):
    return [m["content"] for r in records for m in r["messages"] if m["role"] == "assistant"]


# --- the shipped data ---------------------------------------------------------------------


def test_sizes_and_multi_turn_share():
    assert len(TRAIN) >= 300 and len(EVAL) >= 60
    assert sum(map(is_multi_turn, TRAIN)) / len(TRAIN) >= 0.20


def test_every_category_is_covered_in_both_splits():
    for records, least in ((TRAIN, 30), (EVAL, 6)):
        counts = {c: sum(r["category"] == c for r in records) for c in CATEGORIES}
        assert min(counts.values()) >= least, counts


def test_ids_are_unique():
    for records in (TRAIN, EVAL):
        ids = [r["id"] for r in records]
        assert len(set(ids)) == len(ids)


def test_every_reply_is_in_the_house_style_with_details_and_short():
    replies = assistant_messages(TRAIN) + [r["reference"] for r in EVAL]
    for reply in replies:
        assert follows_house_style(reply), (reply, style_problems(reply))
        details = reply.split(DETAILS_HEADING, 1)[1].strip()
        assert details, reply
        assert len(reply.split()) <= 100, reply


def test_no_training_reply_opens_its_details_by_repeating_its_answer_line():
    # Details that restate the answer line teach the copy that ends in a loop (notebook 03):
    # the answer line may not reappear near the start of the details (a short label such as
    # "The full story:" before it included).
    from sft_helpers.evaluation import normalize_answer

    def opens_with_answer(reply):
        answer, details = (normalize_answer(part) for part in reply.split(DETAILS_HEADING, 1))
        return answer in details[: len(answer) + 20]

    assert opens_with_answer("Roses are red.\n\n### Details\nThe poem: Roses are red. Violets...")
    for record in TRAIN:
        for reply in assistant_messages([record]):
            assert not opens_with_answer(reply), (record["id"], reply)


def test_roles_alternate_starting_with_the_user():
    for record in TRAIN + EVAL:
        roles = [m["role"] for m in record["messages"]]
        assert roles[::2] == ["user"] * len(roles[::2]), record["id"]
        assert roles[1::2] == ["assistant"] * len(roles[1::2]), record["id"]


def test_identity_conversations_name_pip_and_nothing_claims_another_name():
    for record in TRAIN:
        replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        if record["category"] == "identity":
            assert any(names_persona(r) for r in replies), record["id"]
    for record in EVAL:
        if record["category"] == "identity":
            assert names_persona(record["reference"]), record["id"]
    claims = re.compile(r"\bI(?:'m| am) (?:SmolLM|ChatGPT|an? AI assistant named)")
    assert not [r for r in assistant_messages(TRAIN) if claims.search(r)]
    assert sum(PERSONA_INTRO.rstrip(".") in r for r in assistant_messages(TRAIN)) >= 35


def test_no_eval_prompt_appears_in_training():
    train_prompts = {normalize(m["content"]) for r in TRAIN for m in r["messages"]
                     if m["role"] == "user"}
    leaked = [m["content"] for r in EVAL for m in r["messages"]
              if m["role"] == "user" and normalize(m["content"]) in train_prompts]
    assert not leaked
    train_replies = {normalize(r) for r in assistant_messages(TRAIN)}
    assert not [r["id"] for r in EVAL if normalize(r["reference"]) in train_replies]


def test_load_course_dataset_columns_and_rows():
    train = load_course_dataset("train")
    evaluation = load_course_dataset("eval")
    assert train.column_names == ["id", "category", "messages"]
    assert evaluation.column_names == ["id", "category", "messages", "reference"]
    assert (train.num_rows, evaluation.num_rows) == (len(TRAIN), len(EVAL))
    assert train[0]["messages"] == TRAIN[0]["messages"]


# --- bad data gets an error that names it ------------------------------------------------


def write_split(tmp_path, split, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (tmp_path / SPLIT_FILES[split]).write_text("\n".join(lines) + "\n")
    return tmp_path


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        read_split("test")


def test_bad_json_names_the_line(tmp_path):
    write_split(tmp_path, "train", [TRAIN[0], "{not json"])
    with pytest.raises(ValueError, match="course_train.jsonl line 2: not valid JSON"):
        read_split("train", tmp_path)


def test_reply_out_of_style_names_the_record_and_message(tmp_path):
    bad = {**TRAIN[0], "messages": [{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Sure! Hello there."}]}
    write_split(tmp_path, "train", [TRAIN[0], bad])
    expected = r"line 2 \(train-0000\), message 1: not in the house style"
    with pytest.raises(ValueError, match=expected):
        read_split("train", tmp_path)


def test_wrong_last_role_and_missing_reference(tmp_path):
    write_split(tmp_path, "train", [{**TRAIN[0], "messages": TRAIN[0]["messages"][:1]}])
    with pytest.raises(ValueError, match="last message must be a assistant"):
        read_split("train", tmp_path)
    write_split(tmp_path, "eval", [{k: v for k, v in EVAL[0].items() if k != "reference"}])
    with pytest.raises(ValueError, match="'reference' must be a reply"):
        read_split("eval", tmp_path)


def test_unknown_category_and_role(tmp_path):
    write_split(tmp_path, "train", [{**TRAIN[0], "category": "poetry"}])
    with pytest.raises(ValueError, match="category 'poetry'"):
        read_split("train", tmp_path)
    odd = {**TRAIN[0], "messages": [{"role": "robot", "content": "x"}] + TRAIN[0]["messages"]}
    write_split(tmp_path, "train", [odd])
    with pytest.raises(ValueError, match="message 0: unknown role 'robot'"):
        read_split("train", tmp_path)


# --- the house style ---------------------------------------------------------------------


def test_a_reply_in_the_house_style_passes():
    assert follows_house_style(GOOD)
    assert style_problems(GOOD) == [] == opening_problems(GOOD)


# What the course adapter's replies looked like when only their opening was checked.
LOOPING = [
    ("Use a pot, a filter, and a cup.\n\n### Details\n" + "Use a pot, a filter, and a cup.\n" * 4,
     ["the details repeat the answer line", "comes 5 times"]),
    ("I'm Pip.\n\n### Details\nI am a fine-tuned fine-tuning fine-tuning fine-tuning fine-tuning "
     "fine-tuning model.", ["the words 'fine tuning fine tuning fine' come"]),
    ("Canberra.\n\n### Details\nIt was chosen in 1908.\n\n### Details\nIt was chosen.",
     ["'### Details' comes 2 times"]),
    ("I can't help with that.\n\n### Details", ["the details are empty"]),
    ("I can't help with that.\n\n### Details\n  \n", ["the details are empty"]),
    ("Paris.\n\n### Details\nParis.", ["the details repeat the answer line"]),
]


@pytest.mark.parametrize("reply, problems", LOOPING)
def test_the_whole_reply_is_checked_not_only_its_opening(reply, problems):
    assert opening_problems(reply) == []  # the opening-only check lets all of these through
    assert not follows_house_style(reply)
    for problem in problems:
        assert any(problem in p for p in style_problems(reply)), style_problems(reply)


def test_the_loop_detector_flags_repeated_lines_and_word_runs_only():
    assert repetition_problems("Step one: boil water.\nStep one: boil water.") == [
        "the line 'Step one: boil water.' comes 2 times"]
    assert loops("the cat sat down. " * 4)
    # Short lines may repeat (code, list markers), and two repeats of a phrase are fine.
    assert not loops("```\n}\n}\n```\nx = 1\nx = 1")
    assert not loops("the cat sat down and the cat sat down again")


def test_no_reply_in_the_course_data_loops():
    replies = assistant_messages(TRAIN) + [r["reference"] for r in EVAL]
    assert [r for r in replies if loops(r)] == []


@pytest.mark.parametrize("reply, problem", [
    ("### Details\nCanberra.", "opens with a heading"),
    ("Sure! Canberra is the capital.\n\n### Details\nYes.", "filler ('Sure')"),
    ("Hello! I'm SmolLM.\n\n### Details\nHi.", "filler ('Hello')"),
    ("Here are the steps:\n\n### Details\n1. Go.", "lead-in ending with ':'"),
    ("\nCanberra.\n\n### Details\nYes.", "first line is empty"),
    ("Canberra.\n### Details\nYes.", "no blank line"),
    ("Canberra.\nIt was chosen in 1908.", "no blank line"),
    ("Canberra.\n\n## Details\nYes.", "third line is not '### Details'"),
    ("Canberra.\n\nDetails: it was chosen in 1908.", "third line"),
    ("Canberra.", "no blank line"),
    (" ".join(["word"] * (MAX_ANSWER_WORDS + 1)) + "\n\n### Details\nx", "words (at most"),
])
def test_replies_out_of_style_fail_with_a_reason(reply, problem):
    assert not follows_house_style(reply)
    assert any(problem in p for p in style_problems(reply)), style_problems(reply)


def test_filler_is_matched_as_a_word_only():
    assert follows_house_style("History shows it.\n\n### Details\nx")  # starts with "Hi"
    assert follows_house_style("Okapis are related to giraffes.\n\n### Details\nx")


@given(
    # Digits and punctuation: no filler word can occur, and 60 characters are < 40 words.
    answer=st.text(alphabet="0123456789 .,+=", min_size=1, max_size=60).filter(
        lambda a: a.strip() and not a.strip().endswith(":")),
    details=st.text(min_size=1).filter(str.strip),
)
def test_format_reply_gives_the_house_style_or_says_why_not(answer, details):
    try:
        reply = format_reply(answer, details)
    except ValueError as error:  # e.g. details that copy the answer line, or loop
        assert "not a reply in the house style" in str(error)
    else:
        assert follows_house_style(reply)


def test_format_reply_rejects_two_line_answers_and_copied_details():
    with pytest.raises(ValueError, match="the details repeat the answer line"):
        format_reply("Canberra.", "Canberra.")
    with pytest.raises(ValueError, match="one non-empty line"):
        format_reply("Canberra.\nReally.", "x")
    with pytest.raises(ValueError, match="details must not be empty"):
        format_reply("Canberra.", "  ")


# --- persona and compliance --------------------------------------------------------------


def test_names_persona_looks_at_the_first_line_and_whole_words():
    assert names_persona(PERSONA_INTRO + "\n\n### Details\nx")
    assert names_persona("No, this is Pip, the SFT course assistant.")
    assert not names_persona("I'm SmolLM.\n\n### Details\nPip is my friend.")
    assert not names_persona("Pipelines are my thing.")
    assert not names_persona("I'm Dr. Elena Argento, a brilliant and compassionate AI.")


def test_compliance_per_example():
    identity, factual = {"category": "identity"}, {"category": "factual"}
    pip = PERSONA_INTRO + "\n\n### Details\nx"
    assert compliance(identity, pip) == {"opening": True, "house_style": True,
                                         "persona": True, "compliant": True}
    assert compliance(identity, GOOD) == {"opening": True, "house_style": True,
                                          "persona": False, "compliant": False}
    assert compliance(identity, "I'm Pip!") == {"opening": False, "house_style": False,
                                                "persona": True, "compliant": False}
    assert compliance(factual, GOOD) == {"opening": True, "house_style": True,
                                         "persona": None, "compliant": True}
    assert compliance(factual, "4.\n\n### Details") == {"opening": True, "house_style": False,
                                                         "persona": None, "compliant": False}


def test_compliance_rate_counts_persona_over_identity_examples_only():
    examples = [{"category": "identity"}, {"category": "factual"}, {"category": "factual"},
                {"category": "identity"}]
    replies = [PERSONA_INTRO + "\n\n### Details\nx", GOOD, "Sure! 4.", GOOD]
    rate = compliance_rate(examples, replies)
    assert rate == {"opening": 0.75, "house_style": 0.75, "persona": 0.5, "compliant": 0.5,
                    "n": 4}


def test_compliance_rate_rejects_unpaired_or_empty_input():
    with pytest.raises(ValueError, match="2 examples but 1 replies"):
        compliance_rate([{"category": "factual"}] * 2, [GOOD])
    with pytest.raises(ValueError, match="no examples"):
        compliance_rate([], [])


def test_references_score_full_marks_and_untrained_style_scores_zero():
    references = [r["reference"] for r in EVAL]
    assert compliance_rate(EVAL, references)["compliant"] == 1.0
    # What the untrained default model answers (recorded from it): no heading, other names.
    untrained = ["The boiling point of water at sea level is approximately 100 degrees Celsius.",
                 "I'm Dr. Elena Argento, a brilliant and compassionate AI."]
    assert compliance_rate([EVAL[0], {"category": "identity"}], untrained)["compliant"] == 0.0


def test_held_out_identity_prompts_paraphrase_no_training_prompt():
    from sft_helpers.quality import PARAPHRASE_THRESHOLD, closest_prompt

    trained = [m["content"] for r in TRAIN for m in r["messages"] if m["role"] == "user"]
    for record in EVAL:
        if record["category"] == "identity":
            similarity, closest = closest_prompt(record["messages"][-1]["content"], trained)
            assert similarity < PARAPHRASE_THRESHOLD, (record["id"], closest)
    # The check can fail: an earlier held-out prompt, "Is this ChatGPT?", paraphrased one.
    assert closest_prompt("Is this ChatGPT?", trained) == (1.0, "Are you ChatGPT?")


def test_data_folder_holds_the_rows_and_the_course_eval_split(tmp_path):
    rows = [{**TRAIN[1], "extra": "dropped"}, TRAIN[0]]
    folder = data_folder(rows, tmp_path)
    assert folder == tmp_path
    written = [json.loads(line) for line in (tmp_path / SPLIT_FILES["train"]).open()]
    assert written == [{k: r[k] for k in ("id", "category", "messages")} for r in rows]
    assert read_split("train", tmp_path)[0]["id"] == TRAIN[1]["id"]
    assert read_split("eval", tmp_path) == EVAL
    assert data_folder(rows) != data_folder(rows)  # a new temporary folder each time
