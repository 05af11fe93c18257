"""Verifiable instructions: IFEval's instruction names and rules, checked offline.

IFEval (Zhou et al., 2023) asks "did the model do what the prompt said?" only where a
program can tell: "answer in all lowercase letters", "use exactly 3 bullet points", "end
with this exact phrase". Each instruction here is a pure-Python checker, named and
parametrised as IFEval names it (`"detectable_format:number_bullet_lists"`, keyword
`num_bullets`), so our prompt rows have IFEval's own fields (`instruction_id_list`,
`kwargs`). Nothing downloads: no prompts, no NLTK data, no language model.

    >>> check("punctuation:no_comma", "No commas here.")
    True
    >>> check("detectable_format:number_bullet_lists", "* one\\n* two", num_bullets=3)
    False

Scoring follows IFEval's `evaluation_lib`: an empty (or whitespace-only) reply follows no
instruction; **strict** checks the reply as it is; **loose** (`check_loose`) also accepts it
when one of 8 variants passes (the reply, without its first line, without its last line,
without both, and each of those with every `*` removed), which forgives a preamble
("Sure, here it is:"), a sign-off, or markdown bold. `score` reports both at the prompt
level (every instruction of a prompt followed) and the instruction level, with 95% Wilson
intervals.

Where we differ from IFEval (google-research/instruction_following_eval):

- **No language detection.** IFEval's `change_case:english_capital` and
  `change_case:english_lowercase` also require `langdetect` to call the reply English
  (and count a reply it cannot classify as followed). We check only the case
  (`str.isupper()` / `str.islower()`, exactly IFEval's case tests), so an all-lowercase
  reply in French passes here.
- **Words without NLTK.** IFEval counts words with NLTK's `RegexpTokenizer(r"\\w+")`; we use
  `re.findall(r"\\w+", ...)`, the same expression, so the counts are identical.
- **Arguments are required.** IFEval's `build_description` fills a missing argument with a
  random value; here a missing, unknown or ill-typed argument raises `ValueError`.
- **15 of IFEval's 25 instruction types**: the ones listed in `INSTRUCTIONS`.

As in IFEval, `keywords` and `forbidden_words` are regular expressions (IFEval does not
escape them), and postscript markers other than "P.S." and "P.P.S" are too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from sft_helpers.data import DATA_DIR, loops, read_jsonl

RELATIONS = ("less than", "at least")
# Room for a whole reply: the longest reference reply of ifeval_eval.jsonl has 137 tokens.
BENCHMARK_TOKENS = 160
# IFEval strips these code fences (in this order) before parsing a JSON reply.
JSON_FENCE_PREFIXES = ("```json", "```Json", "```JSON", "```")
JSON_FENCE = "```"
# IFEval's patterns for its two markers; any other marker is used as a regular expression.
POSTSCRIPT_PATTERNS = {"P.P.S": r"\s*p\.\s?p\.\s?s.*$", "P.S.": r"\s*p\.\s?s\..*$"}
PARAGRAPH_DIVIDER = re.compile(r"\s?\*\*\*\s?")
_STAR_BULLET = re.compile(r"^\s*\*[^\*].*$", re.MULTILINE)
_DASH_BULLET = re.compile(r"^\s*-.*$", re.MULTILINE)
_HIGHLIGHT = re.compile(r"\*[^\n\*]*\*")
_DOUBLE_HIGHLIGHT = re.compile(r"\*\*[^\n\*]*\*\*")
_TITLE = re.compile(r"<<[^\n]+>>")
_WORD = re.compile(r"\w+")
# The type of every argument an instruction takes (IFEval's keyword names).
ARGUMENT_TYPES: dict[str, type] = {
    "num_bullets": int,
    "num_highlights": int,
    "num_words": int,
    "num_paragraphs": int,
    "relation": str,
    "keywords": list,
    "forbidden_words": list,
    "end_phrase": str,
    "postscript_marker": str,
    "prompt_to_repeat": str,
}
_KINDS = {int: "a non-negative integer", str: "a string", list: "a non-empty list of strings"}


# --- counting -------------------------------------------------------------------------------


def count_words(response: str) -> int:
    """Words as IFEval counts them: runs of `\\w` characters (so "don't" is two).

    >>> count_words("Don't water a cactus daily!")
    6
    """
    return len(_WORD.findall(response))


def count_bullets(response: str) -> int:
    """Lines that start (after spaces) with `* ` or `-`: IFEval's bullet points.

    A `**bold**` line is not a bullet; a line of `---` is.

    >>> count_bullets("Tips:\\n* water at dawn\\n- use a saucer\\n**Done**")
    2
    """
    return len(_STAR_BULLET.findall(response)) + len(_DASH_BULLET.findall(response))


def count_highlights(response: str) -> int:
    """Non-empty `*highlighted*` and `**bold**` spans, each on one line, as IFEval counts them.

    >>> count_highlights("*Rinse* the rice, then *soak* it.")
    2
    >>> count_highlights("**Rinse** it. * * and ** ** are empty.")
    1
    """
    single = sum(bool(h.strip("*").strip()) for h in _HIGHLIGHT.findall(response))
    double = sum(
        bool(h.removeprefix("**").removesuffix("**").strip())
        for h in _DOUBLE_HIGHLIGHT.findall(response)
    )
    return single + double


def count_paragraphs(response: str) -> int | None:
    """Paragraphs separated by `***`, or None when one between two dividers is empty.

    An empty piece before the first divider or after the last one is not counted.

    >>> count_paragraphs("Knead.\\n***\\nRest.\\n***\\nBake.")
    3
    >>> count_paragraphs("Knead.\\n***\\n***\\nBake.") is None
    True
    """
    paragraphs = PARAGRAPH_DIVIDER.split(response)
    last = len(paragraphs) - 1
    empty = [i for i, paragraph in enumerate(paragraphs) if not paragraph.strip()]
    if any(0 < i < last for i in empty):
        return None
    return len(paragraphs) - len(empty)


def strip_json_fence(response: str) -> str:
    """The reply without the surrounding whitespace and ``` fence IFEval removes.

    >>> strip_json_fence('```json\\n{"a": 1}\\n```')
    '{"a": 1}'
    """
    text = response.strip()
    for prefix in JSON_FENCE_PREFIXES:
        text = text.removeprefix(prefix)
    return text.removesuffix(JSON_FENCE).strip()


# --- the checkers (one per instruction) ------------------------------------------------------


def is_all_capital(response: str) -> bool:
    """`change_case:english_capital`: every cased letter is a capital (and there is one).

    >>> is_all_capital("ÉCOLE AT 9!"), is_all_capital("École")
    (True, False)
    """
    return response.isupper()


def is_all_lowercase(response: str) -> bool:
    """`change_case:english_lowercase`: no capital letter (and at least one cased letter).

    >>> is_all_lowercase("a naïve café"), is_all_lowercase("a Naïve café"), is_all_lowercase("42")
    (True, False, False)
    """
    return response.islower()


def has_no_comma(response: str) -> bool:
    """`punctuation:no_comma`: no ASCII comma anywhere.

    >>> has_no_comma("Bread rises. Yeast eats sugar."), has_no_comma("Flour, water")
    (True, False)
    """
    return "," not in response


def has_bullets(response: str, num_bullets: int) -> bool:
    """`detectable_format:number_bullet_lists`: exactly `num_bullets` bullet points.

    >>> has_bullets("* Water at dawn.\\n* Use a saucer.", num_bullets=2)
    True
    """
    return count_bullets(response) == num_bullets


def is_json(response: str) -> bool:
    """`detectable_format:json_format`: the whole reply (fence removed) parses as JSON.

    >>> is_json('```json\\n{"plant": "fern"}\\n```'), is_json('Here: {"plant": "fern"}')
    (True, False)
    """
    try:
        json.loads(strip_json_fence(response))
    except ValueError:
        return False
    return True


def has_title(response: str) -> bool:
    """`detectable_format:title`: a non-empty title in double angle brackets on one line.

    >>> has_title("<<Why Bread Rises>>\\nYeast..."), has_title("<< >> nothing")
    (True, False)
    """
    return any(title.lstrip("<").rstrip(">").strip() for title in _TITLE.findall(response))


def has_highlights(response: str, num_highlights: int) -> bool:
    """`detectable_format:number_highlighted_sections`: at least `num_highlights` highlights.

    >>> has_highlights("*Rinse* then *soak*.", num_highlights=2)
    True
    """
    return count_highlights(response) >= num_highlights


def compare(count: int, relation: str, threshold: int) -> bool:
    """IFEval's two relations: "less than" is `<`, "at least" is `>=`.

    >>> compare(5, "less than", 5), compare(5, "at least", 5)
    (False, True)
    """
    return count < threshold if relation == RELATIONS[0] else count >= threshold


def has_word_count(response: str, relation: str, num_words: int) -> bool:
    """`length_constraints:number_words`: fewer than / at least `num_words` words.

    >>> has_word_count("Yeast makes gas.", relation="less than", num_words=4)
    True
    """
    return compare(count_words(response), relation, num_words)


def has_paragraphs(response: str, num_paragraphs: int) -> bool:
    """`length_constraints:number_paragraphs`: exactly `num_paragraphs`, split by `***`.

    >>> has_paragraphs("Mix.\\n***\\nBake.", num_paragraphs=2)
    True
    """
    return count_paragraphs(response) == num_paragraphs


def has_keywords(response: str, keywords: list[str]) -> bool:
    """`keywords:existence`: every keyword appears, in any case (even inside a word).

    >>> has_keywords("Sunlight and SOIL.", keywords=["soil", "sun"])
    True
    """
    return all(re.search(keyword, response, flags=re.IGNORECASE) for keyword in keywords)


def avoids_words(response: str, forbidden_words: list[str]) -> bool:
    """`keywords:forbidden_words`: none of the words appears as a whole word, in any case.

    >>> avoids_words("Sunlight helps.", forbidden_words=["sun"])
    True
    >>> avoids_words("The Sun helps.", forbidden_words=["sun"])
    False
    """
    return not any(
        re.search(r"\b" + word + r"\b", response, flags=re.IGNORECASE) for word in forbidden_words
    )


def ends_with(response: str, end_phrase: str) -> bool:
    """`startend:end_checker`: the reply (stripped of spaces and `"`) ends with the phrase.

    Case is ignored, and nothing may follow the phrase but whitespace or quotation marks.

    >>> ends_with("Enjoy the ride. Any other questions?  ", end_phrase="any other questions?")
    True
    """
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def is_quoted(response: str) -> bool:
    """`startend:quotation`: the stripped reply starts and ends with a double quote.

    >>> is_quoted(' "Keep the soil moist." '), is_quoted('"')
    (True, False)
    """
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def has_postscript(response: str, postscript_marker: str) -> bool:
    """`detectable_content:postscript`: some line holds the marker (any case).

    "P.S." also matches "p. s."; "P.P.S" also matches "p. p. s"; as in IFEval, the marker
    may sit anywhere on a line, not only at its start.

    >>> has_postscript("See you soon.\\n\\nP.S. Bring a jacket.", postscript_marker="P.S.")
    True
    """
    marker = postscript_marker.strip()
    pattern = POSTSCRIPT_PATTERNS.get(marker, r"\s*" + marker.lower() + r".*$")
    return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))


def repeats_prompt(response: str, prompt_to_repeat: str) -> bool:
    """`combination:repeat_prompt`: the reply starts with the request, word for word (any case).

    >>> repeats_prompt("Describe a kite. A kite is...", prompt_to_repeat="Describe a kite.")
    True
    """
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


Checker = Callable[..., bool]
# Instruction id -> (its checker, the names of its arguments).
REGISTRY: dict[str, tuple[Checker, tuple[str, ...]]] = {
    "change_case:english_capital": (is_all_capital, ()),
    "change_case:english_lowercase": (is_all_lowercase, ()),
    "punctuation:no_comma": (has_no_comma, ()),
    "detectable_format:number_bullet_lists": (has_bullets, ("num_bullets",)),
    "detectable_format:json_format": (is_json, ()),
    "detectable_format:title": (has_title, ()),
    "detectable_format:number_highlighted_sections": (has_highlights, ("num_highlights",)),
    "length_constraints:number_words": (has_word_count, ("relation", "num_words")),
    "length_constraints:number_paragraphs": (has_paragraphs, ("num_paragraphs",)),
    "keywords:existence": (has_keywords, ("keywords",)),
    "keywords:forbidden_words": (avoids_words, ("forbidden_words",)),
    "startend:end_checker": (ends_with, ("end_phrase",)),
    "startend:quotation": (is_quoted, ()),
    "detectable_content:postscript": (has_postscript, ("postscript_marker",)),
    "combination:repeat_prompt": (repeats_prompt, ("prompt_to_repeat",)),
}
INSTRUCTIONS = tuple(sorted(REGISTRY))
# How IFEval's `build_description` words each instruction (filled in by `describe`).
DESCRIPTIONS = {
    "change_case:english_capital": (
        "Your entire response should be in English, and in all capital letters."
    ),
    "change_case:english_lowercase": (
        "Your entire response should be in English, and in all lowercase letters. "
        "No capital letters are allowed."
    ),
    "punctuation:no_comma": "In your entire response, refrain from the use of any commas.",
    "detectable_format:number_bullet_lists": (
        "Your answer must contain exactly {num_bullets} bullet points. "
        "Use the markdown bullet points such as:\n* This is point 1. \n* This is point 2"
    ),
    "detectable_format:json_format": (
        "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```."
    ),
    "detectable_format:title": (
        "Your answer must contain a title, wrapped in double angular brackets, "
        "such as <<poem of joy>>."
    ),
    "detectable_format:number_highlighted_sections": (
        "Highlight at least {num_highlights} sections in your answer with markdown, "
        "i.e. *highlighted section*."
    ),
    "length_constraints:number_words": "Answer with {relation} {num_words} words.",
    "length_constraints:number_paragraphs": (
        "There should be {num_paragraphs} paragraphs. "
        "Paragraphs are separated with the markdown divider: ***"
    ),
    "keywords:existence": "Include keywords {keywords} in the response.",
    "keywords:forbidden_words": "Do not include keywords {forbidden_words} in the response.",
    "startend:end_checker": (
        "Finish your response with this exact phrase {end_phrase}. "
        "No other words should follow this phrase."
    ),
    "startend:quotation": "Wrap your entire response with double quotation marks.",
    "detectable_content:postscript": (
        "At the end of your response, please explicitly add a postscript starting with "
        "{postscript_marker}"
    ),
    "combination:repeat_prompt": (
        "First repeat the request word for word without change, then give your answer "
        "(1. do not say any words or characters before repeating the request; "
        "2. the request you need to repeat does not include this sentence)"
    ),
}


# --- validation ------------------------------------------------------------------------------


def _is_valid(value, kind: type) -> bool:
    if kind is list:
        strings = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
        return strings and bool(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return isinstance(value, kind)


def _check_argument(instruction_id: str, name: str, value) -> None:
    kind = ARGUMENT_TYPES[name]
    if not _is_valid(value, kind):
        raise ValueError(f"{instruction_id}: {name} must be {_KINDS[kind]}, got {value!r}")
    if name == "relation" and value not in RELATIONS:
        raise ValueError(f"{instruction_id}: relation must be one of {RELATIONS}, got {value!r}")


def checker_for(instruction_id: str, kwargs: Mapping) -> Checker:
    """The checker of `instruction_id`, once `kwargs` are exactly its valid arguments.

    >>> checker_for("punctuation:no_comma", {}).__name__
    'has_no_comma'
    >>> checker_for("detectable_format:title", {"num_bullets": 3})
    Traceback (most recent call last):
    ...
    ValueError: detectable_format:title: unknown argument 'num_bullets' (it takes none)
    """
    if instruction_id not in REGISTRY:
        known = ", ".join(INSTRUCTIONS)
        raise ValueError(f"unknown instruction {instruction_id!r}; known: {known}")
    checker, names = REGISTRY[instruction_id]
    takes = ", ".join(names) or "none"
    for name in kwargs:
        if name not in names:
            raise ValueError(f"{instruction_id}: unknown argument {name!r} (it takes {takes})")
    for name in names:
        if name not in kwargs:
            raise ValueError(f"{instruction_id}: missing argument {name!r} (it takes {takes})")
        _check_argument(instruction_id, name, kwargs[name])
    return checker


def describe(instruction_id: str, **kwargs) -> str:
    """The instruction as IFEval words it, ready to append to a prompt.

    >>> describe("length_constraints:number_words", relation="less than", num_words=50)
    'Answer with less than 50 words.'
    >>> describe("keywords:existence", keywords=["yeast", "flour"])
    "Include keywords ['flour', 'yeast'] in the response."
    """
    checker_for(instruction_id, kwargs)
    # IFEval sorts the keyword lists before writing them.
    values = {k: sorted(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return DESCRIPTIONS[instruction_id].format(**values)


# --- strict and loose checks -----------------------------------------------------------------


def check(instruction_id: str, response: str, **kwargs) -> bool:
    """Strict: whether `response` follows the instruction (an empty reply never does).

    >>> check("startend:end_checker", "Ride safe. Any questions?", end_phrase="Any questions?")
    True
    >>> check("change_case:english_lowercase", "   ")
    False
    """
    checker = checker_for(instruction_id, kwargs)
    return bool(response.strip()) and checker(response, **kwargs)


def loose_variants(response: str) -> list[str]:
    """IFEval's 8 loose readings: as is, without the first / last / both lines, each also
    without `*`.

    >>> loose_variants("Sure:\\n**Yes**\\nBye")
    ['Sure:\\n**Yes**\\nBye', 'Sure:\\nYes\\nBye', '**Yes**\\nBye', 'Sure:\\n**Yes**', '**Yes**', \
'Yes\\nBye', 'Sure:\\nYes', 'Yes']
    """
    lines = response.split("\n")
    trimmed = ["\n".join(part).strip() for part in (lines[1:], lines[:-1], lines[1:-1])]
    return [response, response.replace("*", ""), *trimmed, *(t.replace("*", "") for t in trimmed)]


def check_loose(instruction_id: str, response: str, **kwargs) -> bool:
    """Loose: whether any non-empty `loose_variants` reading follows the instruction.

    >>> reply = "Ride safe. Any questions?\\nHope this helps!"
    >>> check("startend:end_checker", reply, end_phrase="Any questions?")
    False
    >>> check_loose("startend:end_checker", reply, end_phrase="Any questions?")
    True
    """
    checker = checker_for(instruction_id, kwargs)
    return any(text.strip() and checker(text, **kwargs) for text in loose_variants(response))


def follows(row: Mapping, response: str, *, loose: bool = False) -> list[bool]:
    """One bool per instruction of a prompt `row` (`instruction_id_list`, `kwargs`).

    >>> row = {"instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
    ...        "kwargs": [{}, {}]}
    >>> follows(row, '"Yes, gladly."')
    [False, True]
    """
    test = check_loose if loose else check
    return [
        test(instruction_id, response, **kwargs)
        for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"], strict=True)
    ]


# --- scores ----------------------------------------------------------------------------------


def score(prompts: Sequence[Mapping], responses: Sequence[str]) -> dict:
    """IFEval's four accuracies, each as k of n with a 95% Wilson interval, and a strict
    instruction-level table per instruction id.

    Prompt level: the share of prompts whose every instruction is followed; instruction
    level: the share of all instructions followed.

    >>> rows = [{"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    ...         {"instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
    ...          "kwargs": [{}, {}]}]
    >>> result = score(rows, ["Fine.", 'Sure, here:\\n"Fine."'])
    >>> {level: (s["k"], s["n"]) for level, s in result.items() if level != "per_instruction"}
    {'prompt_strict': (1, 2), 'instruction_strict': (1, 3), 'prompt_loose': (2, 2),
     'instruction_loose': (3, 3)}
    >>> result["per_instruction"]["punctuation:no_comma"]
    {'k': 1, 'n': 2, 'rate': 0.5, 'ci': (0.0945..., 0.9054...)}
    """
    from sft_helpers.evaluation import rate  # a torch-heavy module: import on use

    if not prompts:
        raise ValueError("no prompts to score")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    strict = [follows(row, reply) for row, reply in zip(prompts, responses, strict=True)]
    loose = [follows(row, reply, loose=True) for row, reply in zip(prompts, responses, strict=True)]
    result = {}
    for mode, followed in (("strict", strict), ("loose", loose)):
        flat = [ok for oks in followed for ok in oks]
        result[f"prompt_{mode}"] = rate(sum(map(all, followed)), len(followed))
        result[f"instruction_{mode}"] = rate(sum(flat), len(flat))
    per_id: dict[str, list[bool]] = {}
    for row, oks in zip(prompts, strict, strict=True):
        for instruction_id, ok in zip(row["instruction_id_list"], oks, strict=True):
            per_id.setdefault(instruction_id, []).append(ok)
    result["per_instruction"] = {i: rate(sum(oks), len(oks)) for i, oks in sorted(per_id.items())}
    return result


# --- the shipped prompts ---------------------------------------------------------------------


def validate_prompt(row: Mapping, where: str = "row") -> None:
    """Raise `ValueError` (starting with `where`) unless `row` is a valid prompt row.

    >>> validate_prompt({"prompt": "Hi.", "instruction_id_list": ["punctuation:no_comma"],
    ...                  "kwargs": [{}, {}]})
    Traceback (most recent call last):
    ...
    ValueError: row: 1 instruction ids but 2 kwargs
    """
    for field, kind in (("prompt", str), ("instruction_id_list", list), ("kwargs", list)):
        if not isinstance(row.get(field), kind):
            raise ValueError(f"{where}: field {field!r} must be a {kind.__name__}")
    ids, kwargs = row["instruction_id_list"], row["kwargs"]
    if not ids:
        raise ValueError(f"{where}: no instructions")
    if len(ids) != len(kwargs):
        raise ValueError(f"{where}: {len(ids)} instruction ids but {len(kwargs)} kwargs")
    for instruction_id, arguments in zip(ids, kwargs, strict=True):
        if not isinstance(arguments, Mapping):
            raise ValueError(f"{where}: the kwargs of {instruction_id} must be an object")
        try:
            checker_for(instruction_id, arguments)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error


def load_ifeval(split: str = "eval", data_dir: Path = DATA_DIR) -> list[dict]:
    """The rows of `ifeval_{split}.jsonl`, each validated (errors name the file and line).

    >>> rows = load_ifeval("eval")
    >>> len(rows) >= 120, sorted(rows[0])
    (True, ['id', 'instruction_id_list', 'kwargs', 'prompt', 'reference'])
    """
    path = Path(data_dir) / f"ifeval_{split}.jsonl"
    rows = read_jsonl(path)
    for number, row in enumerate(rows, start=1):
        validate_prompt(row, f"{path.name} line {number}")
    return rows


def train_conversations(data_dir: Path = DATA_DIR) -> list[dict]:
    """The instruction-following training conversations of `ifeval_train.jsonl`, each
    checked as a conversation (`data.read_conversations`) and as a prompt row (its
    `instruction_id_list` and `kwargs`); errors name the file and line.

    >>> rows = train_conversations()
    >>> len(rows) >= 150, rows[0]["messages"][-1]["role"]
    (True, 'assistant')
    """
    from sft_helpers.data import read_conversations

    path = Path(data_dir) / "ifeval_train.jsonl"
    rows = read_conversations(path)
    for number, row in enumerate(rows, start=1):
        validate_prompt({**row, "prompt": row["messages"][0]["content"]},
                        f"{path.name} line {number}")
    return rows


def finished_reply(record: Mapping) -> str:
    """The reply of an `evaluate_sft_model` record as the course grades it: the reply when
    the model closed its turn and did not loop (`data.loops`), otherwise "", which follows
    no instruction. IFEval scores a reply as it stands, so a loop that happens to contain
    three bullet points passes there; here it fails, as every course metric reads it.

    >>> finished_reply({"generated": "* a\\n* b", "stop_reason": "eos"})
    '* a\\n* b'
    >>> finished_reply({"generated": "* a\\n* b", "stop_reason": "max_new_tokens"})
    ''
    """
    from sft_helpers.generation import STOP_EOS

    ok = record["stop_reason"] == STOP_EOS and not loops(record["generated"])
    return record["generated"] if ok else ""


def benchmark(
    model,
    tokenizer,
    rows: Sequence[Mapping] | None = None,
    *,
    max_new_tokens: int = BENCHMARK_TOKENS,
    progress: bool = True,
    cache: bool = True,
) -> tuple[dict, list[dict]]:
    """`(scores, results)`: `model`'s greedy replies to the benchmark prompts (`rows`,
    default `load_ifeval("eval")`) and their scores: `scores["ifeval"]` scores each reply
    as it stands (IFEval's rule, the one a model card reports), `scores["whole"]` scores
    `finished_reply` (a reply that never stops or loops follows nothing), both as `score`
    gives them; `scores["stopped"]` and `scores["loops"]` are the rates of replies that
    closed their turn and that repeat themselves.

    The prompts go in as the user turn alone, so the chat template adds its default system
    prompt, as in training. Replies come from `evaluation.cached_replies`: a second run with
    the same weights reads them from the course cache.

    >>> scores, results = benchmark(model, tokenizer)  # doctest: +SKIP
    >>> scores["ifeval"]["instruction_strict"]["k"], scores["stopped"]["n"]  # doctest: +SKIP
    (120, 132)
    """
    from sft_helpers.evaluation import cached_replies  # torch-heavy: import on use

    rows = load_ifeval("eval") if rows is None else list(rows)
    prompts = [{"instruction": row["prompt"]} for row in rows]
    results = cached_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                             progress=progress, cache=cache)
    return benchmark_scores(rows, results), results


def benchmark_scores(rows: Sequence[Mapping], results: Sequence[Mapping]) -> dict:
    """The scores `benchmark` gives `results` (one `evaluate_sft_model` record per row, in
    order): for replies generated elsewhere, e.g. saved by a bench script.

    >>> benchmark_scores(rows, saved_replies)["whole"]["prompt_strict"]  # doctest: +SKIP
    """
    from sft_helpers.evaluation import rate
    from sft_helpers.generation import stop_count

    if len(results) != len(rows) or any(
            r["instruction"] != row["prompt"] for r, row in zip(results, rows, strict=True)):
        raise ValueError(f"{len(results)} replies do not answer the {len(rows)} benchmark "
                         "prompts in order")
    n = len(results)
    return {
        "ifeval": score(rows, [r["generated"] for r in results]),
        "whole": score(rows, [finished_reply(r) for r in results]),
        "stopped": rate(stop_count(results), n),
        "loops": rate(sum(loops(r["generated"]) for r in results), n),
    }


# --- the training mixture of notebook 07 -----------------------------------------------


def mixture_folder() -> Path:
    """A data folder (`data.data_folder`) whose train split is the course's conversations
    followed by the instruction-following ones of `train_conversations`: the mixture that
    notebook 07 measures. `training.course_adapter(data_dir=mixture_folder())` trains it."""
    from sft_helpers.data import data_folder, read_split

    return data_folder(read_split("train") + train_conversations())


def saved_mixture(path: Path, profile: str) -> dict:
    """The mixed adapter's replies that `bench/ifeval_mixture.py` saved in `path`
    (`"ifeval"`: to the benchmark's prompts, `"course"`: to the held-out course prompts),
    checked to come from the adapter that the current recipe and data give for `profile`.
    Another key raises `ValueError` saying how to make the file again."""
    from sft_helpers.training import adapter_key, recipe_with  # torch-heavy: import on use

    saved = json.loads(Path(path).read_text(encoding="utf-8"))
    key = adapter_key(recipe_with(profile=profile), mixture_folder())
    if saved["adapter_key"] != key:
        raise ValueError(
            f"{path} holds the replies of the mixed adapter {saved['adapter_key']} "
            f"({saved['profile']}), but the current recipe and data give {key} for {profile}: "
            f"run python bench/ifeval_mixture.py --profile {profile} --write {path}"
        )
    return saved
