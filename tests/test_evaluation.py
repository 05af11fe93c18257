"""Generation and evaluation: batched generation equals one-by-one, metrics on hand-made
cases, judge checks."""

from __future__ import annotations

import math

import pytest
import torch

from sft_helpers import evaluation as ev
from sft_helpers import generation as gen
from sft_helpers import models
from sft_helpers.data import is_refusal
from sft_helpers.models import load_model

PROMPTS = [
    {"instruction": "Hi", "reference": "Hello."},
    {"instruction": "What is the capital of France, and why is it that city?"},
    {"instruction": "2+2?", "reference": "4"},
]
HELD_OUT = [
    [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    for question, answer in [
        ("2+2?", "4"),
        ("Name a colour.", "Blue, like the sky."),
        ("Say hi", "Hi there, how are you today?"),
    ]
]


@pytest.fixture(scope="module")
def tiny():
    """The tiny profile with larger random weights. As initialised, its greedy reply to every
    prompt is a run of newlines, which would make "batched equals one-by-one" hold trivially;
    these weights give each prompt its own varied reply."""
    model, tokenizer = load_model("tiny")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() == 2:
                weight.normal_(0.0, 0.5 if "embed" in name else 0.2)
    return model, tokenizer


def _generate(tiny, prompts=PROMPTS, **kwargs):
    model, tokenizer = tiny
    options = {"max_new_tokens": 8, "do_sample": False, "progress": False} | kwargs
    return gen.evaluate_sft_model(model, tokenizer, prompts, **options)


# --- generation ------------------------------------------------------------------------


def test_batched_greedy_equals_one_by_one(tiny):
    batched = _generate(tiny, batch_size=3)
    single = _generate(tiny, batch_size=1)
    # The prompts have different lengths, so the batch really is padded.
    assert [r["generated"] for r in batched] == [r["generated"] for r in single]
    assert len({r["generated"] for r in batched}) == len(PROMPTS)


def test_records_follow_the_contract(tiny):
    records = _generate(tiny)
    assert [r["instruction"] for r in records] == [p["instruction"] for p in PROMPTS]
    assert [r["expected"] for r in records] == ["Hello.", None, "4"]
    # The random tiny model never closes its turn: every reply runs to the budget.
    assert {r["stop_reason"] for r in records} == {gen.STOP_LENGTH}
    assert {r["n_tokens"] for r in records} == {8}


def test_stop_reason_is_eos_when_a_stop_token_is_generated(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.apply_chat_template(
        gen.prompt_messages(PROMPTS[0]), add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    ids = output[0, prompt["input_ids"].shape[1]:].tolist()
    # Declare the 4th greedy token a stop token: generation must end there, cut before it.
    fourth = ids[3]
    assert fourth not in ids[:3]
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [original, fourth]
    try:
        record = _generate(tiny, prompts=PROMPTS[:1])[0]
    finally:
        model.generation_config.eos_token_id = original
    assert record["stop_reason"] == gen.STOP_EOS
    assert record["n_tokens"] == 3
    assert record["generated"] == tokenizer.decode(ids[:3])


def test_sampling_is_seeded(tiny):
    first = _generate(tiny, do_sample=True, temperature=1.0, seed=1)
    again = _generate(tiny, do_sample=True, temperature=1.0, seed=1)
    other = _generate(tiny, do_sample=True, temperature=1.0, seed=2)
    assert [r["generated"] for r in first] == [r["generated"] for r in again]
    assert [r["generated"] for r in first] != [r["generated"] for r in other]


def test_a_system_message_reaches_the_prompt():
    messages = gen.prompt_messages({"instruction": "Hi", "system": "You are Pip."})
    assert messages == [
        {"role": "system", "content": "You are Pip."},
        {"role": "user", "content": "Hi"},
    ]


def test_a_conversation_under_way_is_answered_from_its_messages(tiny):
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
    ]
    assert gen.prompt_messages({"messages": chat}) == chat
    record = _generate(tiny, prompts=[{"messages": chat, "reference": "4"}])[0]
    assert (record["instruction"], record["expected"]) == ("2+2?", "4")
    with pytest.raises(ValueError, match=r"\[0\]: 'messages' must end with a user message"):
        gen.prompt_messages({"messages": chat[:2]}, 0)


@pytest.mark.parametrize(
    ("prompts", "kwargs", "error", "message"),
    [
        ([], {}, ValueError, "eval_prompts is empty"),
        ([{"instruction": "Hi"}, {"prompt": "Hi"}], {}, ValueError, r"\[1\] has no 'instruction'"),
        ([{"instruction": "  "}], {}, ValueError, r"eval_prompts\[0\] has no 'instruction'"),
        (["Hi"], {}, TypeError, r"eval_prompts\[0\] must be a dict"),
        ("Hi", {}, TypeError, "must be a list of dicts"),
        ([{"instruction": "Hi"}], {"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ([{"instruction": "Hi"}], {"batch_size": 0}, ValueError, "batch_size"),
        ([{"instruction": "Hi"}], {"do_sample": True, "temperature": 0.0}, ValueError, "> 0"),
    ],
)
def test_bad_input_gets_a_clear_error(tiny, prompts, kwargs, error, message):
    with pytest.raises(error, match=message):
        _generate(tiny, prompts=prompts, **kwargs)


# --- metrics ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generated", "reference", "expected"),
    [
        ("Paris.", "paris", True),
        ("  The   Answer: 42! ", "the answer 42", True),
        ("Paris is the capital.", "Paris", False),
        ("4", "four", False),
    ],
)
def test_exact_match(generated, reference, expected):
    assert ev.exact_match(generated, reference) is expected


@pytest.mark.parametrize(
    ("generated", "reference", "expected"),
    [
        # LCS "the cat on the mat" = 5 of 6 words each way: P = R = F1 = 5/6.
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
        # LCS 2 ("a c"): P = 2/3, R = 2/2, F1 = 0.8. Order matters: not a bag of words.
        ("a b c", "a c", 0.8),
        ("c b a", "a b c", 1 / 3),
        ("Same words.", "same WORDS", 1.0),
        ("nothing shared", "at all", 0.0),
        ("", "reference", 0.0),
    ],
)
def test_rouge_l(generated, reference, expected):
    assert ev.rouge_l(generated, reference) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I cannot provide that information.", True),
        ("As an AI, I don't have opinions.", True),
        ("I am unable to browse the web.", True),
        ("I can't write malware.", True),
        ("I can\u2019t help with that.", True),
        ("I won't give instructions for that.", True),
        ("Paris is the capital of France.", False),
        ("You can't divide by zero: the result is undefined.", False),
        ("I can help with that: the answer is 4.", False),
        ("I can't believe it is already 4 o'clock.", False),
    ],
)
def test_is_refusal(text, expected):
    assert is_refusal(text) is expected


def test_answer_line_is_the_first_non_empty_line():
    assert ev.answer_line("\n  Paris.  \n\n### Details\nSince 508.") == "Paris."
    assert ev.answer_line("") == ""


def _record(generated, stop=gen.STOP_EOS, expected=None, n_tokens=5, category="factual"):
    return {"category": category, "instruction": "q", "expected": expected,
            "generated": generated, "n_tokens": n_tokens, "stop_reason": stop}


def test_generation_metrics_on_hand_made_records():
    records = [
        # Exact match compares the direct-answer lines only: the details may differ.
        _record("Paris.\n\n### Details\nSince 508.", "eos", "Paris\n\n### Details\nOld.", 2),
        _record("I cannot answer that.\n\n### Details\n4", "eos", "4\n\n### Details\nx", 6),
        _record("I'm Pip.\nblah blah", gen.STOP_LENGTH, None, 10, category="identity"),
        _record("I'm SmolLM.\n\n### Details\nHi.", "eos", None, 4, category="identity"),
    ]
    metrics = ev.generation_metrics(records)
    # House style: records 0, 1 and 3. Persona: only identity records count, and only 2 says Pip.
    assert metrics["house style"] == pytest.approx(3 / 4)
    assert metrics["persona"] == pytest.approx(1 / 2)
    assert metrics["compliant"] == pytest.approx(2 / 4)
    assert metrics["stop rate"] == pytest.approx(3 / 4)
    # Only the two records with a reference count for exact match and ROUGE-L.
    assert metrics["exact match"] == pytest.approx(0.5)
    # ROUGE-L: "paris details since 508" vs "paris details old": LCS 2, P 2/4, R 2/3 -> 4/7;
    # "i cannot answer that details 4" vs "4 details x": LCS 1 -> P 1/6, R 1/3 -> 2/9.
    assert metrics["ROUGE-L"] == pytest.approx((4 / 7 + 2 / 9) / 2)
    assert metrics["refusals"] == pytest.approx(1 / 4)
    assert metrics["mean tokens"] == pytest.approx(5.5)


def test_records_carry_the_items_id_and_category(tiny):
    chat = [{"role": "user", "content": "Who?"}]
    item = {"id": "eval-007", "category": "identity", "messages": chat}
    record = _generate(tiny, prompts=[item])[0]
    assert (record["id"], record["category"]) == ("eval-007", "identity")


def test_metrics_refuse_empty_results():
    with pytest.raises(ValueError, match="no results"):
        ev.generation_metrics([])
    with pytest.raises(ValueError, match="no results"):
        gen.stop_rate([])


def test_compare_models_puts_models_side_by_side():
    results = {"base": [_record("x", stop=gen.STOP_LENGTH)], "tuned": [_record("x")]}
    losses = {
        "base": {"loss": 2.0, "perplexity": math.exp(2.0)},
        "tuned": {"loss": 1.0, "perplexity": math.e},
    }
    table = ev.compare_models(results, losses)
    assert list(table.index) == ["base", "tuned"]
    assert table.loc["base", "stop rate"] == 0.0 and table.loc["tuned", "stop rate"] == 1.0
    assert table.loc["tuned", "perplexity"] == pytest.approx(math.e)
    with pytest.raises(KeyError, match="no eval loss for model 'tuned'"):
        ev.compare_models(results, {"base": losses["base"]})
    with pytest.raises(ValueError, match="at least one model"):
        ev.compare_models({})


def test_eval_loss_is_per_token_and_independent_of_batch_size(tiny):
    model, tokenizer = tiny
    whole = ev.eval_loss(model, tokenizer, HELD_OUT, batch_size=3)
    single = ev.eval_loss(model, tokenizer, HELD_OUT, batch_size=1)
    assert whole["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert whole["perplexity"] == pytest.approx(math.exp(whole["loss"]))
    # Same number as transformers' own loss, token-weighted over the conversations.
    from sft_helpers.masking import tokenize_with_masking

    total, count = 0.0, 0
    for conversation in HELD_OUT:
        example = tokenize_with_masking(conversation, tokenizer)
        with torch.no_grad():
            out = model(input_ids=example["input_ids"][None], labels=example["labels"][None])
        n = int((example["labels"][1:] != -100).sum())
        total, count = total + out.loss.item() * n, count + n
    assert whole["tokens"] == count
    assert whole["loss"] == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        ev.eval_loss(model, tokenizer, [])


# --- judge -----------------------------------------------------------------------------


def _always_first(prompts):
    return [1.0] * len(prompts)


def _prefers_longer(prompts):
    # A fair (if shallow) judge: it looks at the answers, not at their slots.
    def answer(prompt, letter, end):
        return prompt.split(f"Answer {letter}:\n")[1].split(end)[0]

    return [
        float(len(answer(p, "A", "\n\nAnswer B")) > len(answer(p, "B", "\n\nWhich")))
        for p in prompts
    ]


QUESTIONS = ["q1", "q2", "q3"]
LONG = ["a long answer", "another long one", "yet another long one"]
SHORT = ["short", "tiny", "brief"]


def test_position_bias_catches_a_judge_that_picks_the_first_slot():
    bias = ev.position_bias(_always_first, QUESTIONS, LONG, SHORT)
    assert bias["first_wins"] == 1.0
    assert bias["consistency"] == 0.0
    assert bias["p_a"] == [0.5, 0.5, 0.5]
    assert bias["a_first"] == bias["b_first"] == [1.0, 1.0, 1.0]


def test_position_bias_passes_a_judge_that_reads_the_answers():
    bias = ev.position_bias(_prefers_longer, QUESTIONS, LONG, SHORT)
    assert bias["first_wins"] == 0.5
    assert bias["consistency"] == 1.0
    assert bias["p_a"] == [1.0, 1.0, 1.0]
    assert bias["a_first"] == [1.0, 1.0, 1.0] and bias["b_first"] == [0.0, 0.0, 0.0]


def test_judge_agreement_counts_only_pairs_the_metric_decides():
    agreement = ev.judge_agreement([0.9, 0.2, 0.7, 0.4], [1, 0, 0, 1], [0, 1, 1, 1])
    assert agreement == {"agreement": 2 / 3, "pairs": 3}
    with pytest.raises(ValueError, match="ties on every pair"):
        ev.judge_agreement([0.9], [1], [1])
    with pytest.raises(ValueError, match="lengths differ"):
        ev.judge_agreement([0.9], [1, 0], [0, 1])


def test_judge_pairs_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="2 instructions, 1 A answers"):
        ev.judge_pairs(_always_first, ["q", "r"], ["a"], ["b"])
    with pytest.raises(ValueError, match="no answer pairs"):
        ev.judge_pairs(_always_first, [], [], [])


def test_model_judge_gives_a_probability_per_prompt_batched_or_not(tiny):
    model, tokenizer = tiny
    prompts = [ev.judge_prompt(q, a, b) for q, a, b in zip(QUESTIONS, LONG, SHORT, strict=True)]
    batched = ev.model_judge(model, tokenizer, batch_size=3)(prompts)
    single = ev.model_judge(model, tokenizer, batch_size=1)(prompts)
    assert len(batched) == 3 and all(0.0 < p < 1.0 for p in batched)
    assert batched == pytest.approx(single, abs=1e-5)


def test_answer_likelihood_is_the_mean_log_probability_of_the_reply_and_its_end(tiny):
    model, tokenizer = tiny
    references = ["r1", "r2", "r3"]
    scores = ev.answer_likelihood(model, tokenizer, QUESTIONS, LONG, references, batch_size=2)
    # By hand: render the conversation, find the reply's tokens after the generation prompt,
    # and average their log-probabilities up to and including the end-of-turn token.
    for question, answer, reference, score in zip(QUESTIONS, LONG, references, scores,
                                                  strict=True):
        user = [{"role": "user", "content": ev.LIKELIHOOD_PROMPT.format(
            instruction=question, reference=reference)}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}],
                                             return_dict=True)["input_ids"]
        end = full.index(tokenizer.convert_tokens_to_ids("<|im_end|>"), len(prompt))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full])).logits[0].log_softmax(-1)
        by_hand = [logits[t - 1, full[t]].item() for t in range(len(prompt), end + 1)]
        assert score == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-4)
    # The reference is part of the prompt: without it the same answers score differently.
    alone = ev.answer_likelihood(model, tokenizer, QUESTIONS, LONG, batch_size=3)
    assert all(abs(a - b) > 1e-6 for a, b in zip(alone, scores, strict=True))
    with pytest.raises(ValueError, match="2 instructions, 1 answers, 2 references"):
        ev.answer_likelihood(model, tokenizer, ["q", "r"], ["a"], ["x", "y"])
    with pytest.raises(ValueError, match="no answers to score"):
        ev.answer_likelihood(model, tokenizer, [], [])


def test_likelihood_preference_follows_the_scores_and_has_no_slot():
    p = ev.likelihood_preference([-1.0, -3.0, -2.0], [-2.0, -1.0, -2.0])
    assert p[0] > 0.5 > p[1] and p[2] == 0.5
    swapped = ev.likelihood_preference([-2.0, -1.0, -2.0], [-1.0, -3.0, -2.0])
    assert [a + b for a, b in zip(p, swapped, strict=True)] == pytest.approx([1.0] * 3)
    with pytest.raises(ValueError, match="2 A scores, 1 B scores"):
        ev.likelihood_preference([0.0, 0.0], [0.0])


# --- intervals and paired comparisons -----------------------------------------------------


Z95 = 1.959963984540054


def wilson(k, n, z=Z95):
    """The Wilson score interval, written out from its formula."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k, n", [(0, 10), (10, 10), (5, 10), (52, 65), (1, 1), (0, 1), (3, 400)])
def test_proportion_ci_is_the_wilson_interval(k, n):
    low, high = ev.proportion_ci(k, n)
    assert (low, high) == pytest.approx(wilson(k, n), abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_proportion_ci_at_the_edges_and_known_values():
    # k = 0: the lower bound is exactly 0 and the upper is z^2 / (n + z^2); k = n mirrors it.
    assert ev.proportion_ci(0, 10) == (0.0, pytest.approx(Z95**2 / (10 + Z95**2)))
    assert ev.proportion_ci(10, 10) == (pytest.approx(10 / (10 + Z95**2)), 1.0)
    assert ev.proportion_ci(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    # A 99% interval is wider than a 95% one.
    assert ev.proportion_ci(5, 10, confidence=0.99)[0] < ev.proportion_ci(5, 10)[0]


@pytest.mark.parametrize("k, n", [(1, 0), (-1, 5), (6, 5)])
def test_proportion_ci_rejects_impossible_counts(k, n):
    with pytest.raises(ValueError, match="must be"):
        ev.proportion_ci(k, n)


def test_paired_difference_counts_the_discordant_pairs_and_tests_them_exactly():
    before = [True] * 10 + [False] * 10 + [True] * 1 + [False] * 8
    after = [True] * 10 + [False] * 10 + [False] * 1 + [True] * 8
    d = ev.paired_difference(before, after)
    assert (d["n"], d["before"], d["after"], d["gained"], d["lost"]) == (29, 11, 18, 8, 1)
    assert d["difference"] == pytest.approx(7 / 29)
    # Exact McNemar: 2 * P(X <= 1) for X ~ Binomial(9, 1/2) = 2 * 10 / 512.
    assert d["p_value"] == pytest.approx(20 / 512)
    low, high = d["ci"]
    assert 0 < low < d["difference"] < high < 1
    # Swapping the two models mirrors the difference and its interval.
    back = ev.paired_difference(after, before)
    assert back["difference"] == pytest.approx(-d["difference"])
    assert back["ci"] == pytest.approx((-high, -low))


def test_paired_difference_interval_agrees_with_a_paired_bootstrap():
    import random

    rng = random.Random(0)
    before = [rng.random() < 0.4 for _ in range(65)]
    after = [b or rng.random() < 0.5 for b in before]
    d = ev.paired_difference(before, after)
    pairs = list(zip(before, after, strict=True))
    boot = sorted(
        sum(a - b for b, a in (rng.choice(pairs) for _ in pairs)) / len(pairs)
        for _ in range(4000)
    )
    assert d["ci"] == pytest.approx((boot[100], boot[3899]), abs=0.03)


def test_paired_difference_of_identical_outcomes_is_zero_and_not_significant():
    d = ev.paired_difference([True, False] * 10, [True, False] * 10)
    assert d["difference"] == 0 and d["p_value"] == 1.0
    assert d["ci"][0] < 0 < d["ci"][1]
    assert "not significant" in ev.format_difference(d)


def test_paired_difference_rejects_unpaired_or_empty_outcomes():
    with pytest.raises(ValueError, match="the same prompts"):
        ev.paired_difference([True], [True, False])
    with pytest.raises(ValueError, match="no outcomes"):
        ev.paired_difference([], [])


def test_reply_scores_judge_the_whole_reply_and_the_stop():
    good = _record("Paris.\n\n### Details\nSince 508.")
    cut = _record("Paris.\n\n### Details\nSince 508.", gen.STOP_LENGTH)
    looping = _record("Paris.\n\n### Details\n" + "It is old. It is big. " * 4)
    assert ev.reply_scores(good) == {"opening": True, "stopped": True, "loops": False,
                                     "house_style": True, "persona": None, "compliant": True}
    assert ev.reply_scores(cut)["house_style"] is False and ev.reply_scores(cut)["opening"]
    assert ev.reply_scores(looping)["loops"] and not ev.reply_scores(looping)["house_style"]
    table = ev.score_table([good, cut, looping, _record("I'm Pip.\n\n### Details\nHi.",
                                                         category="identity")])
    assert {m: (r["k"], r["n"]) for m, r in table.items()} == {
        "opening": (4, 4), "stopped": (3, 4), "loops": (1, 4), "house_style": (2, 4),
        "persona": (1, 1), "compliant": (2, 4)}
    assert table["house_style"]["ci"] == ev.proportion_ci(2, 4)
    assert ev.format_rate(table["house_style"]) == "2/4 = 50% [15, 85]"


# --- cached replies ----------------------------------------------------------------------

EVAL_RECORDS = [
    {"id": "e1", "category": "factual", "messages": [{"role": "user", "content": "Hi"}],
     "reference": "Hello."},
    {"id": "e2", "category": "identity",
     "messages": [{"role": "user", "content": "Who are you?"}], "reference": "I'm Pip."},
]


def _no_generation(*args, **kwargs):
    raise AssertionError("generated although the replies are cached")


def test_weights_digest_follows_the_weights(tiny):
    model, _ = tiny
    weight = model.get_input_embeddings().weight
    before = models.weights_digest(model)
    assert models.weights_digest(model) == before
    with torch.no_grad():
        weight[0, 0] += 1e-3
        changed = models.weights_digest(model)
        weight[0, 0] -= 1e-3
    assert changed != before
    assert models.weights_digest(model) == before


def test_measure_compliance_reads_cached_replies(tiny, fresh_cache, monkeypatch):
    model, tokenizer = tiny
    options = {"max_new_tokens": 6, "progress": False}
    table, results = ev.measure_compliance(model, tokenizer, EVAL_RECORDS, **options)
    assert len(list(fresh_cache.glob(f"{ev.REPLIES_PREFIX}-*"))) == 1
    monkeypatch.setattr(ev, "evaluate_sft_model", _no_generation)
    assert ev.measure_compliance(model, tokenizer, EVAL_RECORDS, **options) == (table, results)
    # Anything that can change a reply is part of the key: a setting, a prompt, a weight.
    for call in (
        lambda: ev.measure_compliance(model, tokenizer, EVAL_RECORDS, max_new_tokens=7,
                                      progress=False),
        lambda: ev.measure_compliance(model, tokenizer, EVAL_RECORDS, system="Be brief.",
                                      **options),
        lambda: ev.measure_compliance(model, tokenizer, EVAL_RECORDS[:1], **options),
        lambda: ev.measure_compliance(model, tokenizer, EVAL_RECORDS, cache=False, **options),
    ):
        with pytest.raises(AssertionError, match="generated although"):
            call()
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[0, 0] += 1e-3
        try:
            with pytest.raises(AssertionError, match="generated although"):
                ev.measure_compliance(model, tokenizer, EVAL_RECORDS, **options)
        finally:
            weight[0, 0] -= 1e-3
