"""IFEval-style verifiable instructions: each checker follows IFEval's rule (edge cases
included), strict and loose scoring, argument validation, and the shipped eval prompts."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from sft_helpers.data import DATA_DIR
from sft_helpers.evaluation import proportion_ci
from sft_helpers.ifeval import (
    INSTRUCTIONS,
    POSTSCRIPT_PATTERNS,
    REGISTRY,
    benchmark,
    benchmark_scores,
    check,
    check_loose,
    count_words,
    describe,
    finished_reply,
    follows,
    load_ifeval,
    loose_variants,
    score,
    train_conversations,
    validate_prompt,
)

ROWS = load_ifeval("eval")
LOWER, CAPITAL = "change_case:english_lowercase", "change_case:english_capital"
NO_COMMA, JSON = "punctuation:no_comma", "detectable_format:json_format"
BULLETS, TITLE = "detectable_format:number_bullet_lists", "detectable_format:title"
HIGHLIGHTS = "detectable_format:number_highlighted_sections"
WORDS, PARAGRAPHS = "length_constraints:number_words", "length_constraints:number_paragraphs"
KEYWORDS, FORBIDDEN = "keywords:existence", "keywords:forbidden_words"
END, QUOTATION = "startend:end_checker", "startend:quotation"
POSTSCRIPT, REPEAT = "detectable_content:postscript", "combination:repeat_prompt"


def test_the_registry_holds_the_fifteen_ifeval_instructions():
    assert len(INSTRUCTIONS) == 15 and INSTRUCTIONS == tuple(sorted(REGISTRY))
    assert REGISTRY[WORDS][1] == ("relation", "num_words")
    assert REGISTRY[REPEAT][1] == ("prompt_to_repeat",)


# --- each checker, as IFEval defines it ---------------------------------------------------

CASES = [
    # lowercase and capitals: str.islower() / str.isupper(), so Unicode letters count and
    # a reply with no letter at all follows neither
    (LOWER, {}, "a naïve café on the corner", True),
    (LOWER, {}, "a naïve Café", False),
    (LOWER, {}, "2 + 2 = 4", False),
    (LOWER, {}, "lowercase with trailing whitespace   \n", True),
    (CAPITAL, {}, "ÉCOLE OUVERTE À 9H", True),
    (CAPITAL, {}, "ÉCOLE ouverte", False),
    (CAPITAL, {}, "P.S. 100%", True),
    # commas: only the ASCII comma
    (NO_COMMA, {}, "No commas at all.", True),
    (NO_COMMA, {}, "One, two", False),
    (NO_COMMA, {}, "A full-width comma ， is another character", True),
    # bullets: lines starting with "* " or "-", counted exactly, markdown not parsed
    (BULLETS, {"num_bullets": 2}, "* one\n* two", True),
    (BULLETS, {"num_bullets": 2}, "- one\n  * two (indented)", True),
    (BULLETS, {"num_bullets": 2}, "* one\n* two\n* three", False),
    (BULLETS, {"num_bullets": 2}, "**Bold heading**\n* one\n* two", True),
    (BULLETS, {"num_bullets": 1}, "• a Unicode bullet is not one", False),
    (BULLETS, {"num_bullets": 1}, "Code:\n```c\n*p = 0;\n```", True),
    (BULLETS, {"num_bullets": 2}, "* one\n* two\n\n\n  ", True),
    # JSON: the whole reply, after IFEval strips one json/Json/JSON/bare ``` fence
    (JSON, {}, '{"plant": "fern"}', True),
    (JSON, {}, '```json\n{"plant": "fern"}\n```', True),
    (JSON, {}, '```JSON\n[1, 2]\n```\n\n', True),
    (JSON, {}, '```\n{"café": "naïve"}\n```', True),
    (JSON, {}, '```python\n{"plant": "fern"}\n```', False),
    (JSON, {}, 'Here it is: {"plant": "fern"}', False),
    (JSON, {}, '{"plant": "fern",}', False),
    # title: non-empty text in << >> on one line
    (TITLE, {}, "<<Poem of Joy>>\nLines follow.", True),
    (TITLE, {}, "<<Éclair Day>>", True),
    (TITLE, {}, "<<   >> nothing inside", False),
    (TITLE, {}, "<<a title over\ntwo lines>>", False),
    (TITLE, {}, "No title here.", False),
    # highlights: *span* or **span**, non-empty, on one line; at least num_highlights
    (HIGHLIGHTS, {"num_highlights": 2}, "*Rinse* the rice, then *soak* it.", True),
    (HIGHLIGHTS, {"num_highlights": 2}, "**Rinse** it, then *soak* it.", True),
    (HIGHLIGHTS, {"num_highlights": 2}, "Only *one* here.", False),
    (HIGHLIGHTS, {"num_highlights": 1}, "Empty: * * and ** **.", False),
    (HIGHLIGHTS, {"num_highlights": 1}, "*starts here\nends here*", False),
    # words: runs of \w, so "don't" is two words and accented letters are word letters
    (WORDS, {"relation": "less than", "num_words": 3}, "one two", True),
    (WORDS, {"relation": "less than", "num_words": 3}, "one two three", False),
    (WORDS, {"relation": "at least", "num_words": 3}, "don't stop", True),
    (WORDS, {"relation": "at least", "num_words": 3}, "naïve café crème", True),
    (WORDS, {"relation": "at least", "num_words": 1}, "... !!!", False),
    # paragraphs: split on ***; empty pieces at the ends are dropped, an empty inner one fails
    (PARAGRAPHS, {"num_paragraphs": 2}, "Knead.\n***\nBake.", True),
    (PARAGRAPHS, {"num_paragraphs": 2}, "***\nKnead.\n***\nBake.\n***\n", True),
    (PARAGRAPHS, {"num_paragraphs": 2}, "Knead.\n***\n\n***\nBake.", False),
    (PARAGRAPHS, {"num_paragraphs": 2}, "Knead.\n\nBake.", False),
    (PARAGRAPHS, {"num_paragraphs": 1}, "Just one paragraph.", True),
    # keywords: found anywhere (inside words too), any case, Unicode case folding included
    (KEYWORDS, {"keywords": ["soil"]}, "Good SOIL matters.", True),
    (KEYWORDS, {"keywords": ["soil"]}, "Dig into the subsoil.", True),
    (KEYWORDS, {"keywords": ["café"]}, "LE CAFÉ", True),
    (KEYWORDS, {"keywords": ["soil", "sun"]}, "Soil only.", False),
    # forbidden words: whole words only, any case
    (FORBIDDEN, {"forbidden_words": ["sun"]}, "Sunlight helps.", True),
    (FORBIDDEN, {"forbidden_words": ["sun"]}, "The SUN helps.", False),
    (FORBIDDEN, {"forbidden_words": ["sun", "rain"]}, "It may rain.", False),
    # end phrase: case ignored; trailing whitespace and quotation marks stripped first
    (END, {"end_phrase": "Any other questions?"}, "Done. ANY OTHER QUESTIONS?  \n", True),
    (END, {"end_phrase": "Any other questions?"}, '"Done. Any other questions?"', True),
    (END, {"end_phrase": "Any other questions?"}, "Any other questions? Bye.", False),
    (END, {"end_phrase": "Any other questions?"}, "Done. **Any other questions?**", False),
    # quotation: the stripped reply starts and ends with an ASCII double quote
    (QUOTATION, {}, '"Keep the soil moist."', True),
    (QUOTATION, {}, '  "Keep the soil moist."\n', True),
    (QUOTATION, {}, '"', False),
    (QUOTATION, {}, "“Curly quotes”", False),
    (QUOTATION, {}, '"Unfinished', False),
    # postscript: IFEval's patterns for P.S. and P.P.S, any case, anywhere on a line
    (POSTSCRIPT, {"postscript_marker": "P.S."}, "Hi.\n\nP.S. Bring a jacket.", True),
    (POSTSCRIPT, {"postscript_marker": "P.S."}, "Hi.\n\np. s. bring a jacket.", True),
    (POSTSCRIPT, {"postscript_marker": "P.S."}, "Hi.\n\nPS bring a jacket.", False),
    (POSTSCRIPT, {"postscript_marker": "P.P.S"}, "Hi.\nP.P.S. Bring a jacket.", True),
    (POSTSCRIPT, {"postscript_marker": "P.P.S"}, "Hi.\nP.S. Bring a jacket.", False),
    (POSTSCRIPT, {"postscript_marker": "Note:"}, "Hi.\nNOTE: bring a jacket.", True),
    # repeat: the stripped reply starts with the request, any case
    (REPEAT, {"prompt_to_repeat": "Describe a kite."}, "Describe a kite. It flies.", True),
    (REPEAT, {"prompt_to_repeat": "Describe a kite."}, "\n describe a KITE. It flies.", True),
    (REPEAT, {"prompt_to_repeat": "Describe a kite."}, "Sure! Describe a kite. It flies.", False),
]


@pytest.mark.parametrize(("instruction_id", "kwargs", "response", "expected"), CASES)
def test_each_checker_follows_ifevals_rule(instruction_id, kwargs, response, expected):
    assert check(instruction_id, response, **kwargs) is expected


def test_every_checker_has_cases_that_pass_and_fail():
    outcomes = {(case[0], case[3]) for case in CASES}
    assert outcomes == {(i, ok) for i in INSTRUCTIONS for ok in (True, False)}


# Valid arguments; where there are some, ones under which the checker itself accepts "".
EMPTY_FRIENDLY = {
    BULLETS: {"num_bullets": 0},
    HIGHLIGHTS: {"num_highlights": 0},
    WORDS: {"relation": "less than", "num_words": 5},
    PARAGRAPHS: {"num_paragraphs": 0},
    KEYWORDS: {"keywords": ["a"]},
    FORBIDDEN: {"forbidden_words": ["sun"]},
    END: {"end_phrase": " "},
    POSTSCRIPT: {"postscript_marker": "P.S."},
    REPEAT: {"prompt_to_repeat": " "},
}


@pytest.mark.parametrize("instruction_id", INSTRUCTIONS)
@pytest.mark.parametrize("empty", ["", "  \n\t"])
def test_an_empty_reply_follows_no_instruction(instruction_id, empty):
    kwargs = EMPTY_FRIENDLY.get(instruction_id, {})
    assert check(instruction_id, empty, **kwargs) is False
    assert check_loose(instruction_id, empty, **kwargs) is False


def test_the_empty_reply_rule_is_ifevals_not_the_checkers():
    """IFEval refuses an empty reply before it asks the checker, which would have said yes."""
    has_bullets, _ = REGISTRY[BULLETS]
    assert has_bullets("", num_bullets=0) is True
    assert check(BULLETS, "", num_bullets=0) is False


def test_words_are_counted_as_nltk_regexp_tokenizer_counts_them():
    assert count_words("Don't water a cactus daily!") == 6  # don, t, water, a, cactus, daily
    assert count_words("naïve café") == 2


# --- strict and loose ---------------------------------------------------------------------


def test_loose_tries_ifevals_eight_variants_in_order():
    assert loose_variants("Sure:\n**Yes**\nBye") == [
        "Sure:\n**Yes**\nBye",
        "Sure:\nYes\nBye",
        "**Yes**\nBye",
        "Sure:\n**Yes**",
        "**Yes**",
        "Yes\nBye",
        "Sure:\nYes",
        "Yes",
    ]


def preamble(reference: str) -> str:
    return "Sure, here is my answer:\n" + reference


LOOSE_RESCUES = [
    (JSON, {}, preamble('{"plant": "fern"}')),
    (QUOTATION, {}, preamble('"Keep the soil moist."')),
    (CAPITAL, {}, preamble("KEEP THE SOIL MOIST.")),
    (LOWER, {}, preamble("keep the soil moist.")),
    (REPEAT, {"prompt_to_repeat": "Describe a kite."}, preamble("Describe a kite. It flies.")),
    (END, {"end_phrase": "Any other questions?"}, "Done. Any other questions?\nHope this helps!"),
    (END, {"end_phrase": "Any other questions?"}, "Done. **Any other questions?**"),
    (BULLETS, {"num_bullets": 2}, "* one\n* two\n* three (a last line too many)"),
]


@pytest.mark.parametrize(("instruction_id", "kwargs", "response"), LOOSE_RESCUES)
def test_loose_forgives_a_preamble_a_sign_off_or_markdown_where_strict_does_not(
    instruction_id, kwargs, response
):
    assert not check(instruction_id, response, **kwargs)
    assert check_loose(instruction_id, response, **kwargs)


def test_loose_does_not_forgive_a_mistake_in_the_middle():
    assert not check_loose(NO_COMMA, "First line.\nA comma, here.\nLast line.")
    assert not check_loose(WORDS, "one two three four", relation="less than", num_words=2)


# --- arguments are checked exactly --------------------------------------------------------


def test_an_unknown_instruction_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown instruction 'detectable_format:haiku'.*"
                       r"punctuation:no_comma"):
        check("detectable_format:haiku", "text")


@pytest.mark.parametrize(
    ("instruction_id", "kwargs", "message"),
    [
        (BULLETS, {}, "missing argument 'num_bullets'"),
        (WORDS, {"num_words": 5}, "missing argument 'relation'"),
        (NO_COMMA, {"strict": True}, "unknown argument 'strict'"),
        (BULLETS, {"num_bullets": 2, "num_highlights": 1}, "unknown argument 'num_highlights'"),
        (WORDS, {"relation": "at most", "num_words": 5}, "relation must be one of"),
        (BULLETS, {"num_bullets": "3"}, "num_bullets must be a non-negative integer"),
        (BULLETS, {"num_bullets": True}, "num_bullets must be a non-negative integer"),
        (KEYWORDS, {"keywords": "soil"}, "keywords must be a non-empty list of strings"),
        (FORBIDDEN, {"forbidden_words": []}, "forbidden_words must be a non-empty list"),
        (HIGHLIGHTS, {"num_highlights": -1}, "num_highlights must be a non-negative integer"),
        (END, {"end_phrase": None}, "end_phrase must be a string"),
    ],
)
def test_a_missing_unknown_or_ill_typed_argument_is_named(instruction_id, kwargs, message):
    for test in (check, check_loose):
        with pytest.raises(ValueError, match=re.escape(message)):
            test(instruction_id, "Some reply.", **kwargs)


def test_describe_words_instructions_as_ifeval_does():
    assert describe(NO_COMMA) == "In your entire response, refrain from the use of any commas."
    assert describe(BULLETS, num_bullets=3) == (
        "Your answer must contain exactly 3 bullet points. Use the markdown bullet points "
        "such as:\n* This is point 1. \n* This is point 2"
    )
    assert describe(FORBIDDEN, forbidden_words=["sun", "rain"]) == (
        "Do not include keywords ['rain', 'sun'] in the response."
    )
    with pytest.raises(ValueError, match="missing argument 'end_phrase'"):
        describe(END)


# --- scores -------------------------------------------------------------------------------

SMALL = [
    ({"instruction_id_list": [NO_COMMA], "kwargs": [{}]}, "Fine."),
    ({"instruction_id_list": [NO_COMMA, QUOTATION], "kwargs": [{}, {}]}, 'Sure, here:\n"Fine."'),
    (
        {"instruction_id_list": [TITLE, BULLETS], "kwargs": [{}, {"num_bullets": 2}]},
        "<<Tips>>\n* one\n* two\n* three",
    ),
]


def test_score_counts_prompts_and_instructions_strict_and_loose():
    result = score([row for row, _ in SMALL], [reply for _, reply in SMALL])
    # Strict: prompt 1 follows its one instruction; prompt 2 neither; prompt 3 has a title
    # but 3 bullets. Loose drops the preamble of 2 and the last bullet line of 3.
    expected = {
        "prompt_strict": (1, 3),
        "instruction_strict": (2, 5),
        "prompt_loose": (3, 3),
        "instruction_loose": (5, 5),
    }
    per_instruction = {NO_COMMA: (1, 2), QUOTATION: (0, 1), TITLE: (1, 1), BULLETS: (0, 1)}
    for level, counts in [*expected.items(), *per_instruction.items()]:
        stats = result[level] if level in expected else result["per_instruction"][level]
        k, n = counts
        assert (stats["k"], stats["n"]) == counts, level
        assert stats["rate"] == k / n and stats["ci"] == proportion_ci(k, n)
    assert list(result["per_instruction"]) == sorted(per_instruction)


def test_score_refuses_no_prompts_or_mismatched_lengths():
    with pytest.raises(ValueError, match="no prompts"):
        score([], [])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score([SMALL[0][0], SMALL[1][0]], ["Fine."])


def test_proportion_ci_is_the_wilson_interval():
    assert proportion_ci(0, 10)[0] == 0.0 and proportion_ci(10, 10)[1] == 1.0
    low, high = proportion_ci(7, 10)
    assert round(low, 4) == 0.3968 and round(high, 4) == 0.8922
    for k, n in [(-1, 10), (11, 10), (0, 0)]:
        with pytest.raises(ValueError):
            proportion_ci(k, n)


# --- the shipped eval prompts -------------------------------------------------------------


def test_every_reference_follows_all_its_instructions_strict_and_loose():
    for row in ROWS:
        assert all(follows(row, row["reference"])), row["id"]
        assert all(follows(row, row["reference"], loose=True)), row["id"]


def test_the_eval_file_is_big_enough_and_covers_every_instruction_five_times():
    assert len(ROWS) >= 120
    uses = Counter(i for row in ROWS for i in row["instruction_id_list"])
    assert set(uses) == set(INSTRUCTIONS)
    assert min(uses.values()) >= 5, uses
    assert all(1 <= len(row["instruction_id_list"]) <= 3 for row in ROWS)


def test_eval_rows_are_distinct_aligned_and_in_order():
    assert [row["id"] for row in ROWS] == [f"ifeval-{n:03d}" for n in range(len(ROWS))]
    prompts = [" ".join(row["prompt"].lower().split()) for row in ROWS]
    assert len(set(prompts)) == len(prompts)
    for row in ROWS:
        assert len(row["instruction_id_list"]) == len(row["kwargs"]), row["id"]
        assert len(set(row["instruction_id_list"])) == len(row["instruction_id_list"]), row["id"]
        assert not {LOWER, CAPITAL} <= set(row["instruction_id_list"]), row["id"]


def test_each_prompt_states_its_instructions_as_ifeval_words_them():
    for row in ROWS:
        for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"], strict=True):
            assert describe(instruction_id, **kwargs) in row["prompt"], row["id"]
        if REPEAT in row["instruction_id_list"]:
            repeat = row["kwargs"][row["instruction_id_list"].index(REPEAT)]
            assert row["prompt"].startswith(repeat["prompt_to_repeat"]), row["id"]


def test_references_are_short_enough_for_a_small_models_reply():
    words = [count_words(row["reference"]) for row in ROWS]
    assert max(words) <= 120 and sorted(words)[len(words) // 2] <= 80


def _first_postscript(reference: str, marker: str) -> int:
    return re.search(POSTSCRIPT_PATTERNS[marker], reference.lower(), flags=re.MULTILINE).start()


def _fewer_words(reference: str, num_words: int) -> str:
    return " ".join(re.findall(r"\w+", reference)[: num_words - 1])


# One edit per instruction type that breaks exactly what the instruction asks for.
PERTURBATIONS = {
    LOWER: lambda r, kw: re.sub(r"[a-z]", lambda m: m.group().upper(), r, count=1),
    CAPITAL: lambda r, kw: re.sub(r"[A-Z]", lambda m: m.group().lower(), r, count=1),
    NO_COMMA: lambda r, kw: r + ", and more",
    BULLETS: lambda r, kw: r + "\n* One more point.",
    JSON: lambda r, kw: "Here is the JSON:\n" + r,
    TITLE: lambda r, kw: r.replace("<<", "").replace(">>", ""),
    HIGHLIGHTS: lambda r, kw: r.replace("*", ""),
    WORDS: lambda r, kw: (
        r + " word" * kw["num_words"]
        if kw["relation"] == "less than"
        else _fewer_words(r, kw["num_words"])
    ),
    PARAGRAPHS: lambda r, kw: r.replace("***", "***\n***", 1),
    KEYWORDS: lambda r, kw: re.sub(kw["keywords"][0], "", r, flags=re.IGNORECASE),
    FORBIDDEN: lambda r, kw: r + " " + kw["forbidden_words"][0],
    END: lambda r, kw: r + " Bye.",
    QUOTATION: lambda r, kw: r.strip().strip('"'),
    POSTSCRIPT: lambda r, kw: r[: _first_postscript(r, kw["postscript_marker"])],
    REPEAT: lambda r, kw: r.split(" ", 1)[1],
}


def test_a_perturbed_reference_fails_the_instruction_it_breaks():
    broken = Counter()
    for row in ROWS:
        for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"], strict=True):
            perturbed = PERTURBATIONS[instruction_id](row["reference"], kwargs)
            assert not check(instruction_id, perturbed, **kwargs), (row["id"], instruction_id)
            assert not all(follows(row, perturbed)), row["id"]
            broken[instruction_id] += 1
    assert set(broken) == set(INSTRUCTIONS)


def test_a_bad_row_is_named_by_file_and_line(tmp_path):
    good = {"id": "a", "prompt": "Hi.", "instruction_id_list": [NO_COMMA], "kwargs": [{}]}
    bad = {**good, "instruction_id_list": [BULLETS], "kwargs": [{"num_bulets": 3}]}
    lines = [json.dumps(good), json.dumps(bad)]
    (tmp_path / "ifeval_mine.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    message = r"ifeval_mine.jsonl line 2: .*unknown argument 'num_bulets'"
    with pytest.raises(ValueError, match=message):
        load_ifeval("mine", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"instruction_id_list": []}, "no instructions"),
        ({"kwargs": [{}, {}]}, "1 instruction ids but 2 kwargs"),
        ({"kwargs": [[]]}, "the kwargs of punctuation:no_comma must be an object"),
        ({"instruction_id_list": NO_COMMA}, "field 'instruction_id_list' must be a list"),
        ({"prompt": None}, "field 'prompt' must be a str"),
    ],
)
def test_validate_prompt_names_what_is_wrong(change, message):
    good = {"prompt": "Hi.", "instruction_id_list": [NO_COMMA], "kwargs": [{}]}
    with pytest.raises(ValueError, match=re.escape("line 7: " + message)):
        validate_prompt({**good, **change}, "line 7")


def test_the_data_card_states_the_eval_files_counts():
    card = (DATA_DIR / "DATA_CARD.md").read_text(encoding="utf-8")
    card = card.split("## IFEval eval prompts (`ifeval_eval.jsonl`)")[1].split("\n## ")[0]
    uses = Counter(i for row in ROWS for i in row["instruction_id_list"])
    for instruction_id in INSTRUCTIONS:
        assert f"| `{instruction_id}` | {uses[instruction_id]} |" in card
    sizes = Counter(len(row["instruction_id_list"]) for row in ROWS)
    assert f"{len(ROWS)} prompts with" in card
    assert f"{sizes[1]} prompts carry one instruction, {sizes[2]} two and {sizes[3]} three" in card
    assert f"({sum(uses.values())} instructions in all)" in card


def test_the_training_conversations_are_read_and_checked(tmp_path):
    rows = train_conversations()
    assert len(rows) >= 150 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    good = rows[0]
    bad = {**good, "kwargs": [{"num_bulets": 3}]}
    lines = [json.dumps(good), json.dumps(bad)]
    (tmp_path / "ifeval_train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"ifeval_train.jsonl line 2: "):
        train_conversations(tmp_path)


def test_benchmark_scores_whole_replies_and_reads_them_from_the_cache(fresh_cache, monkeypatch):
    from sft_helpers import evaluation
    from sft_helpers.models import load_model

    model, tokenizer = load_model("tiny")
    rows = ROWS[:3]
    scores, results = benchmark(model, tokenizer, rows, max_new_tokens=4, progress=False)
    assert [r["instruction"] for r in results] == [row["prompt"] for row in rows]
    assert scores["ifeval"] == score(rows, [r["generated"] for r in results])
    # The untrained tiny model never closes its turn within 4 tokens: whole replies follow
    # nothing, whatever IFEval's rule makes of the cut-off text.
    assert all(r["n_tokens"] == 4 for r in results)
    assert (scores["stopped"]["k"], scores["stopped"]["n"]) == (0, 3)
    assert scores["whole"] == score(rows, [""] * 3)
    assert scores["whole"]["instruction_strict"]["k"] == 0
    # Saved replies score the same; replies to other prompts are refused.
    assert benchmark_scores(rows, results) == scores
    with pytest.raises(ValueError, match="do not answer the 3 benchmark prompts"):
        benchmark_scores(rows, results[::-1])
    with pytest.raises(ValueError, match="2 replies"):
        benchmark_scores(rows, results[:2])

    def no_generation(*args, **kwargs):
        raise AssertionError("generated although the replies are cached")

    monkeypatch.setattr(evaluation, "evaluate_sft_model", no_generation)
    assert benchmark(model, tokenizer, rows, max_new_tokens=4, progress=False) == (
        scores, results)
    with pytest.raises(AssertionError, match="generated although"):
        benchmark(model, tokenizer, rows, max_new_tokens=5, progress=False)


def test_a_finished_reply_is_one_that_stopped_without_looping():
    bullets = "* Pack water.\n* Pack a hat.\n* Pack a towel."
    looped = "* Pack water and a hat.\n" * 3
    assert finished_reply({"generated": bullets, "stop_reason": "eos"}) == bullets
    assert finished_reply({"generated": bullets, "stop_reason": "max_new_tokens"}) == ""
    assert check(BULLETS, looped, num_bullets=3)  # IFEval's rule passes the loop
    assert finished_reply({"generated": looped, "stop_reason": "eos"}) == ""


def test_saved_mixture_replies_must_come_from_the_current_recipe_and_data(tmp_path):
    from sft_helpers.data import SPLIT_FILES, read_split
    from sft_helpers.ifeval import mixture_folder, saved_mixture
    from sft_helpers.training import adapter_key, recipe_with

    folder = mixture_folder()
    train = (folder / SPLIT_FILES["train"]).read_text(encoding="utf-8").splitlines()
    assert len(train) == len(read_split("train")) + len(train_conversations())
    key = adapter_key(recipe_with(profile="tiny"), folder)
    path = tmp_path / "mixture.json"
    path.write_text(json.dumps({"adapter_key": key, "profile": "tiny", "ifeval": []}))
    assert saved_mixture(path, "tiny")["ifeval"] == []
    # The same file read for another profile (another recipe) is refused, with the fix.
    with pytest.raises(ValueError, match=r"bench/ifeval_mixture.py --profile other"):
        saved_mixture(path, "other")
