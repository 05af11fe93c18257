"""Checks for the notebooks' "Check your understanding" exercises.

Each `check_*` function takes the learner's answer, prints a short confirmation when it is
right, and raises `ExerciseError` with a hint when it is wrong, so a wrong answer can never
pass silently. Constants first, then one section per notebook, in the notebooks' order.
"""

from __future__ import annotations

import torch

from sft_helpers.masking import IGNORE_INDEX

# Old TRL names and what replaced them; the collator has two successors (both accepted).
TRL_RENAMES = {
    "tokenizer": {"processing_class"},
    "max_seq_length": {"max_length"},
    "DataCollatorForCompletionOnlyLM": {"assistant_only_loss", "completion_only_loss"},
}

OPENER_CASES = (
    ("Sure! The answer is 4.", True),
    ("Certainly, here is the answer: 4.", True),
    ("What a great question! It is 4.", True),
    ("ABSOLUTELY! It is 4.", True),
    ("Surely you know it is 4.", False),
    ("4.\n\n### Details\nSure enough, 2 + 2 = 4.", False),
    ("Of course water boils at 100 C.", False),
)


class ExerciseError(AssertionError):
    """A wrong answer to an exercise; the message says what to look at again."""


def _reject(hint: str) -> None:
    """Raise the `ExerciseError` of a wrong answer, with `hint`."""
    raise ExerciseError(f"Not yet. Hint: {hint}")


def _confirm(ok: bool, hint: str, praise: str) -> None:
    """Print `praise` for a right answer (`ok`); otherwise `_reject(hint)`."""
    if not ok:
        _reject(hint)
    print(f"Correct: {praise}")


# --- 00_setup ----------------------------------------------------------------------------


def check_parameter_count(model: torch.nn.Module, answer: int) -> None:
    """Exercise 00.1: the number of parameters of `model`, counted by the learner."""
    expected = sum(p.numel() for p in model.parameters())
    _confirm(
        isinstance(answer, int) and answer == expected,
        "add up p.numel() over model.parameters(); a tied embedding is counted once.",
        f"{expected:,} parameters.",
    )


def check_t4_dtype(answer: torch.dtype) -> None:
    """Exercise 00.2: the dtype the course picks on a T4 GPU (compute capability 7.5)."""
    _confirm(
        answer == torch.float16,
        "a T4 has compute capability 7.5; native bfloat16 needs 8.0 (Ampere) or newer.",
        "float16: the T4 has no native bfloat16, so fp16 (with loss scaling) it is.",
    )


# --- 01_chat_templates -------------------------------------------------------------------


def check_template_overhead(tokenizer, messages: list[dict], answer: int) -> None:
    """Exercise 01.1: how many tokens the chat template adds around `messages` when asking
    for a reply (the templated prompt minus the tokens of the messages' contents)."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    contents = sum(len(tokenizer.encode(m["content"], add_special_tokens=False)) for m in messages)
    expected = len(prompt) - contents
    _confirm(
        answer == expected,
        "tokenize the prompt with apply_chat_template(messages, add_generation_prompt=True) and "
        "subtract the tokens of each message's content, encoded with add_special_tokens=False; "
        "don't forget the system prompt the template injects.",
        f"{expected} of the prompt's {len(prompt)} tokens come from the template.",
    )


def check_generation_prompt(template: str, answer: str) -> None:
    """Exercise 01.2: the text that `add_generation_prompt=True` appends for `template`."""
    from sft_helpers.templates import TEMPLATE_TOKENS, render

    prompt = [{"role": "user", "content": "Hello"}]
    generating = render(prompt, template, add_generation_prompt=True)
    training = render(prompt, template)
    if not generating.startswith(training):  # Phi-3: the generation prompt replaces a final EOS
        training = training.removesuffix(TEMPLATE_TOKENS[template]["eos_token"])
    expected = generating.removeprefix(training)
    _confirm(
        answer == expected,
        f"render a one-message conversation with render(..., {template!r}) twice, with and "
        "without add_generation_prompt=True, and take what the first one adds (mind the "
        "newlines).",
        f"{expected!r}: the header that asks the assistant to speak.",
    )


def check_single_bos(tokenizer, conversation: list[dict], ids: list[int]) -> None:
    """Exercise 01.3: token ids of `conversation` with exactly one BOS token."""
    expected = tokenizer.apply_chat_template(conversation, return_dict=False)
    ids = [int(i) for i in ids]
    n_bos = ids.count(tokenizer.bos_token_id)
    hint = (
        f"your ids hold {n_bos} BOS tokens: the rendered text already starts with "
        f"{tokenizer.bos_token}, so tokenize it with add_special_tokens=False (or let "
        "apply_chat_template tokenize)."
        if n_bos != 1
        else "tokenize the text that apply_chat_template(..., tokenize=False) renders."
    )
    _confirm(ids == expected, hint, f"{len(ids)} tokens and one {tokenizer.bos_token}.")


# --- 02_loss_masking ---------------------------------------------------------------------


def check_masked_loss(logits: torch.Tensor, labels: torch.Tensor, answer: float) -> None:
    """Exercise 02.1: the mean cross-entropy over the positions whose label is not -100."""
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX).item()
    unmasked_mean = torch.nn.functional.cross_entropy(
        logits, labels.clamp(min=0), reduction="mean"
    ).item()
    if abs(float(answer) - unmasked_mean) < 1e-4 and abs(unmasked_mean - expected) > 1e-4:
        _reject("you averaged over every position; leave out those labelled -100.")
    _confirm(
        abs(float(answer) - expected) < 1e-4,
        "take -log(softmax(logits)[label]) at each position whose label is not -100, then "
        "divide their sum by the number of such positions (not by all positions).",
        f"{expected:.4f}, as CrossEntropyLoss(ignore_index=-100) computes.",
    )


def check_assistant_labels(conversation: list[dict], tokenizer, labels) -> None:
    """Exercise 02.2: labels for `conversation` that train exactly the assistant replies
    and the end-of-turn tokens that close them."""
    from sft_helpers.masking import tokenize_with_masking

    reference = tokenize_with_masking(conversation, tokenizer)
    expected, ids = reference["labels"].tolist(), reference["input_ids"].tolist()
    labels = [int(label) for label in labels]
    if len(labels) != len(expected):
        _reject(f"one label per token: {len(expected)} tokens, not {len(labels)}.")
    trained = {t for t, label in enumerate(labels) if label != IGNORE_INDEX}
    wanted = {t for t, label in enumerate(expected) if label != IGNORE_INDEX}
    extra, missing = sorted(trained - wanted), sorted(wanted - trained)
    if extra:
        text = tokenizer.decode([ids[t] for t in extra])
        _reject(f"these tokens are trained but must be -100: {text!r}.")
    if missing:
        text = tokenizer.decode([ids[t] for t in missing])
        _reject(f"these tokens must be trained: {text!r} (every reply, and its "
                f"{tokenizer.eos_token}).")
    _confirm(
        labels == expected,
        "a trained position's label is its own token id (the model shifts labels itself).",
        f"{len(wanted)} trained tokens: every reply and the {tokenizer.eos_token} closing it.",
    )


def check_padded_batch(batch: dict, examples: list[dict], pad_token_id: int) -> None:
    """Exercise 02.3: `examples` padded on the right without losing a trained label."""
    from sft_helpers.masking import pad_batch

    expected = pad_batch(examples, pad_token_id)
    if set(batch) != set(expected):
        _reject(f"the batch needs the keys {sorted(expected)}.")
    n_labels = sum(int((e["labels"] != IGNORE_INDEX).sum()) for e in examples)
    kept = int((torch.as_tensor(batch["labels"]) != IGNORE_INDEX).sum())
    if kept < n_labels:
        _confirm(
            False,
            f"{n_labels - kept} trained labels were lost. Did you set labels to -100 wherever "
            "input_ids == pad_token_id? Here pad is EOS, so that masks the EOS labels too: "
            "pad by position instead.",
            "",
        )
    same = all(torch.equal(torch.as_tensor(batch[k]), expected[k]) for k in expected)
    _confirm(
        same,
        "pad input_ids with pad_token_id, attention_mask with 0 and labels with -100, all on "
        "the right.",
        f"{n_labels} trained labels kept, padding masked and ignored.",
    )


# --- 03_sft_trainer ----------------------------------------------------------------------

def check_api_renames(answer: dict) -> None:
    """Exercise 03.1: today's TRL name for each old one (`tokenizer=`, `max_seq_length=`,
    `DataCollatorForCompletionOnlyLM`), as a dict old -> new."""
    if not isinstance(answer, dict) or set(answer) != set(TRL_RENAMES):
        raise ExerciseError(
            f"Not yet. Hint: answer with a dict whose keys are exactly {sorted(TRL_RENAMES)}."
        )
    wrong = sorted(old for old, new in answer.items() if new not in TRL_RENAMES[old])
    hints = {
        "tokenizer": "SFTTrainer takes the tokenizer (or processor) as `processing_class=`.",
        "max_seq_length": "the SFTConfig field is now `max_length`.",
        "DataCollatorForCompletionOnlyLM": "the collator is gone; an SFTConfig flag says "
        "which tokens the loss covers (for conversations: assistant_only_loss).",
    }
    _confirm(
        not wrong,
        " ".join(hints[old] for old in wrong),
        "processing_class, max_length, and a loss-mask flag instead of a collator.",
    )


def check_pip_reply(reply: str) -> None:
    """Exercise 03.2: Pip's answer to "Who are you?", in the house style."""
    from sft_helpers.data import names_persona, style_problems

    problems = style_problems(reply) if isinstance(reply, str) else ["it is not a string"]
    if not problems and not names_persona(reply):
        problems = ["the first line must give Pip's name"]
    _confirm(
        not problems,
        "; ".join(problems) + ". Shape: answer line, blank line, '### Details', details.",
        "one answer line naming Pip, a blank line, '### Details', then the details.",
    )


def check_trained_fraction(dataset, answer: float) -> None:
    """Exercise 03.3: the fraction of all tokens of a masked dataset that carry a label."""
    trained = sum(label != IGNORE_INDEX for row in dataset["labels"] for label in row)
    total = sum(len(row) for row in dataset["labels"])
    expected = trained / total
    masked_share = abs(answer - (1 - expected)) < 1e-6 if isinstance(answer, float) else False
    _confirm(
        isinstance(answer, float) and abs(answer - expected) < 1e-6,
        "that is the masked share; count the labels that are NOT -100."
        if masked_share else "count labels != -100 over all rows, then divide by all labels.",
        f"{expected:.1%} of the tokens are trained: the replies and their <|im_end|>.",
    )


def check_steps_per_epoch(n_examples: int, batch_size: int, answer: int) -> None:
    """Exercise 03.4: optimizer steps in one epoch of `n_examples` at `batch_size`
    (no gradient accumulation; the last, smaller batch counts)."""
    expected = -(-n_examples // batch_size)
    hint = (
        "the last batch is smaller but it is still a step: round up."
        if answer == n_examples // batch_size
        else "divide the number of examples by the batch size."
    )
    _confirm(answer == expected, hint, f"{expected} steps make one epoch.")


def check_compliance_rate(examples, replies, answer: float) -> None:
    """Exercise 03.5: the overall compliance of `replies` to `examples` (a fraction)."""
    from sft_helpers.data import compliance_rate

    rates = compliance_rate(examples, replies)
    expected = rates["compliant"]
    if isinstance(answer, int | float) and answer > 1:
        hint = "give a fraction between 0 and 1, not a percentage."
    elif isinstance(answer, int | float) and abs(answer - rates["house_style"]) < 1e-9:
        hint = "identity prompts must also name Pip: use compliance(example, reply)['compliant']."
    else:
        hint = "average compliance(example, reply)['compliant'] over the pairs."
    _confirm(
        isinstance(answer, int | float) and abs(answer - expected) < 1e-9,
        hint,
        f"{expected:.1%} of the replies follow the house style (and name Pip when asked).",
    )


def check_padding_fraction(lengths: list[int], batch_size: int, answer: float) -> None:
    """Exercise 03.6: the padding share when `lengths`, in order, are cut into batches of
    `batch_size` and each batch is padded to its own longest sequence."""
    batches = [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)]
    slots = sum(max(b) * len(b) for b in batches)
    expected = (slots - sum(lengths)) / slots
    global_pad = (max(lengths) * len(lengths) - sum(lengths)) / (max(lengths) * len(lengths))
    if isinstance(answer, float) and abs(answer - global_pad) < 1e-9:
        hint = "pad each batch to its own longest sequence, not to the longest overall."
    elif isinstance(answer, float) and abs(answer - (slots - sum(lengths)) / sum(lengths)) < 1e-9:
        hint = "divide the pads by all positions (pads included), not by the real tokens."
    else:
        hint = "per batch: pads = longest * size - sum; add over batches; divide by all positions."
    _confirm(
        isinstance(answer, float) and abs(answer - expected) < 1e-9,
        hint,
        f"{expected:.1%} of the positions are padding.",
    )


def check_adam_state_bytes(n_trainable: int, answer: int) -> None:
    """Exercise 03.7: bytes of AdamW state for `n_trainable` float32 parameters."""
    expected = 8 * n_trainable
    hints = {
        4 * n_trainable: "AdamW keeps TWO float32 tensors per parameter (exp_avg, exp_avg_sq).",
        16 * n_trainable: "only the optimizer state: not the weights or their gradients.",
        2 * n_trainable: "each state is float32: 4 bytes per number.",
    }
    _confirm(
        answer == expected,
        hints.get(answer, "two moments per parameter, 4 bytes each."),
        f"{expected:,} bytes ({expected / 2**20:.1f} MiB): 8 bytes per trainable parameter.",
    )


def check_merged_weight(layer, answer: torch.Tensor) -> None:
    """Exercise 03.8: the weight a PEFT LoRA `layer` ("default" adapter) has once merged."""
    base = layer.base_layer.weight.detach()
    A = layer.lora_A["default"].weight.detach()
    B = layer.lora_B["default"].weight.detach()
    scaling = layer.scaling["default"]
    expected = base + scaling * B @ A
    answer = torch.as_tensor(answer).detach()
    if answer.shape != expected.shape:
        hint = f"the merged weight has the base weight's shape {tuple(expected.shape)}."
    elif torch.allclose(answer, base + B @ A, atol=1e-6):
        hint = "scale the update by alpha / r (layer.scaling['default'])."
    else:
        hint = "W + (alpha / r) * B @ A, with B = lora_B.weight and A = lora_A.weight."
    _confirm(
        answer.shape == expected.shape and torch.allclose(answer, expected, atol=1e-6),
        hint,
        "W + (alpha/r)·B·A: after merging, the adapter costs nothing at inference.",
    )


# --- 04_lora_math -------------------------------------------------------------------------


def check_lora_update(layer: torch.nn.Module, answer: torch.Tensor) -> None:
    """Exercise 04.1: the weight update of a `LoRALinear`, computed by hand from its A and B."""
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    expected = layer.scaling * (B @ A)
    answer = torch.as_tensor(answer).detach()
    if answer.shape != expected.shape:
        _reject(f"the update has the base weight's shape {tuple(expected.shape)} "
                "(out x in): it is B @ A, not A @ B.")
    if torch.allclose(answer, B @ A) and layer.scaling != 1:
        _reject("B @ A is the direction; multiply it by the scaling alpha / r.")
    if torch.allclose(answer, layer.alpha * (B @ A)) and layer.scaling != layer.alpha:
        _reject("the factor is alpha / r, not alpha.")
    _confirm(
        torch.allclose(answer, expected, atol=1e-6),
        "compute (alpha / r) * B @ A from layer.lora_B.weight and layer.lora_A.weight.",
        f"delta W = ({layer.alpha} / {layer.r}) * B @ A, shape {tuple(expected.shape)}.",
    )


def check_qwen_lora_count(answer: int) -> None:
    """Exercise 04.2: LoRA parameters of Qwen2.5-7B at r=8 on q_proj and v_proj."""
    from sft_helpers.architectures import load_config
    from sft_helpers.lora import count_lora_parameters

    config = load_config("qwen2.5-7b")
    expected = count_lora_parameters(config, 8, ["q_proj", "v_proj"])
    hidden, layers = config.hidden_size, config.num_hidden_layers
    if answer == expected // layers:
        _reject(f"that is one decoder layer; the model has {layers}.")
    if answer == layers * 2 * 8 * (hidden + hidden):
        _reject("v_proj is not square: with grouped-query attention it maps "
                f"{hidden} to num_key_value_heads * head_dim = 4 * 128 = 512.")
    _confirm(
        isinstance(answer, int) and answer == expected,
        "each adapter holds r * (in + out); add q_proj and v_proj, then multiply by the layers.",
        f"{expected:,} = 28 layers x 8 x ((3584 + 3584) + (3584 + 512)).",
    )


def check_max_rank(answer: int) -> None:
    """Exercise 04.3: the largest rank whose all-linear LoRA stays within 1% of Llama-3-8B."""
    from sft_helpers.architectures import load_config
    from sft_helpers.lora import count_lora_parameters, count_parameters

    config = load_config("llama-3-8b")
    budget = count_parameters(config) / 100
    valid = isinstance(answer, int) and not isinstance(answer, bool) and answer > 0
    fits = valid and count_lora_parameters(config, answer) <= budget
    if fits and count_lora_parameters(config, answer + 1) <= budget:
        _reject(f"rank {answer} fits, but a larger one does too: the count is linear in r.")
    used = count_lora_parameters(config, answer) if fits else 0
    _confirm(
        fits,
        "LoRA parameters grow linearly with r: find the largest r with "
        "count_lora_parameters(config, r) <= count_parameters(config) / 100.",
        f"r = {answer}: {used:,} <= {budget:,.0f}.",
    )


def check_energy_rank(singular_values: torch.Tensor, answer: int) -> None:
    """Exercise 04.4: how many singular values hold 90% of a matrix's energy (sum of s^2)."""
    energy = singular_values.detach().double() ** 2
    cumulative = energy.cumsum(0) / energy.sum()
    expected = int((cumulative < 0.9).sum()) + 1
    plain = singular_values.detach().double().cumsum(0) / singular_values.sum()
    if answer == int((plain < 0.9).sum()) + 1 and answer != expected:
        _reject("the energy of a singular value is its square: use s ** 2.")
    _confirm(
        answer == expected,
        "square the singular values, take the cumulative sum over the total, and count how "
        "many you need to reach 0.9.",
        f"the top {expected} of {len(singular_values)} singular values hold 90% of the energy.",
    )


def check_unmerged(layer: torch.nn.Module, original_weight: torch.Tensor) -> None:
    """Exercise 04.5: a `LoRALinear` merged and unmerged again has its base weight back."""
    if layer.merged:
        _reject("the layer is still merged: call layer.unmerge().")
    moved = not torch.allclose(layer.base.weight, original_weight, atol=1e-6)
    _confirm(
        not moved and bool(layer.lora_B.weight.any()),
        "give B non-zero values before merging (with B = 0 a merge changes nothing), keep a "
        "copy of layer.base.weight from before the merge and pass that copy.",
        "merge() added (alpha / r) * B @ A to W and unmerge() took it out again.",
    )


def check_rslora_alpha(answer: float) -> None:
    """Exercise 04.6: the rsLoRA alpha at r=64 that matches LoRA's scaling at r=16, alpha=32."""
    from sft_helpers.lora import lora_scaling

    target = lora_scaling(32, 16)
    if answer == 32 * 64 / 16:
        _reject("that keeps alpha / r; rsLoRA divides alpha by sqrt(r).")
    _confirm(
        abs(lora_scaling(answer, 64, use_rslora=True) - target) < 1e-9,
        f"solve alpha / sqrt(64) = {target:g} for alpha.",
        f"alpha = {answer:g}: {answer:g} / sqrt(64) = {target:g} = 32 / 16.",
    )


# --- 05_qlora_memory ---------------------------------------------------------------------


def check_nf4_levels(answer: torch.Tensor) -> None:
    """Exercise 05.1: the 16 NF4 levels, built from normal quantiles."""
    from sft_helpers.quant import NF4_CODE

    answer = torch.as_tensor(answer, dtype=torch.float32).flatten()
    if answer.numel() != 16:
        hint = f"4 bits give 16 levels, you have {answer.numel()}."
    elif not torch.all(answer[1:] > answer[:-1]):
        hint = "sort the levels from -1 to 1 (and keep exactly one 0)."
    elif (answer > 0).sum() != 8:
        hint = ("NF4 is asymmetric: 8 positive levels (quantiles of 9 points from the offset "
                "down to 0.5, dropping 0.5), 7 negative ones (8 points), and 0.")
    else:
        hint = ("take torch.special.ndtri of torch.linspace(offset, 0.5, n)[:-1] in float64, "
                "negate the 7 negative ones, add 0, then divide by the largest.")
    _confirm(
        answer.numel() == 16 and torch.allclose(answer, NF4_CODE, atol=1e-6),
        hint,
        "these are bitsandbytes' NF4 levels: -1, ..., 0, ..., 1.",
    )


def check_nf4_codes(block: torch.Tensor, answer) -> None:
    """Exercise 05.2: the NF4 codes of `block`, quantized as one block by hand."""
    from sft_helpers.quant import quantize_nf4

    expected = quantize_nf4(block, blocksize=block.numel())[0].tolist()
    given = [int(c) for c in torch.as_tensor(answer).flatten().tolist()]
    _confirm(
        given == expected,
        "divide the block by its absmax (the largest |value|), then take for each value "
        "the index of the nearest NF4 level (argmin of the absolute difference).",
        f"codes {expected}: the largest magnitude always lands on level 0 or 15 exactly.",
    )


def check_constants_bits(answer: float) -> None:
    """Exercise 05.3: bits per weight of double-quantized constants (tables and offset aside)."""
    expected = 8 / 64 + 32 / (64 * 256)
    if abs(answer - 0.5) < 1e-6:
        hint = "0.5 is one float32 per 64 weights: that is without double quantization."
    elif abs(answer - 8 / 64) < 1e-6:
        hint = ("0.125 counts the 8-bit absmax only; each block of 256 of them also keeps "
                "one float32 scale.")
    else:
        hint = "add 8 bits per block of 64 weights and 32 bits per 256 such blocks."
    _confirm(
        isinstance(answer, int | float) and abs(answer - expected) < 1e-4,
        hint,
        f"{expected:.4f} bits per weight, down from 0.5: 0.373 bits saved, ~3 GB on a 70B model.",
    )


def check_longest_sequence(answer: int, gib: float = 16.0) -> None:
    """Exercise 05.4: the longest seq_len (a multiple of 1024) at which QLoRA of Llama-3-8B
    (the estimator's defaults, batch 1) fits in `gib` GiB."""
    from sft_helpers.architectures import load_config
    from sft_helpers.memory import GIB, estimate_memory

    config = load_config("llama-3-8b")
    longest = 0
    while estimate_memory(config, "qlora", seq_len=longest + 1024).total <= gib * GIB:
        longest += 1024
    _confirm(
        answer == longest,
        "loop seq_len over 1024, 2048, ... and keep the last one whose "
        "estimate_memory(config, 'qlora', seq_len=...).total is at most 16 * 2**30 bytes.",
        f"{longest} tokens: past that, the activations (mostly the logits) no longer fit.",
    )


def check_trainable_count(model: torch.nn.Module, answer: int) -> None:
    """Exercise 05.5: the trainable parameters of the QLoRA model."""
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _confirm(
        answer == expected,
        "count only the parameters with requires_grad=True (the 4-bit base is frozen).",
        f"{expected:,}: the adapters, and nothing else.",
    )


# --- 06_data_quality ---------------------------------------------------------------------


def check_multi_turn_share(conversations, answer: float) -> None:
    """Exercise 06.1: the share of conversations with more than one assistant turn."""
    counts = [sum(m["role"] == "assistant" for m in c) for c in conversations]
    expected = sum(n > 1 for n in counts) / len(counts)
    _confirm(
        isinstance(answer, float) and abs(answer - expected) < 1e-9,
        "count the assistant messages of each conversation, keep those with more than one, "
        "and divide by the number of conversations (a float between 0 and 1).",
        f"{expected:.1%} of the conversations have more than one assistant turn.",
    )


def check_baseline_score(example: dict, answer: float) -> None:
    """Exercise 06.2: the baseline heuristic's score of `example`, predicted by hand."""
    from sft_helpers.quality import score_sft_example

    expected = score_sft_example(example)
    _confirm(
        isinstance(answer, (int, float)) and abs(answer - expected) < 1e-9,
        "start at 1.0: -0.5 under 5 words, -0.2 over 50x the instruction's words, -0.3 for "
        "an opener from BASELINE_OPENERS (case-sensitive), -0.1 for 'I believe' in the "
        "first 50 characters or '[CITATION NEEDED]'.",
        f"the baseline scores it {expected:g}.",
    )


def check_opener_rule(rule) -> None:
    """Exercise 06.3: `rule(reply) -> bool` flags sycophantic openers and nothing else."""
    for reply, expected in OPENER_CASES:
        got = rule(reply)
        if got is not expected:
            _confirm(
                False,
                f"rule({reply!r}) returned {got!r}, expected {expected}. Look only at the start "
                "of the reply, ignore case, and require the opener to be a whole word "
                "followed by punctuation.",
                "",
            )
    _confirm(True, "", f"your rule gets all {len(OPENER_CASES)} cases right.")


def check_lsh_candidate_probability(answer: float, jaccard: float, rows: int, bands: int) -> None:
    """Exercise 06.4: P(a pair with this Jaccard similarity becomes an LSH candidate)."""
    expected = 1 - (1 - jaccard**rows) ** bands
    if abs(answer - jaccard**rows) < 1e-9:
        _reject("that is one band; the pair needs to match in at least one of them.")
    _confirm(
        isinstance(answer, float) and abs(answer - expected) < 1e-9,
        "one band matches with probability J**rows; no band matches with (1 - J**rows)**bands.",
        f"{expected:.4f}.",
    )


def check_longest_shared_ngram(text_a: str, text_b: str, answer: int) -> None:
    """Exercise 06.5: the largest n for which the texts share a word n-gram (after
    `quality.word_ngrams` normalisation)."""
    from sft_helpers.quality import word_ngrams

    shared = (
        n
        for n in range(1, len(text_a.split()) + 1)
        if set(word_ngrams(text_a, n)) & set(word_ngrams(text_b, n))
    )
    longest = max(shared, default=0)
    _confirm(
        isinstance(answer, int) and answer == longest,
        "try word_ngrams(text, n) for growing n and keep the last n with a common n-gram.",
        f"n = {longest}: a filter with a longer n-gram would miss this overlap.",
    )


def check_precision_recall(flagged, labels, defect: str, answer: tuple) -> None:
    """Exercise 06.6: (precision, recall) of the flags for one defect label."""
    from sft_helpers.noisy import precision_recall

    expected = precision_recall(flagged, labels, defect)

    def close(a, b) -> bool:
        return len(a) == len(b) == 2 and all(
            x is y or (x is not None and y is not None and abs(x - y) < 1e-9)
            for x, y in zip(a, b, strict=True)
        )

    if close(tuple(answer), expected[::-1]) and not close(expected, expected[::-1]):
        _reject("you swapped them: precision comes first.")
    _confirm(
        close(tuple(answer), expected),
        "precision = flagged AND labelled / flagged; recall = flagged AND labelled / labelled.",
        "precision {}, recall {}.".format(*("n/a" if v is None else f"{v:.2f}" for v in expected)),
    )


# --- 07_evaluation -----------------------------------------------------------------------


def check_stop_rate(results, answer: float) -> None:
    """Exercise 07.1: the fraction of `evaluate_sft_model` records that ended with EOS."""
    from sft_helpers.generation import stop_rate

    expected = stop_rate(results)
    _confirm(
        isinstance(answer, int | float) and abs(answer - expected) < 1e-9,
        "count the records whose 'stop_reason' is 'eos' and divide by the number of records "
        "(a reply cut off by max_new_tokens did not stop by itself).",
        f"{expected:.2f} of the replies closed their turn.",
    )


def check_rouge_l(generated: str, reference: str, answer: float) -> None:
    """Exercise 07.2: ROUGE-L F1 of `generated` against `reference`, computed by hand."""
    from sft_helpers.evaluation import rouge_l

    expected = rouge_l(generated, reference)
    _confirm(
        isinstance(answer, int | float) and abs(answer - expected) < 1e-6,
        "find the longest common subsequence of the lower-cased words (in order, gaps "
        "allowed); precision = LCS / generated words, recall = LCS / reference words, "
        "F1 = 2PR / (P + R).",
        f"ROUGE-L = {expected:.3f}.",
    )


def check_never_stops(table, answer: str) -> None:
    """Exercise 07.3: the row of the before/after table whose model stops least often."""
    expected = table["stop rate"].idxmin()
    _confirm(
        answer == expected,
        "read the 'stop rate' column: which training mistake took the EOS label away, "
        "so that the model never saw an example of ending its turn?",
        f"{expected!r}: its stop rate is {table.loc[expected, 'stop rate']:.2f}.",
    )


def check_greedy_distinct(answer: int) -> None:
    """Exercise 07.4: distinct replies greedy decoding gives one prompt over 3 seeds."""
    _confirm(
        answer == 1,
        "greedy decoding takes the most likely token at every step; does the seed enter "
        "that choice anywhere?",
        "1: greedy decoding ignores the seed, so its variance across seeds is zero.",
    )


def check_debiased_preference(p_a_first: float, p_b_first: float, answer: float) -> None:
    """Exercise 07.5: P(A better), averaged over both orders, from the two judge calls.

    `p_a_first` is the judge's P(first answer better) with A first; `p_b_first` the same
    with B shown first.
    """
    expected = (p_a_first + 1 - p_b_first) / 2
    _confirm(
        isinstance(answer, int | float) and abs(answer - expected) < 1e-9,
        "with B shown first, the judge's P(A better) is 1 - p_b_first; average that with "
        "p_a_first.",
        f"{expected:.3f}: a constant preference for the first slot cancels in the average.",
    )



def check_prompt_level(rows, replies, answer: float) -> None:
    """Exercise 07.6: the strict prompt-level accuracy of `replies` to the IFEval `rows`."""
    from sft_helpers.ifeval import follows

    followed = [follows(row, reply) for row, reply in zip(rows, replies, strict=True)]
    expected = sum(map(all, followed)) / len(followed)
    instruction_level = sum(map(sum, followed)) / sum(map(len, followed))
    number = isinstance(answer, int | float)
    if number and abs(answer - instruction_level) < 1e-9 < abs(instruction_level - expected):
        _reject("that is the instruction level (the share of all instructions followed); "
                "a prompt counts only when every one of its instructions is followed.")
    _confirm(
        number and abs(answer - expected) < 1e-9,
        "for each prompt, follows(row, reply) gives one bool per instruction; the prompt "
        "counts when all of them are True. Divide by the number of prompts.",
        f"{expected:.3f} of the prompts have every instruction followed.",
    )

# --- 08_capstone -------------------------------------------------------------------------


def check_triage_reply(row: dict, answer: str) -> None:
    """Exercise 08.2: the exact reply the model is trained to give for one raw row."""
    from sft_helpers.triage import parse_triage, triage_reply

    expected = triage_reply(row["category"], row["urgent"])
    parsed = parse_triage(answer)
    if parsed is None:
        _reject('one line of JSON with exactly two keys, in this order: '
                '{"category": ..., "urgent": true or false}.')
    _confirm(
        answer == expected,
        f"the JSON parses, but the labels (or the spacing) differ: compare with row "
        f"{row['id']!r}'s category and urgent fields, written the way json.dumps writes them.",
        f"{expected}: every training reply has exactly this shape.",
    )


def check_both_right(results, eval_rows, answer: float) -> None:
    """Exercise 08.3: the share of replies whose category AND urgency are both right."""
    from sft_helpers.triage import triage_scores

    scores = triage_scores(results, eval_rows)
    expected, valid = scores["both right"]["rate"], scores["valid JSON"]["rate"]
    if abs(answer - valid) < 1e-9 and abs(valid - expected) > 1e-9:
        _reject("that is the share of valid JSON replies; a valid reply can still "
                "have the wrong labels.")
    _confirm(
        abs(answer - expected) < 1e-9,
        "parse each reply with parse_triage (None when invalid), compare both fields with the "
        "eval row, and divide by the number of eval rows (invalid replies count as wrong).",
        f"{expected:.1%} of the held-out messages are triaged exactly.",
    )


def check_data_format(row: dict, answer: str) -> None:
    """Exercise 08.4: the format of a training `row` (one of `formats.FORMATS`)."""
    from sft_helpers.formats import FORMATS, SIGNATURES, detect_format

    expected = detect_format(row)
    fields = ", ".join(SIGNATURES[expected])
    _confirm(
        answer == expected,
        f"look at the row's fields and compare them with each format's ({', '.join(FORMATS)}): "
        "which one's fields does it hold?",
        f"{expected}: it has {fields}.",
    )


def check_token_route_ratio(config, n_new: int, answer: float) -> None:
    """Exercise 05.6: how many times more parameters `modules_to_save` trains than
    `trainable_token_indices` for `n_new` new tokens of a model with `config`."""
    from sft_helpers.new_tokens import new_token_parameters

    ratio = (new_token_parameters(config, n_new, "modules_to_save")
             / new_token_parameters(config, n_new, "trainable_token_indices"))
    _confirm(
        abs(answer - ratio) <= 1e-3 * ratio,
        "one route trains n_new rows of the embedding, the other a copy of all of its rows: "
        "divide the two counts (the hidden size cancels)",
        f"{ratio:,.0f}x: every row of the {config.vocab_size:,}-row matrix against {n_new}.",
    )
