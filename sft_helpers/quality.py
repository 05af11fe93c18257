"""SFT data quality: score, deduplicate and decontaminate training conversations.

Three layers, from the simplest to the most useful:

1. `score_sft_example` / `filter_sft_dataset`: a one-number heuristic on
   {"instruction", "response"} pairs, kept as the baseline to improve on
   (`to_instruction_response` adapts a `messages` conversation to it).
2. `quality_report`: per-conversation rules that each return a *named reason* with a short
   explanation, so a reader sees why an example was dropped:

    >>> quality_report([{"role": "user", "content": "Capital of France?"},
    ...                 {"role": "assistant", "content": "Sure! Paris."}])
    {'too_short': 'reply 1 has 2 words (< 5)', 'sycophantic_opener': "reply 1 opens with 'Sure!'"}

3. Set-level filters that need the whole dataset: exact duplicates (hash of the normalised
   text), near duplicates (MinHash signatures + locality-sensitive hashing, verified with the
   exact Jaccard similarity) and eval contamination (word n-grams shared with the eval split).

`flag_dataset` runs all of them on a list of conversations or a `datasets.Dataset` (with
progress bars) and `drop_flagged` keeps the clean rows.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from sft_helpers.data import (
    PERSONA_NAME,
    expects_persona,
    names_persona,
    style_problems,
    validate_conversation,
)

# --- the baseline heuristic ----------------------------------------------------------------
BASELINE_OPENERS = ("Sure!", "Certainly!", "Of course!", "Great question!")
BASELINE_THRESHOLD = 0.7

# --- the named-reason rules ----------------------------------------------------------------
MIN_REPLY_WORDS = 5  # below this a reply rarely teaches anything (the baseline's limit too)
MAX_REPLY_WORDS = 400  # far longer than any course reply: padding or a pasted document
MAX_LENGTH_RATIO = 50.0  # reply words per prompt word, as in the baseline
# An opener that flatters or agrees before answering; the model learns to copy it.
SYCOPHANTIC = re.compile(
    r"^\s*(sure|certainly|of course|absolutely|great question|what a (great|good|wonderful) "
    r"question|i'?d be (happy|glad|delighted) to help)\b[^\n]{0,2}?[!,.:]",
    re.IGNORECASE,
)
# Phrases that hedge or signal an unsupported claim.
HEDGING = re.compile(
    r"\b(i believe|i think|i'?m not (sure|certain)|as far as i know|i could be wrong|"
    r"if i recall correctly)\b|\[citation needed\]",
    re.IGNORECASE,
)
# A finished reply ends with sentence punctuation, a closing bracket/quote or a code fence.
FINISHED = re.compile(r"""([.!?:;)\]}"'*`>]|```)\s*$""")
# Mojibake (UTF-8 read as Latin-1/cp1252), the replacement character, stray control bytes.
GARBAGE = re.compile(r"Ã[\x80-\xbf]|â€|Â[\xa0-\xbf]|\ufffd|[\x00-\x08\x0b\x0c\x0e-\x1d\x7f]")

# --- set-level filters ---------------------------------------------------------------------
SHINGLE_CHARS = 5  # character 5-grams: robust to small edits, cheap to hash
NUM_PERM = 128  # MinHash signature length (the estimate's std is about 1/sqrt(NUM_PERM))
NEAR_DUPLICATE_THRESHOLD = 0.7  # Jaccard similarity of the shingle sets
LSH_MIN_RECALL = 0.99  # band setup: P(a pair AT the threshold becomes a candidate) >= this
_PRIME = (1 << 31) - 1  # Mersenne prime for the universal hashes (products fit in uint64)
CONTAMINATION_NGRAM = 8  # word n-grams compared with the eval split
MIN_OVERLAP = 0.8  # share of an eval example's n-grams found in one training example
# Two prompts whose content words (stopwords dropped) overlap this much ask the same thing:
# "Is this ChatGPT?" and "Are you ChatGPT?" share all of theirs (1.0).
PARAPHRASE_THRESHOLD = 0.4
STOPWORDS = frozenset("""
a about am an and are as at be been being but by can could did do does don for from had has
have he her hi his how i if in into is it its just let me my no not of on or our please s she
should so t tell than that the their them then there these they this those to too us was we
were what when where which who whom whose why will with would yes you your
""".split())


# === 1. The baseline =======================================================================


def _text_field(example: Mapping, key: str) -> str:
    if not isinstance(example, Mapping):
        raise ValueError(f"expected a mapping with {key!r}, got {type(example).__name__}")
    if key not in example:
        raise ValueError(f"example is missing {key!r} (it has {sorted(example)})")
    if not isinstance(example[key], str):
        raise ValueError(f"example[{key!r}] must be a string, got {type(example[key]).__name__}")
    return example[key]


def score_sft_example(example: Mapping) -> float:
    """The baseline heuristic: start at 1.0 and subtract a penalty per red flag.

    -0.5 under 5 response words, -0.2 when the response has more than 50x the
    instruction's words, -0.3 for a sycophantic opener from `BASELINE_OPENERS` (exact,
    case-sensitive), -0.1 for "[CITATION NEEDED]" or "I believe" in the first 50 characters.
    The penalties add up to at most 0.9, so the floor at 0.0 is never reached, and at the
    default threshold (0.7) only a too-short response (or two red flags) is dropped.

    >>> score_sft_example({"instruction": "2+2?", "response": "Sure! 4"})
    0.2
    """
    instruction = _text_field(example, "instruction")
    response = _text_field(example, "response")
    score = 1.0
    if len(response.split()) < 5:
        score -= 0.5
    if len(response.split()) > len(instruction.split()) * 50:
        score -= 0.2
    if response.startswith(BASELINE_OPENERS):
        score -= 0.3
    if "[CITATION NEEDED]" in response or "I believe" in response[:50]:
        score -= 0.1
    return round(max(0.0, score), 6)  # rounding: 1.0 - 0.5 - 0.3 is 0.2, not 0.19999...


def filter_sft_dataset(examples: Iterable[Mapping], threshold: float = BASELINE_THRESHOLD):
    """Keep the examples whose `score_sft_example` is at least `threshold` (a fixed cut, not
    a percentile: how many survive depends on the data).

    >>> filter_sft_dataset([{"instruction": "Hi", "response": "OK"}])
    []
    """
    return [ex for ex in examples if score_sft_example(ex) >= threshold]


def to_instruction_response(conversation, index: int | None = None) -> dict[str, str]:
    """Adapt a `messages` conversation to the baseline's pair: the user turns joined as the
    instruction, the assistant turns joined as the response (blank line between turns).
    System messages are dropped: the baseline has no place for them.

    >>> to_instruction_response([{"role": "user", "content": "Hi"},
    ...                          {"role": "assistant", "content": "Hello!"}])
    {'instruction': 'Hi', 'response': 'Hello!'}
    """
    validate_conversation(conversation, index)
    return {
        field: "\n\n".join(m["content"] for m in conversation if m["role"] == role)
        for field, role in (("instruction", "user"), ("response", "assistant"))
    }


# === 2. Named reasons ======================================================================


def _words(text: str) -> int:
    return len(text.split())


def _structure_reasons(conversation) -> dict[str, str]:
    """Roles must alternate user -> assistant (after an optional system message) and end
    on an assistant turn; every turn must say something."""
    reasons = {}
    empty = [i for i, m in enumerate(conversation) if not m["content"].strip()]
    if empty:
        reasons["empty_turn"] = f"message {empty[0]} ({conversation[empty[0]]['role']}) is empty"
    start = 1 if conversation[0]["role"] == "system" else 0
    for i, message in enumerate(conversation[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            reasons["roles_out_of_order"] = f"message {i} is {message['role']}, expected {expected}"
            break
    else:
        if conversation[-1]["role"] != "assistant":
            reasons["roles_out_of_order"] = "the conversation ends on a user turn"
    return reasons


def _reply_reasons(prompt: str, reply: str, turn: int) -> dict[str, str]:
    """The rules that read one assistant reply (and the user turn before it)."""
    reasons = {}
    words = _words(reply)
    where = f"reply {turn}"
    if 0 < words < MIN_REPLY_WORDS:
        reasons["too_short"] = f"{where} has {words} words (< {MIN_REPLY_WORDS})"
    if words > MAX_REPLY_WORDS:
        reasons["too_long"] = f"{where} has {words} words (> {MAX_REPLY_WORDS})"
    ratio = words / max(1, _words(prompt))
    if prompt.strip() and ratio > MAX_LENGTH_RATIO:  # no prompt: structure rules explain it
        reasons["length_ratio"] = f"{where} is {ratio:.0f}x longer than its prompt"
    if (opener := SYCOPHANTIC.match(reply)) is not None:
        reasons["sycophantic_opener"] = f"{where} opens with {opener.group(0).strip()!r}"
    if (hedge := HEDGING.search(reply)) is not None:
        reasons["hedging"] = f"{where} hedges: {hedge.group(0)!r}"
    if reply.strip() and not FINISHED.search(reply):
        reasons["truncated"] = f"{where} ends mid-sentence: {reply.rstrip()[-20:]!r}"
    return reasons


def _persona_reasons(conversation, replies_with_reasons: set[int], expects_persona: bool):
    """Off-persona: a reply that breaks the house style (`data.style_problems`) when no more
    specific rule already explains it, or an identity conversation where no reply names
    the persona (`data.names_persona`)."""
    replies = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
    for turn in replies:
        problems = style_problems(conversation[turn]["content"])
        if turn not in replies_with_reasons and conversation[turn]["content"].strip() and problems:
            return {"off_persona": f"reply {turn} breaks the house style: {problems[0]}"}
    if expects_persona and not any(names_persona(conversation[i]["content"]) for i in replies):
        return {"off_persona": f"no reply names {PERSONA_NAME}, but the user asks who it is"}
    return {}


def quality_report(
    conversation,
    index: int | None = None,
    *,
    house_style: bool = True,
    expects_persona: bool = False,
) -> dict[str, str]:
    """Named reasons why `conversation` is a poor training example, each with a short
    explanation; an empty dict means no rule fired.

    With `house_style`, a reply that breaks the course's house style and persona is
    "off_persona" (unless a more specific reason, such as "too_short", already covers that
    reply); `expects_persona` (an identity question) also requires a reply naming the
    persona. Malformed input (not a list of {"role", "content"} strings, unknown roles, a
    system message that is not first, no assistant turn) raises `ValueError` naming
    conversation `index` and the message, via `data.validate_conversation`.

    >>> quality_report([{"role": "assistant", "content": "Hello, how can I help you?"},
    ...                 {"role": "user", "content": "Hi"}], house_style=False)
    {'roles_out_of_order': 'message 0 is assistant, expected user'}
    """
    validate_conversation(conversation, index)
    reasons = _structure_reasons(conversation)
    text = "".join(m["content"] for m in conversation)
    if (garbage := GARBAGE.search(text)) is not None:
        reasons["encoding_garbage"] = f"mojibake or control character {garbage.group(0)!r}"
    prompt, explained = "", set()
    for turn, message in enumerate(conversation):
        if message["role"] != "assistant":
            prompt = message["content"]
            continue
        found = _reply_reasons(prompt, message["content"], turn)
        if found:
            explained.add(turn)
        for name, why in found.items():
            reasons.setdefault(name, why)  # the first reply that breaks a rule explains it
    if house_style:
        reasons.update(_persona_reasons(conversation, explained, expects_persona))
    return reasons


# === 3. Set-level filters ==================================================================


def normalise(text: str) -> str:
    """Unicode-normalise (NFKC), case-fold and collapse whitespace, so that copies that
    differ only in case or spacing compare equal.

    >>> normalise("  Hello,\\n  WORLD ")
    'hello, world'
    """
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def conversation_text(conversation) -> str:
    """The contents of a conversation, one message per line, for hashing and similarity.
    System messages are left out: a system prompt shared by the whole dataset would make
    every pair look alike and every example share n-grams with the eval split.

    >>> conversation_text([{"role": "system", "content": "Be brief."},
    ...                    {"role": "user", "content": "Hi"},
    ...                    {"role": "assistant", "content": "Hello."}])
    'Hi\\nHello.'
    """
    return "\n".join(m["content"] for m in conversation if m["role"] != "system")


def exact_duplicate_of(texts: Sequence[str]) -> list[int | None]:
    """For each text, the index of the first earlier text with the same normalised SHA-256
    hash, else None. The first copy is kept; the later ones are duplicates.

    >>> exact_duplicate_of(["A b", "c", "a  B"])
    [None, None, 0]
    """
    first: dict[bytes, int] = {}
    result: list[int | None] = []
    for i, text in enumerate(texts):
        digest = hashlib.sha256(normalise(text).encode()).digest()
        result.append(first.get(digest))
        first.setdefault(digest, i)
    return result


def shingles(text: str, k: int = SHINGLE_CHARS) -> set[str]:
    """The set of character k-grams of the normalised text (the text itself when shorter).

    >>> sorted(shingles("Abcdef", k=5))
    ['abcde', 'bcdef']
    """
    text = normalise(text)
    if len(text) <= k:
        return {text} if text else set()
    return {text[i : i + k] for i in range(len(text) - k + 1)}


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; two empty sets count as identical (1.0).

    >>> jaccard({1, 2, 3}, {2, 3, 4})
    0.5
    """
    return len(a & b) / len(a | b) if a or b else 1.0


def content_words(text: str) -> set[str]:
    """The lower-cased words of `text` without stopwords: what a prompt is about.

    >>> sorted(content_words("Are you ChatGPT?")), sorted(content_words("Is this ChatGPT?"))
    (['chatgpt'], ['chatgpt'])
    """
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS}


def closest_prompt(prompt: str, candidates: Sequence[str]) -> tuple[float, str]:
    """The candidate whose `content_words` overlap `prompt`'s most, with that Jaccard
    similarity; at `PARAPHRASE_THRESHOLD` or above, the two ask the same thing.

    >>> closest_prompt("Is this ChatGPT?", ["Who made you?", "Are you ChatGPT?"])
    (1.0, 'Are you ChatGPT?')
    """
    if not candidates:
        raise ValueError("no candidate prompts to compare with")
    words = content_words(prompt)
    return max((jaccard(words, content_words(c)), c) for c in candidates)


def _hash_coefficients(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _PRIME, size=(num_perm, 1), dtype=np.uint64)
    b = rng.integers(0, _PRIME, size=(num_perm, 1), dtype=np.uint64)
    return a, b


def minhash_signature(items: set[str], num_perm: int = NUM_PERM, seed: int = 0) -> np.ndarray:
    """MinHash: for each of `num_perm` random hash functions h(x) = (a*x + b) mod p, the
    minimum over the set. Two sets' signatures agree in a position with probability equal
    to their Jaccard similarity, so the fraction of equal positions estimates it.
    The empty set gets all positions equal to p (it matches only another empty set).

    >>> sig = minhash_signature({"abc", "bcd"}, num_perm=4)
    >>> sig.shape, sig.dtype
    ((4,), dtype('uint64'))
    """
    a, b = _hash_coefficients(num_perm, seed)
    if not items:
        return np.full(num_perm, _PRIME, dtype=np.uint64)
    # crc32 is stable across processes (unlike hash()), and < 2**32 so a*x < 2**63.
    x = np.fromiter((zlib.crc32(s.encode()) % _PRIME for s in items), dtype=np.uint64)
    return ((a * x[None, :] + b) % _PRIME).min(axis=1)


def lsh_bands(num_perm: int, threshold: float, min_recall: float = LSH_MIN_RECALL) -> int:
    """Rows per band r for LSH: the signature is cut into num_perm // r bands, and a pair
    becomes a candidate when ALL rows of at least one band agree, with probability
    1 - (1 - J**r)**bands. Return the largest r (fewest spurious candidates) for which a pair
    at exactly `threshold` still becomes a candidate with probability >= `min_recall`.

    >>> lsh_bands(128, 0.7)
    4
    """
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= min_recall:
            return rows
    return 1


def near_duplicate_pairs(
    texts: Sequence[str],
    threshold: float = NEAR_DUPLICATE_THRESHOLD,
    num_perm: int = NUM_PERM,
    seed: int = 0,
) -> set[tuple[int, int]]:
    """Pairs (i, j), i < j, whose shingle sets have Jaccard similarity >= `threshold`.

    MinHash + LSH proposes candidate pairs without comparing all n^2 pairs; each candidate
    is then checked with the exact Jaccard, so a reported pair is never a false positive
    (a true pair is missed with probability < 1 - LSH_MIN_RECALL).

    >>> sorted(near_duplicate_pairs(["the cat sat on the mat", "the cat sat on the mat!", "xyz"]))
    [(0, 1)]
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], not {threshold!r}")
    sets = [shingles(t) for t in texts]
    signatures = [minhash_signature(s, num_perm, seed) for s in sets]
    rows = lsh_bands(num_perm, threshold)
    candidates: set[tuple[int, int]] = set()
    for start in range(0, num_perm - rows + 1, rows):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for i, signature in enumerate(signatures):
            buckets[signature[start : start + rows].tobytes()].append(i)
        for members in buckets.values():
            candidates.update((i, j) for k, i in enumerate(members) for j in members[k + 1 :])
    return {(i, j) for i, j in candidates if jaccard(sets[i], sets[j]) >= threshold}


def near_duplicate_of(texts: Sequence[str], **kwargs) -> list[int | None]:
    """For each text, the smallest earlier index it is a near duplicate of, else None
    (keyword arguments go to `near_duplicate_pairs`)."""
    result: list[int | None] = [None] * len(texts)
    for i, j in sorted(near_duplicate_pairs(texts, **kwargs)):
        if result[j] is None:
            result[j] = i
    return result


def word_ngrams(text: str, n: int = CONTAMINATION_NGRAM) -> list[tuple[str, ...]]:
    """The word n-grams of the normalised text in reading order, punctuation dropped.

    >>> word_ngrams("A b, c d!", n=3)
    [('a', 'b', 'c'), ('b', 'c', 'd')]
    """
    words = re.findall(r"\w+", normalise(text))
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def contamination(
    train_texts: Sequence[str],
    eval_texts: Sequence[str],
    n: int = CONTAMINATION_NGRAM,
    min_overlap: float = MIN_OVERLAP,
) -> list[tuple[int, float] | None]:
    """For each training text, (index of the eval text, overlap) for the eval text whose word
    n-grams it covers the most, when that share is at least `min_overlap`; else None.

    Measuring the share of an eval example's n-grams (rather than flagging any one shared
    n-gram) keeps phrases that the whole dataset repeats on purpose, such as the persona's
    introduction, from flagging every example that uses them.

    >>> train = ["one two three four", "five six"]
    >>> contamination(train, ["x one two three four"], n=3, min_overlap=0.5)
    [(0, 0.6666666666666666), None]
    """
    if n < 1:
        raise ValueError(f"n must be a positive int, not {n!r}")
    if not 0 < min_overlap <= 1:
        raise ValueError(f"min_overlap must be in (0, 1], not {min_overlap!r}")
    eval_sizes, owners = [], defaultdict(list)  # n-gram -> the eval texts that contain it
    for j, text in enumerate(eval_texts):
        grams = set(word_ngrams(text, n))
        eval_sizes.append(len(grams))
        for gram in grams:
            owners[gram].append(j)
    result: list[tuple[int, float] | None] = []
    for text in train_texts:
        shared = Counter(j for gram in set(word_ngrams(text, n)) for j in owners.get(gram, ()))
        best = max(((count / eval_sizes[j], -j) for j, count in shared.items()), default=None)
        hit = best is not None and best[0] >= min_overlap
        result.append((-best[1], best[0]) if hit else None)
    return result


# === 4. Whole datasets =====================================================================


def messages_of(example, index: int) -> list:
    """The `messages` of dataset row `index`; a row without them raises `ValueError` naming it.

    >>> messages_of({"id": "x"}, 3)
    Traceback (most recent call last):
    ...
    ValueError: example 3: expected a mapping with a 'messages' list
    """
    if not isinstance(example, Mapping) or "messages" not in example:
        raise ValueError(f"example {index}: expected a mapping with a 'messages' list")
    return example["messages"]


def answered(example: Mapping, index: int = 0) -> list[dict]:
    """The conversation of an eval example with its reference as the last assistant turn
    (an example without "reference" is returned as it is): the text a leak would copy.

    >>> answered({"messages": [{"role": "user", "content": "2+2?"}], "reference": "4."})
    [{'role': 'user', 'content': '2+2?'}, {'role': 'assistant', 'content': '4.'}]
    """
    messages = list(messages_of(example, index))
    if example.get("reference") is None:
        return messages
    return [*messages, {"role": "assistant", "content": _text_field(example, "reference")}]


def flag_dataset(
    examples,
    eval_examples: Iterable[Mapping] = (),
    house_style: bool = True,
    near_threshold: float = NEAR_DUPLICATE_THRESHOLD,
    ngram: int = CONTAMINATION_NGRAM,
):
    """Add a "reasons" field (sorted reason names, empty when clean) to every example.

    `examples` is a `datasets.Dataset` or a list of mappings, each with a "messages"
    conversation (and optionally a "category": "identity" asks for the persona); the result
    has the same type (a Dataset goes through `map`, with its progress bar). Besides
    `quality_report`'s rules, the later copy of an exact duplicate gets "duplicate", of a
    near duplicate "near_duplicate", and an example that covers most of the n-grams of one
    of `eval_examples` (their "reference" included) gets "eval_contamination".

    >>> flag_dataset([{"messages": [{"role": "user", "content": "Hi"},
    ...                             {"role": "assistant", "content": "Hello."}]}])
    [{'messages': [...], 'reasons': ['too_short']}]
    """
    conversations = [messages_of(ex, i) for i, ex in enumerate(examples)]
    eval_conversations = [answered(ex, i) for i, ex in enumerate(eval_examples)]
    for i, conversation in [*enumerate(conversations), *enumerate(eval_conversations)]:
        validate_conversation(conversation, i)  # bad input fails here, naming the example
    texts = [conversation_text(c) for c in conversations]
    eval_texts = [conversation_text(c) for c in eval_conversations]
    extra: list[set[str]] = [set() for _ in texts]
    exact = exact_duplicate_of(texts)
    for i, first in enumerate(exact):
        if first is not None:
            extra[i].add("duplicate")
    unique = [i for i, first in enumerate(exact) if first is None]  # copies are known already
    near = near_duplicate_of([texts[i] for i in unique], threshold=near_threshold)
    for i, first in zip(unique, near, strict=True):
        if first is not None:
            extra[i].add("near_duplicate")
    for i, leak in enumerate(contamination(texts, eval_texts, ngram)):
        if leak is not None:
            extra[i].add("eval_contamination")

    def reasons(example: Mapping, index: int) -> dict[str, list[str]]:
        found = quality_report(
            example["messages"],
            index,
            house_style=house_style,
            expects_persona=house_style and expects_persona(example),
        )
        return {"reasons": sorted(found.keys() | extra[index])}

    if isinstance(examples, list):
        return [{**ex, **reasons(ex, i)} for i, ex in enumerate(examples)]
    return examples.map(reasons, with_indices=True, desc="quality rules")


def drop_flagged(examples, ignore: Iterable[str] = ()):
    """Keep the examples whose "reasons" (from `flag_dataset`) are empty once the names in
    `ignore` are left out. A Dataset goes through `filter`; a list stays a list.

    >>> drop_flagged([{"reasons": []}, {"reasons": ["hedging"]}], ignore=["hedging"])
    [{'reasons': []}, {'reasons': ['hedging']}]
    """
    ignore = set(ignore)

    def keep(example: Mapping) -> bool:
        return not set(example["reasons"]) - ignore

    if isinstance(examples, list):
        return [ex for ex in examples if keep(ex)]
    return examples.filter(keep, desc="drop flagged")
