"""Generating replies: batched, left-padded, greedy or sampled, with the reason each stopped.

`evaluate_sft_model` answers a list of prompts (`{"instruction": ..., "reference": ...}` or
`{"messages": [...]}`) in batches with left padding and records, for each reply, why
generation stopped: the model closed its turn ("eos") or ran out of `max_new_tokens`.
`stop_rate` is the share that stopped by themselves. Notebook 03 uses these to measure the
adapter before and after training (with `sft_helpers.evaluation.measure_compliance`);
notebook 07 takes generation apart.

    >>> results = evaluate_sft_model(model, tokenizer, prompts, max_new_tokens=48)  # doctest: +SKIP
    >>> results[0]["stop_reason"]                                                  # doctest: +SKIP
    'eos'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from sft_helpers.runtime import seed_everything

# Item fields copied into each record, so a metric can look at them (the course's persona
# check applies to the "identity" category only).
PASSED_THROUGH = ("id", "category")
STOP_EOS = "eos"  # the model closed its turn
STOP_LENGTH = "max_new_tokens"  # cut off by the token budget
# The most prompts decoded together. A CPU decoding step reads every weight once whatever
# the batch: on the reference CPU a step of 64 rows takes 0.45 s, one of 16 0.23 s, one of 1
# 0.11 s (bench/generation.py measures the whole effect). The KV cache of 96 rows of 600
# tokens of the default model is about 2.7 GB.
BATCH_SIZE = 96


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


def _next_tokens(logits: torch.Tensor, temperature: float, do_sample: bool) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)[:, 0]


def decode(
    model, inputs: Mapping[str, torch.Tensor], *, max_new_tokens: int, stop_ids: set[int],
    temperature: float = 1.0, do_sample: bool = False,
) -> list[list[int]]:
    """The new tokens of each row of a left-padded batch, up to and including its stop token.

    The loop that `model.generate` runs, with one change: a row that has stopped leaves
    the batch (its KV cache rows are dropped), so the steps that follow compute only the
    replies still being written. `generate` keeps computing finished rows until the
    longest reply ends; here one reply that never stops costs one row, not the batch.
    Greedy (argmax) or sampled (softmax of logits / `temperature`, no top-k or top-p).
    """
    from transformers import DynamicCache

    mask = inputs["attention_mask"]
    # Left padding: a row's positions count its own tokens only, as `generate` numbers them.
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    step_ids, step_positions = inputs["input_ids"], positions
    cache = DynamicCache(config=model.config)
    stops = torch.tensor(sorted(stop_ids), device=mask.device)
    rows = torch.arange(mask.shape[0], device=mask.device)
    tokens: list[list[int]] = [[] for _ in range(mask.shape[0])]
    for _ in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions,
                       cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        chosen = _next_tokens(logits, temperature, do_sample)
        for row, token in zip(rows.tolist(), chosen.tolist(), strict=True):
            tokens[row].append(token)
        going = (~torch.isin(chosen, stops)).nonzero()[:, 0]
        if len(going) == 0:
            break
        last = step_positions[:, -1]
        if len(going) < len(rows):
            cache.batch_select_indices(going)
            rows, mask, chosen, last = rows[going], mask[going], chosen[going], last[going]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        step_ids, step_positions = chosen[:, None], (last + 1)[:, None]
    return tokens


def left_padded(tokenizer, texts: Sequence[str], device) -> dict[str, torch.Tensor]:
    """`texts` tokenized as one batch, padded on the left, on `device`."""
    # Left padding keeps every prompt's last token at the end of the row, where the first
    # new token is predicted. add_special_tokens=False: the template already has its own.
    batch = tokenizer(
        list(texts), add_special_tokens=False, padding=True, padding_side="left",
        return_tensors="pt",
    )
    return {key: value.to(device) for key, value in batch.items()}


def balanced_batches(items: Sequence, batch_size: int) -> list[list]:
    """`items` cut, in order, into the fewest batches of at most `batch_size`, of sizes that
    differ by at most one (65 prompts at 64 a batch: 33 and 32, not 64 and a lone 1, which
    would be decoded on its own for as many steps as the big one).

    >>> [len(b) for b in balanced_batches(range(65), 64)], balanced_batches("abc", 2)
    ([33, 32], [['a', 'b'], ['c']])
    """
    items = list(items)
    count = -(-len(items) // batch_size)
    size, extra = divmod(len(items), count) if count else (0, 0)
    batches, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        batches.append(items[start:end])
        start = end
    return batches


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
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Generate a reply to each prompt; one record per prompt, in the prompts' order.

    Each record holds `instruction` (the user message answered), `expected` (the item's
    `reference`, or None), `generated` (the decoded reply, special tokens dropped),
    `n_tokens` (tokens before the stop token) and `stop_reason`: "eos" when the model
    closed its turn, "max_new_tokens" when the budget cut it off. The run is seeded with
    `seed`.

    Prompts are batched by length (longest first, so each batch holds prompts of about one
    length and little left padding), at most `batch_size` at a time in `balanced_batches`:
    on a CPU a decoding step of 64 rows costs about four times one of 1 (it is bound by
    reading the weights), so big batches are the cheap way to fast evaluation, and `decode`
    drops each reply from the batch when it ends (`bench/generation.py` measures both).
    Greedy replies do not depend on the batching.

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
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    stop_ids = _stop_ids(model, tokenizer)
    seed_everything(seed)
    model.eval()
    records: list[dict] = [{} for _ in texts]
    batches = balanced_batches(order, batch_size)
    for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        inputs = left_padded(tokenizer, [texts[i] for i in batch], model.device)
        with torch.no_grad():
            new_tokens = decode(model, inputs, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                temperature=temperature, do_sample=do_sample)
        for i, tokens in zip(batch, new_tokens, strict=True):
            stop = next((k for k, t in enumerate(tokens) if t in stop_ids), None)
            kept = tokens if stop is None else tokens[:stop]
            item = eval_prompts[i]
            records[i] = {
                **{key: item[key] for key in PASSED_THROUGH if key in item},
                "instruction": chats[i][-1]["content"],
                "expected": item.get("reference"),
                "generated": tokenizer.decode(kept, skip_special_tokens=True),
                "n_tokens": len(kept),
                "stop_reason": STOP_LENGTH if stop is None else STOP_EOS,
            }
    return records


def stop_count(results: Sequence[Mapping]) -> int:
    """The number of replies in which the model closed its turn by itself."""
    return sum(r["stop_reason"] == STOP_EOS for r in results)


def stop_rate(results: Sequence[Mapping]) -> float:
    """The fraction of replies in which the model closed its turn by itself.

    >>> stop_rate([{"stop_reason": "eos"}, {"stop_reason": "max_new_tokens"}])
    0.5
    """
    if not results:
        raise ValueError("stop_rate of no results")
    return stop_count(results) / len(results)
