"""Evaluating a fine-tuned model: metrics, eval loss, model comparison, LLM judge.

The metrics below score the records of `sft_helpers.generation.evaluate_sft_model` (one
per prompt: the reply and why generation stopped); `compare_models` puts several models
side by side in one table.

The LLM-as-judge part asks a model which of two answers is better (a rubric prompt, one
forward pass, the probability of "A" against "B"); `position_bias` and `judge_agreement`
are the two sanity checks to run before believing any judge. `answer_likelihood` is the
other kind of judge: it scores each answer alone, by how probable the model finds it as
its reply, and `likelihood_preference` turns two such scores into a verdict.

    >>> generation_metrics(evaluate_sft_model(model, tokenizer, prompts))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from statistics import NormalDist

import pandas as pd
import torch

from sft_helpers.data import compliance, is_refusal, loops
from sft_helpers.generation import (
    BATCH_SIZE,
    STOP_EOS,
    evaluate_sft_model,
    left_padded,
    stop_rate,
)
from sft_helpers.masking import IGNORE_INDEX, pad_batch, tokenize_with_masking
from sft_helpers.models import cached_entry, weights_digest

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WORD = re.compile(r"\w+")
JUDGE_RUBRIC = """You are grading two answers to the same question.
A better answer is correct and follows the house style: a one-line direct answer, then a
blank line, then a line reading `### Details`, then the details.

Question: {instruction}

Answer A:
{answer_a}

Answer B:
{answer_b}

Which answer is better? Reply with one letter, A or B."""
# The user turn of the likelihood judge: the question, with its reference answer or alone.
LIKELIHOOD_PROMPT = """Question: {instruction}

Reference answer:
{reference}

Answer the question the way the reference answer does."""
QUESTION_PROMPT = """Question: {instruction}

Answer the question."""
# What `reply_scores` reports for each reply, in the order tables print them.
REPLY_METRICS = ("opening", "stopped", "loops", "house_style", "persona", "compliant")
# New tokens for a whole reply: the longest reply in the course data has 123 tokens, so a
# reply that has not ended after 160 is not going to.
REPLY_TOKENS = 160
# Cached greedy replies: the cache entry `replies-<key>` holds this file.
REPLIES_PREFIX, REPLIES_FILE = "replies", "replies.json"
# A judge maps rubric prompts to P(the answer in position A is the better one).
Judge = Callable[[Sequence[str]], list[float]]


# --- metrics ---------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces: the form exact match compares.

    >>> normalize_answer("  The answer:  Paris! ")
    'the answer paris'
    """
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def exact_match(generated: str, reference: str) -> bool:
    """True when the two strings are equal after `normalize_answer`.

    >>> exact_match("Paris.", "paris")
    True
    """
    return normalize_answer(generated) == normalize_answer(reference)


def answer_line(text: str) -> str:
    """The first non-empty line: the direct answer, in the course's house style.

    >>> answer_line("\\nParis.\\n\\n### Details\\nIt has been the capital since 508.")
    'Paris.'
    """
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # One row of the classic dynamic programme: O(len(a) * len(b)) time, O(len(b)) memory.
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(generated: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of lower-cased words, as an F1 score.

    >>> rouge_l("the cat sat on the mat", "the cat is on the mat")
    0.8333333333333334
    """
    candidate = _WORD.findall(generated.lower())
    target = _WORD.findall(reference.lower())
    common = _lcs_length(candidate, target)
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(target)
    return 2 * precision * recall / (precision + recall)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _with_reference(results: Sequence[Mapping]) -> list[Mapping]:
    return [r for r in results if r.get("expected")]


def generation_metrics(results: Sequence[Mapping]) -> dict[str, float]:
    """The metrics of one model's `evaluate_sft_model` records, as fractions and means.

    "compliant", "house style", "loops" and "persona" are the course metric on the whole
    reply (`reply_scores`; persona counts only records whose category is "identity", NaN
    when there is none); "opening" checks only the start of the reply, for replies cut
    short on purpose. ROUGE-L (whole reply) and exact match (of the `answer_line`s: the
    direct answer is the exact part of a house-style reference, the details are free prose)
    average over the records that have a reference (NaN when none has one).

    >>> generation_metrics(records)["stop rate"]  # doctest: +SKIP
    0.875
    """
    if not results:
        raise ValueError("no results to score: evaluate at least one prompt")
    replies = [r["generated"] for r in results]
    referenced = _with_reference(results)
    table = score_table(results)
    matches = [
        float(exact_match(answer_line(r["generated"]), answer_line(r["expected"])))
        for r in referenced
    ]
    return {
        "compliant": table["compliant"]["rate"],
        "house style": table["house_style"]["rate"],
        "opening": table["opening"]["rate"],
        "persona": table["persona"]["rate"] if "persona" in table else float("nan"),
        "stop rate": stop_rate(results),
        "loops": table["loops"]["rate"],
        "exact match": _mean(matches),
        "ROUGE-L": _mean([rouge_l(r["generated"], r["expected"]) for r in referenced]),
        "refusals": _mean([float(is_refusal(reply)) for reply in replies]),
        "mean tokens": _mean([r["n_tokens"] for r in results]),
    }


def _reply_losses(
    model, tokenizer, conversations: Sequence, batch_size: int, max_length: int
) -> list[tuple[float, int]]:
    """(summed loss, token count) over the trained (assistant) tokens of each conversation."""
    examples = [
        tokenize_with_masking(c, tokenizer, max_length, index=i)
        for i, c in enumerate(conversations)
    ]
    losses = []
    model.eval()
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(examples[start:start + batch_size], tokenizer.pad_token_id)
        batch = {key: value.to(model.device) for key, value in batch.items()}
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        # Position t predicts token t + 1.
        targets = batch["labels"][:, 1:]
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(), targets, reduction="none",
            ignore_index=IGNORE_INDEX,
        )
        counts = (targets != IGNORE_INDEX).sum(1)
        losses += zip(per_token.sum(1).tolist(), counts.tolist(), strict=True)
    return losses


def eval_loss(
    model, tokenizer, conversations: Sequence, *, batch_size: int = 8, max_length: int = 1024
) -> dict:
    """Mean loss per trained (assistant) token on held-out conversations, and perplexity.

    The average is over tokens, not over batches, so it does not depend on `batch_size`.

    >>> eval_loss(model, tokenizer, held_out)  # doctest: +SKIP
    {'loss': 1.93, 'perplexity': 6.9, 'tokens': 2140}
    """
    if len(conversations) == 0:
        raise ValueError("eval_loss needs at least one held-out conversation")
    losses = _reply_losses(model, tokenizer, conversations, batch_size, max_length)
    total, count = sum(t for t, _ in losses), sum(n for _, n in losses)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def compare_models(
    results_by_model: Mapping[str, Sequence[Mapping]],
    losses: Mapping[str, Mapping] | None = None,
) -> pd.DataFrame:
    """One table, one row per model: `generation_metrics` plus eval loss and perplexity.

    >>> compare_models({"base": base_results, "tuned": tuned_results})  # doctest: +SKIP
    """
    if not results_by_model:
        raise ValueError("compare_models needs at least one model's results")
    rows = {}
    for name, results in results_by_model.items():
        rows[name] = generation_metrics(results)
        if losses is not None:
            if name not in losses:
                raise KeyError(f"no eval loss for model {name!r}; losses has {sorted(losses)}")
            loss = losses[name]
            rows[name].update({"eval loss": loss["loss"], "perplexity": loss["perplexity"]})
    return pd.DataFrame.from_dict(rows, orient="index")


def proportion_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: `k` successes out of `n` trials.

    Unlike the normal approximation p +- z*sqrt(p(1-p)/n), it stays inside [0, 1] and
    is not empty at k = 0 or k = n, which is where small evaluations often land.

    >>> proportion_ci(0, 10)
    (0.0, 0.2775...)
    >>> low, high = proportion_ci(7, 10)
    >>> round(low, 3), round(high, 3)
    (0.397, 0.892)
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be between 0 and n = {n}, got {k}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = k / n
    denominator = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denominator
    # At k = 0 (k = n) the exact bound is 0 (1); rounding would leave a 1e-17 there.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def rate(k: int, n: int, confidence: float = 0.95) -> dict:
    """`k` of `n` as a record: `k`, `n`, `rate` and `ci` (`proportion_ci`).

    >>> rate(3, 4)["rate"]
    0.75
    """
    return {"k": k, "n": n, "rate": k / n, "ci": proportion_ci(k, n, confidence)}


def format_rate(record: Mapping) -> str:
    """A `rate` record as text: k/n, the percentage and the 95% interval.

    >>> format_rate(rate(52, 65))
    '52/65 = 80% [69, 88]'
    """
    low, high = record["ci"]
    return (f"{record['k']}/{record['n']} = {record['rate']:.0%} "
            f"[{100 * low:.0f}, {100 * high:.0f}]")


def _two_sided_binomial(k: int, m: int) -> float:
    # Exact McNemar: under "no difference" each discordant pair goes either way with p = 1/2.
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(k, m - k) + 1)) / 2**m
    return min(1.0, 2 * tail)


def paired_difference(
    before: Sequence[bool], after: Sequence[bool], confidence: float = 0.95
) -> dict:
    """How `after` differs from `before` on the same prompts (one outcome per prompt each).

    Returns `n`, `before` and `after` (successes), `gained` (prompts that pass after only),
    `lost` (before only), `difference` (after rate - before rate), its interval `ci` and
    `p_value` (exact McNemar test). Only the prompts on which the two disagree carry
    information about the difference. The interval is Bonett and Price's adjusted Wald
    interval for paired proportions (one pseudo-count added to each kind of disagreement),
    which keeps a sensible width when the two never disagree.

    >>> d = paired_difference([False, False, True, False], [True, True, True, False])
    >>> d["difference"], d["gained"], d["lost"], d["p_value"]
    (0.5, 2, 0, 0.5)
    """
    if len(before) != len(after):
        raise ValueError(f"{len(before)} outcomes before but {len(after)} after: "
                         "a paired comparison needs the same prompts")
    if not before:
        raise ValueError("no outcomes: a difference of nothing is undefined")
    pairs = list(zip(map(bool, before), map(bool, after), strict=True))
    n = len(pairs)
    gained = sum(a and not b for b, a in pairs)
    lost = sum(b and not a for b, a in pairs)
    successes_before = sum(b for b, _ in pairs)
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p_gained, p_lost = (gained + 1) / (n + 2), (lost + 1) / (n + 2)
    centre = p_gained - p_lost
    half = z * math.sqrt((p_gained + p_lost - centre**2) / (n + 2))
    return {
        "n": n, "before": successes_before, "after": successes_before + gained - lost,
        "gained": gained, "lost": lost, "difference": (gained - lost) / n,
        "ci": (max(-1.0, centre - half), min(1.0, centre + half)),
        "p_value": _two_sided_binomial(gained, gained + lost),
    }


def format_difference(record: Mapping) -> str:
    """A `paired_difference` record as text: the change in points, its interval, and
    whether the interval excludes 0.

    >>> format_difference(paired_difference([False] * 20, [True] * 15 + [False] * 5))
    '+75 points [+45, +91], significant (15 gained, 0 lost)'
    """
    low, high = record["ci"]
    verdict = "significant" if low > 0 or high < 0 else "not significant"
    return (f"{100 * record['difference']:+.0f} points [{100 * low:+.0f}, {100 * high:+.0f}], "
            f"{verdict} ({record['gained']} gained, {record['lost']} lost)")


# --- the course metric on generated replies ------------------------------------------------


def reply_scores(record: Mapping) -> dict[str, bool | None]:
    """How one `evaluate_sft_model` record scores, judged on the whole reply:

    - `opening`: the opening-only check (answer line, blank line, heading), which flatters;
    - `stopped`: the model closed its turn itself (not cut off by `max_new_tokens`);
    - `loops`: the reply repeats itself (`data.repetition_problems`);
    - `house_style`: the whole reply in the house style (`data.style_problems`) and stopped;
    - `persona`: the first line names Pip (identity prompts only, else None);
    - `compliant`: house style, and the persona where it applies.

    >>> reply_scores({"category": "factual", "generated": "4.\\n\\n### Details\\n2 + 2.",
    ...               "stop_reason": "max_new_tokens"})["house_style"]
    False
    """
    text = compliance(record, record["generated"])
    stopped = record["stop_reason"] == STOP_EOS
    house_style = text["house_style"] and stopped
    return {
        "opening": text["opening"], "stopped": stopped, "loops": loops(record["generated"]),
        "house_style": house_style, "persona": text["persona"],
        "compliant": house_style and text["persona"] is not False,
    }


def score_table(records: Sequence[Mapping]) -> dict[str, dict]:
    """Each metric of `reply_scores` over `records` as a `rate` (k/n with its interval);
    `persona` counts the identity prompts only.

    >>> table = score_table([{"category": "factual", "generated": "4.\\n\\n### Details\\n2 + 2.",
    ...                       "stop_reason": "eos"}])
    >>> format_rate(table["house_style"])
    '1/1 = 100% [21, 100]'
    """
    if not records:
        raise ValueError("no records to score: evaluate at least one prompt")
    scores = [reply_scores(r) for r in records]
    table = {}
    for metric in REPLY_METRICS:
        values = [s[metric] for s in scores if s[metric] is not None]
        if values:
            table[metric] = rate(sum(values), len(values))
    return table


def with_system(records: Sequence[Mapping], system: str | None) -> list[dict]:
    """`records` with a system message put before each one's `messages` (None: left as
    they are, so the chat template adds its own default).

    >>> hello = [{"messages": [{"role": "user", "content": "Hi"}]}]
    >>> [m["role"] for m in with_system(hello, "Be brief.")[0]["messages"]]
    ['system', 'user']
    """
    head = [{"role": "system", "content": system}] if system else []
    return [{**r, "messages": head + list(r["messages"])} for r in records]


def replies_key(model, tokenizer, records: Sequence[Mapping], settings: Mapping) -> str:
    """The cache key of greedy replies: a digest of the model's weights, its chat template,
    the records and the generation `settings`. Anything that can change a reply changes it.
    """
    content = {"weights": weights_digest(model), "template": tokenizer.chat_template,
               "records": list(records), "settings": dict(settings)}
    payload = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cached_replies(
    model,
    tokenizer,
    prompts: Sequence[Mapping],
    *,
    max_new_tokens: int,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
    cache: bool = True,
) -> list[dict]:
    """`model`'s greedy replies to `prompts` (`evaluate_sft_model` records, in order).

    Greedy replies are a function of the weights, the prompts and the settings, so with
    `cache=True` they are kept in the course cache under `replies_key`: notebook 07 reads
    the replies that notebook 03 generated for the same model instead of generating them
    again. `cache=False` always generates.
    """

    def generate() -> list[dict]:
        return evaluate_sft_model(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=False,
            batch_size=batch_size, progress=progress,
        )

    if not cache:
        return generate()
    key = replies_key(model, tokenizer, prompts, {"max_new_tokens": max_new_tokens})

    def build(folder: Path) -> None:
        (folder / REPLIES_FILE).write_text(json.dumps(generate()))

    entry = cached_entry(f"{REPLIES_PREFIX}-{key}", build)
    return json.loads((entry / REPLIES_FILE).read_text())


def measure_compliance(
    model,
    tokenizer,
    records: Sequence[Mapping],
    *,
    max_new_tokens: int = REPLY_TOKENS,
    system: str | None = None,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
    cache: bool = True,
) -> tuple[dict[str, dict], list[dict]]:
    """`(score_table(results), results)`: `model`'s greedy replies to the eval `records`
    (whose `messages` end with the user turn), in the records' order, scored whole.

    `max_new_tokens` (default `REPLY_TOKENS`) leaves room for a whole reply, so a reply
    that does not stop within it has failed to stop. `system` puts a system message first
    (`with_system`; None: the chat template's own default). The replies come from
    `cached_replies` (`cache=False` always generates).

    >>> table, results = measure_compliance(model, tokenizer, read_split("eval"))  # doctest: +SKIP
    """
    results = cached_replies(model, tokenizer, with_system(records, system),
                             max_new_tokens=max_new_tokens, batch_size=batch_size,
                             progress=progress, cache=cache)
    return score_table(results), results


# --- LLM as a judge ----------------------------------------------------------------------


def judge_prompt(instruction: str, answer_a: str, answer_b: str, rubric: str = JUDGE_RUBRIC) -> str:
    """The rubric with the question and the two answers filled in (A first, then B)."""
    return rubric.format(instruction=instruction, answer_a=answer_a, answer_b=answer_b)


def _letter_id(tokenizer, letter: str) -> int:
    ids = tokenizer.encode(letter, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"the judge's tokenizer splits {letter!r} into {len(ids)} tokens; need one"
        )
    return ids[0]


def model_judge(model, tokenizer, *, batch_size: int = 8) -> Judge:
    """A judge backed by a chat model: P("A") / (P("A") + P("B")) for its first reply token.

    One forward pass per prompt, no sampling: the verdict is a probability, not a coin flip.

    >>> judge = model_judge(*load_model())                              # doctest: +SKIP
    >>> judge([judge_prompt("2+2?", "4", "5")])                        # doctest: +SKIP
    [0.53]
    """
    letters = torch.tensor([_letter_id(tokenizer, "A"), _letter_id(tokenizer, "B")])

    def judge(prompts: Sequence[str]) -> list[float]:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        model.eval()
        scores = []
        for start in range(0, len(texts), batch_size):
            inputs = left_padded(tokenizer, texts[start:start + batch_size], model.device)
            with torch.no_grad():
                logits = model(**inputs, logits_to_keep=1).logits[:, -1, letters.to(model.device)]
            logits = logits.float()
            scores += logits.softmax(-1)[:, 0].tolist()
        return scores

    return judge


def _check_lengths(per: str, empty: str, columns: Mapping[str, Sequence]) -> None:
    """A ValueError unless every column has one entry per instruction, and at least one."""
    lengths = [len(values) for values in columns.values()]
    if len(set(lengths)) > 1:
        counts = ", ".join(f"{n} {name}" for n, name in zip(lengths, columns, strict=True))
        raise ValueError(f"need one instruction per {per}: {counts}")
    if not lengths[0]:
        raise ValueError(empty)


def judge_pairs(
    judge: Judge, instructions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str]
) -> list[float]:
    """P(answer A is better) for each pair, with A shown first."""
    _check_lengths("answer pair", "no answer pairs to judge",
                   {"instructions": instructions, "A answers": answers_a, "B answers": answers_b})
    pairs = zip(instructions, answers_a, answers_b, strict=True)
    return list(judge([judge_prompt(q, a, b) for q, a, b in pairs]))


def position_bias(
    judge: Judge, instructions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str]
) -> dict:
    """Judge every pair in both orders. A fair judge's verdict follows the answers, not the slot.

    Returns `first_wins` (mean probability given to whichever answer is shown first: 0.5
    for a fair judge, 1.0 for one that always picks the first slot), `consistency` (the
    fraction of pairs whose verdict survives the swap), `p_a` (P(A better) per pair,
    averaged over both orders, which cancels a constant slot preference), and the judge's
    raw verdicts: `a_first` (P(A better), A shown first) and `b_first` (P(B better), B
    shown first).

    >>> position_bias(lambda prompts: [0.9] * len(prompts), ["q"], ["a"], ["b"])
    {'first_wins': 0.9, 'consistency': 0.0, 'p_a': [0.5], 'a_first': [0.9], 'b_first': [0.9]}
    """
    a_first = judge_pairs(judge, instructions, answers_a, answers_b)
    b_first = judge_pairs(judge, instructions, answers_b, answers_a)
    a_wins_swapped = [1 - p for p in b_first]
    consistent = [(p > 0.5) == (q > 0.5) for p, q in zip(a_first, a_wins_swapped, strict=True)]
    return {
        "first_wins": _mean(a_first + b_first),
        "consistency": _mean([float(c) for c in consistent]),
        "p_a": [(p + q) / 2 for p, q in zip(a_first, a_wins_swapped, strict=True)],
        "a_first": a_first, "b_first": b_first,
    }


def judge_agreement(
    p_a: Sequence[float], metric_a: Sequence[float], metric_b: Sequence[float]
) -> dict:
    """How often the judge prefers the answer that a programmatic metric scores higher.

    Only pairs on which the metric has a preference count (`pairs`); ties say nothing.

    >>> judge_agreement([0.8, 0.3, 0.6], [1, 0, 1], [0, 1, 1])
    {'agreement': 1.0, 'pairs': 2}
    """
    if not len(p_a) == len(metric_a) == len(metric_b):
        raise ValueError(
            f"lengths differ: {len(p_a)} verdicts, {len(metric_a)} and {len(metric_b)} scores"
        )
    decided = [(p, a > b) for p, a, b in zip(p_a, metric_a, metric_b, strict=True) if a != b]
    if not decided:
        raise ValueError("the metric ties on every pair, so there is nothing to agree with")
    agree = sum((p > 0.5) == a_better for p, a_better in decided)
    return {"agreement": agree / len(decided), "pairs": len(decided)}


def answer_likelihood(
    model,
    tokenizer,
    instructions: Sequence[str],
    answers: Sequence[str],
    references: Sequence[str] | None = None,
    *,
    batch_size: int = 8,
    max_length: int = 1024,
) -> list[float]:
    """How probable `model` finds each answer as its reply: the mean log-probability per
    token of the answer and the end-of-turn token after it.

    The user turn shows the question and its reference answer (`LIKELIHOOD_PROMPT`), or the
    question alone when `references` is None (`QUESTION_PROMPT`). Each answer is scored on
    its own, so a judge built on it cannot prefer a slot.

    >>> answer_likelihood(model, tokenizer, ["2+2?"], ["4"], ["4"])  # doctest: +SKIP
    [-1.7]
    """
    columns = {"instructions": instructions, "answers": answers}
    if references is not None:
        columns["references"] = references
    _check_lengths("answer", "no answers to score", columns)
    shown = [None] * len(instructions) if references is None else references
    conversations = [
        [{"role": "user", "content": QUESTION_PROMPT.format(instruction=q) if ref is None
          else LIKELIHOOD_PROMPT.format(instruction=q, reference=ref)},
         {"role": "assistant", "content": a}]
        for q, a, ref in zip(instructions, answers, shown, strict=True)
    ]
    losses = _reply_losses(model, tokenizer, conversations, batch_size, max_length)
    return [-total / count for total, count in losses]


def likelihood_preference(scores_a: Sequence[float], scores_b: Sequence[float]) -> list[float]:
    """P(answer A is better) from two answers' scores: 1 / (1 + exp(score_b - score_a)).

    Swapping A and B gives 1 minus the verdict, exactly: a judge of scores has no slot.

    >>> likelihood_preference([-1.0, -2.0], [-2.0, -2.0])
    [0.7310585786300049, 0.5]
    """
    if len(scores_a) != len(scores_b):
        raise ValueError(f"lengths differ: {len(scores_a)} A scores, {len(scores_b)} B scores")
    return [1 / (1 + math.exp(b - a)) for a, b in zip(scores_a, scores_b, strict=True)]
