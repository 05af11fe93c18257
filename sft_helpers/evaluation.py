"""Evaluating a fine-tuned model: batched generation, metrics, model comparison, LLM judge.

`evaluate_sft_model` answers a list of prompts (`{"instruction": ..., "reference": ...}`)
in batches with left padding and records, for each reply, why generation stopped: the
model closed its turn ("eos") or ran out of `max_new_tokens`. The metrics below score
those records; `compare_models` puts several models side by side in one table.

The LLM-as-judge part asks a model which of two answers is better (a rubric prompt, one
forward pass, the probability of "A" against "B"); `position_bias` and `judge_agreement`
are the two sanity checks to run before believing any judge.

    >>> results = evaluate_sft_model(model, tokenizer, prompts, max_new_tokens=48)  # doctest: +SKIP
    >>> results[0]["stop_reason"]                                                  # doctest: +SKIP
    'eos'
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from sft_helpers.data import compliance_rate
from sft_helpers.environment import seed_everything
from sft_helpers.masking import IGNORE_INDEX, pad_batch, tokenize_with_masking

# Item fields copied into each record, so a metric can look at them (the course's persona
# check applies to the "identity" category only).
PASSED_THROUGH = ("id", "category")
STOP_EOS = "eos"  # the model closed its turn
STOP_LENGTH = "max_new_tokens"  # cut off by the token budget
# Phrases that open or carry a refusal. Lower-case; matched on the lower-cased reply, in
# which typographic apostrophes (’) have become ASCII ones.
_REFUSED = r"(?:help|assist|do|provide|answer|comply|write|give|explain|create|make|share|tell)"
REFUSAL_PATTERNS = (
    rf"\bi can(?:'|no)?t {_REFUSED}\b",
    rf"\bi won'?t {_REFUSED}\b",
    r"\bi cannot\b",
    r"\bi(?:'m| am) (?:not able|unable) to\b",
    r"\bi(?:'m| am) sorry, but\b",
    r"\bas an ai\b",
)
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS))
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


# --- generation ------------------------------------------------------------------------


def prompt_messages(item: Mapping, index: int | None = None) -> list[dict[str, str]]:
    """The chat messages for one evaluation item.

    An item is either `{"instruction": ..., "system": ... (optional)}` or, for a
    conversation already under way, `{"messages": [..., {"role": "user", ...}]}`.

    >>> prompt_messages({"instruction": "2+2?"})
    [{'role': 'user', 'content': '2+2?'}]
    """
    where = "eval_prompts" if index is None else f"eval_prompts[{index}]"
    if not isinstance(item, Mapping):
        raise TypeError(f"{where} must be a dict with an 'instruction', not {type(item).__name__}")
    if "messages" in item:
        messages = list(item["messages"])
        last = messages[-1] if messages else None
        if not isinstance(last, Mapping) or last.get("role") != "user":
            raise ValueError(f"{where}: 'messages' must end with a user message to answer")
        return messages
    instruction = item.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(
            f"{where} has no 'instruction' (a non-empty string) and no 'messages'; "
            f"keys: {sorted(item)}"
        )
    system = item.get("system")
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": instruction}]


def _stop_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids | {tokenizer.eos_token_id}


def _generation_config(model, tokenizer, max_new_tokens, temperature, do_sample):
    # Built from scratch so a model's own sampling defaults (top_p, top_k) never leak in,
    # and greedy decoding carries no temperature (transformers warns about that).
    sampling = {"temperature": temperature, "top_p": 1.0, "top_k": 0} if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        eos_token_id=sorted(_stop_ids(model, tokenizer)),
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )


def _left_padded(tokenizer, texts: Sequence[str], device) -> dict[str, torch.Tensor]:
    # Left padding keeps every prompt's last token at the end of the row, where the first
    # new token is predicted. add_special_tokens=False: the template already has its own.
    batch = tokenizer(
        list(texts), add_special_tokens=False, padding=True, padding_side="left",
        return_tensors="pt",
    )
    return {key: value.to(device) for key, value in batch.items()}


def _check_generation_args(eval_prompts, max_new_tokens, temperature, do_sample, batch_size):
    if not isinstance(eval_prompts, Sequence) or isinstance(eval_prompts, str | bytes):
        raise TypeError(f"eval_prompts must be a list of dicts, not {type(eval_prompts).__name__}")
    if len(eval_prompts) == 0:
        raise ValueError("eval_prompts is empty: there is nothing to evaluate")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, not {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, not {batch_size!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"sampling needs temperature > 0, not {temperature!r}; "
                         "use do_sample=False for greedy decoding")


def evaluate_sft_model(
    model,
    tokenizer,
    eval_prompts: Sequence[Mapping],
    *,
    max_new_tokens: int = 512,
    temperature: float = 0.1,
    do_sample: bool = True,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Generate a reply to each prompt; one record per prompt, in order.

    Each record holds `instruction` (the user message answered), `expected` (the item's
    `reference`, or None), `generated` (the decoded reply, special tokens dropped),
    `n_tokens` (tokens before the stop token) and `stop_reason`: "eos" when the model
    closed its turn, "max_new_tokens" when the budget cut it off. Batches are left-padded;
    the run is seeded with `seed`.

    >>> records = evaluate_sft_model(model, tokenizer, [{"instruction": "Hi"}])  # doctest: +SKIP
    >>> records[0]["stop_reason"], records[0]["n_tokens"]                      # doctest: +SKIP
    ('eos', 9)
    """
    _check_generation_args(eval_prompts, max_new_tokens, temperature, do_sample, batch_size)
    chats = [prompt_messages(item, i) for i, item in enumerate(eval_prompts)]
    texts = [
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        for chat in chats
    ]
    config = _generation_config(model, tokenizer, max_new_tokens, temperature, do_sample)
    stop_ids = _stop_ids(model, tokenizer)
    seed_everything(seed)
    model.eval()
    records = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="generating", unit="batch", disable=not progress):
        inputs = _left_padded(tokenizer, texts[start:start + batch_size], model.device)
        with torch.no_grad():
            output = model.generate(**inputs, generation_config=config)
        new_tokens = output[:, inputs["input_ids"].shape[1]:].tolist()
        rows = zip(chats[start:start + batch_size], eval_prompts[start:start + batch_size],
                   new_tokens, strict=True)
        for chat, item, tokens in rows:
            stop = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
            kept = tokens if stop is None else tokens[:stop]
            records.append({
                **{key: item[key] for key in PASSED_THROUGH if key in item},
                "instruction": chat[-1]["content"],
                "expected": item.get("reference"),
                "generated": tokenizer.decode(kept, skip_special_tokens=True),
                "n_tokens": len(kept),
                "stop_reason": STOP_LENGTH if stop is None else STOP_EOS,
            })
    return records


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


def is_refusal(text: str) -> bool:
    """True when the reply refuses ("I can't help with that", "As an AI, ...").

    >>> is_refusal("I'm sorry, but I can't help with that."), is_refusal("Paris.")
    (True, False)
    """
    return _REFUSAL.search(text.lower().replace("\u2019", "'")) is not None


def stop_rate(results: Sequence[Mapping]) -> float:
    """The fraction of replies in which the model closed its turn by itself.

    >>> stop_rate([{"stop_reason": "eos"}, {"stop_reason": "max_new_tokens"}])
    0.5
    """
    if not results:
        raise ValueError("stop_rate of no results")
    return sum(r["stop_reason"] == STOP_EOS for r in results) / len(results)


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
            inputs = _left_padded(tokenizer, texts[start:start + batch_size], model.device)
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
