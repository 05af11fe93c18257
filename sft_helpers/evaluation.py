"""Evaluating a fine-tuned model: metrics, eval loss, model comparison, LLM judge.

The metrics below score the records of `sft_helpers.generation.evaluate_sft_model` (one
per prompt: the reply and why generation stopped); `compare_models` puts several models
side by side in one table.

The LLM-as-judge part asks a model which of two answers is better (a rubric prompt, one
forward pass, the probability of "A" against "B"); `position_bias` and `judge_agreement`
are the two sanity checks to run before believing any judge.

    >>> generation_metrics(evaluate_sft_model(model, tokenizer, prompts))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist

import pandas as pd
import torch

from sft_helpers.data import compliance_rate, is_refusal
from sft_helpers.generation import left_padded, stop_rate
from sft_helpers.masking import IGNORE_INDEX, pad_batch, tokenize_with_masking

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

    "compliant", "house style" and "persona" are the course metric (`compliance_rate`
    from `sft_helpers.data`; persona counts only records whose category is "identity",
    NaN when there is none). ROUGE-L (whole reply) and exact match (of the
    `answer_line`s: the direct answer is the exact part of a house-style reference, the
    details are free prose) average over the records that have a reference (NaN when none
    has one).

    >>> generation_metrics(records)["stop rate"]  # doctest: +SKIP
    0.875
    """
    if not results:
        raise ValueError("no results to score: evaluate at least one prompt")
    replies = [r["generated"] for r in results]
    referenced = _with_reference(results)
    course = compliance_rate(results, replies)
    matches = [
        float(exact_match(answer_line(r["generated"]), answer_line(r["expected"])))
        for r in referenced
    ]
    return {
        "compliant": course["compliant"],
        "house style": course["house_style"],
        "persona": course["persona"],
        "stop rate": stop_rate(results),
        "exact match": _mean(matches),
        "ROUGE-L": _mean([rouge_l(r["generated"], r["expected"]) for r in referenced]),
        "refusals": _mean([float(is_refusal(reply)) for reply in replies]),
        "mean tokens": _mean([r["n_tokens"] for r in results]),
    }


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
    examples = [
        tokenize_with_masking(c, tokenizer, max_length, index=i)
        for i, c in enumerate(conversations)
    ]
    total, count = 0.0, 0
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
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum",
            ignore_index=IGNORE_INDEX,
        ).item()
        count += int((targets != IGNORE_INDEX).sum())
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
                logits = model(**inputs).logits[:, -1, letters.to(model.device)].float()
            scores += logits.softmax(-1)[:, 0].tolist()
        return scores

    return judge


def _check_pairs(instructions, answers_a, answers_b) -> None:
    if not len(instructions) == len(answers_a) == len(answers_b):
        raise ValueError(
            f"need one instruction per answer pair: {len(instructions)} instructions, "
            f"{len(answers_a)} A answers, {len(answers_b)} B answers"
        )
    if not instructions:
        raise ValueError("no answer pairs to judge")


def judge_pairs(
    judge: Judge, instructions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str]
) -> list[float]:
    """P(answer A is better) for each pair, with A shown first."""
    _check_pairs(instructions, answers_a, answers_b)
    pairs = zip(instructions, answers_a, answers_b, strict=True)
    return list(judge([judge_prompt(q, a, b) for q, a, b in pairs]))


def position_bias(
    judge: Judge, instructions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str]
) -> dict:
    """Judge every pair in both orders. A fair judge's verdict follows the answers, not the slot.

    Returns `first_wins` (mean probability given to whichever answer is shown first: 0.5
    for a fair judge, 1.0 for one that always picks the first slot), `consistency` (the
    fraction of pairs whose verdict survives the swap) and `p_a` (P(A better) per pair,
    averaged over both orders, which cancels a constant slot preference).

    >>> position_bias(lambda prompts: [0.9] * len(prompts), ["q"], ["a"], ["b"])
    {'first_wins': 0.9, 'consistency': 0.0, 'p_a': [0.5]}
    """
    a_first = judge_pairs(judge, instructions, answers_a, answers_b)
    b_first = judge_pairs(judge, instructions, answers_b, answers_a)
    a_wins_swapped = [1 - p for p in b_first]
    consistent = [(p > 0.5) == (q > 0.5) for p, q in zip(a_first, a_wins_swapped, strict=True)]
    return {
        "first_wins": _mean(a_first + b_first),
        "consistency": _mean([float(c) for c in consistent]),
        "p_a": [(p + q) / 2 for p, q in zip(a_first, a_wins_swapped, strict=True)],
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
