"""New special tokens: giving a model a chat template it has never seen.

A base-to-chat fine-tune often starts from a model whose vocabulary lacks the template's
tokens (Llama-3-style headers, an end-of-turn token of its own). The route by hand:
add the tokens as special tokens, set the template and the new end token, resize the
embeddings, and train the new rows. TRL's `clone_chat_template` does the same from a
tokenizer that carries the template (`template_release` writes one).

Training the new rows costs little with PEFT's `trainable_token_indices` (the rows
alone) and a lot with `modules_to_save` (a trainable copy of the whole matrix):
`new_token_parameters` counts both. A model whose new rows were left untrained never
emits its new end token; `closing_tokens` measures which token closed each reply.

    >>> new_ids = add_template(model, tokenizer, "llama3")         # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from sft_helpers.data import DATA_DIR
from sft_helpers.generation import decode, left_padded, prompt_messages
from sft_helpers.memory import FLOAT32_BYTES, OPTIMIZER_STATES
from sft_helpers.models import cached_entry, load_model
from sft_helpers.runtime import LIBRARY_RENAME_NOTICE
from sft_helpers.templates import TEMPLATE_TOKENS, TEMPLATES
from sft_helpers.training import (
    TRAINING_LOG,
    adapter_key,
    loss_history,
    recipe_with,
    train_arguments,
    train_split,
    training_log,
)

# The template the course gives the default model: Llama 3's, whose four tokens the
# default (ChatML) model has never seen.
NEW_TEMPLATE = "llama3"
# How a reply ended: with the new end-of-turn token, with the model's old one, or not at all.
CLOSINGS = ("new", "old", "none")
# Bytes per trained float32 parameter with AdamW: the weight, its gradient, two moments.
TRAINED_BYTES = FLOAT32_BYTES * (2 + OPTIMIZER_STATES["adamw"])
ROUTES = ("trainable_token_indices", "modules_to_save")


def _new_tokens(tokenizer, template: str) -> list[str]:
    if template not in TEMPLATE_TOKENS:
        raise ValueError(f"unknown template {template!r}: use one of {sorted(TEMPLATE_TOKENS)}")
    vocab = tokenizer.get_vocab()
    return [token for token in TEMPLATE_TOKENS[template]["added"] if token not in vocab]


def retemplate_tokenizer(tokenizer, template: str = NEW_TEMPLATE) -> list[int]:
    """Give `tokenizer` the shipped `template`: its tokens the vocabulary lacks are added as
    special tokens, its BOS and end-of-turn tokens set, the chat template replaced. Returns
    the ids of the added tokens (new ids at the end of the vocabulary)."""
    added = _new_tokens(tokenizer, template)
    spec = TEMPLATE_TOKENS[template]
    tokenizer.add_tokens(added, special_tokens=True)
    tokenizer.chat_template = TEMPLATES[template]
    tokenizer.bos_token = spec["bos_token"] or None
    tokenizer.eos_token = spec["eos_token"]
    return tokenizer.convert_tokens_to_ids(added)


def add_template(model, tokenizer, template: str = NEW_TEMPLATE) -> list[int]:
    """The route by hand: `retemplate_tokenizer`, then the embedding (and the tied head)
    resized to the new vocabulary and the model's end token pointed at the new one, so
    that generation stops there. Returns the ids of the added tokens.

    `resize_token_embeddings` starts each new row from a normal distribution with the old
    rows' mean and covariance: a row that says nothing in particular until it is trained.
    """
    new_ids = retemplate_tokenizer(tokenizer, template)
    model.resize_token_embeddings(len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return new_ids


def template_release(tokenizer, folder: Path, template: str = NEW_TEMPLATE) -> Path:
    """Save a copy of `tokenizer` that carries `template` and its tokens, as a model release
    ships them (tokenizer files with the chat template): what `clone_chat_template` copies
    from. `tokenizer` itself is left as it was."""
    release = copy.deepcopy(tokenizer)
    retemplate_tokenizer(release, template)
    release.save_pretrained(folder)
    return Path(folder)


def new_token_parameters(config, n_new: int, route: str) -> int:
    """Trainable parameters that training `n_new` new tokens adds to a LoRA run.

    `trainable_token_indices` trains the new rows alone (n_new x hidden); with tied
    embeddings the head reads the same rows, so they count once. `modules_to_save` trains a
    copy of the whole embedding matrix (vocabulary x hidden, the new rows included), and of
    the head too when it is not tied.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, not {route!r}")
    hidden = config.hidden_size
    matrices = 1 if config.tie_word_embeddings else 2
    if route == "trainable_token_indices":
        return matrices * n_new * hidden
    return matrices * config.vocab_size * hidden


def closing_tokens(
    model, tokenizer, prompts: Sequence[Mapping], *, old_end: int, max_new_tokens: int = 64,
    batch_size: int = 32,
) -> list[dict]:
    """Greedy replies to `prompts` (items as `evaluate_sft_model` takes them), each with
    `closing`: "new" when the model closed it with the tokenizer's end-of-turn token, "old"
    when with `old_end` (the token its old template ended a turn with), "none" when
    `max_new_tokens` ran out first. `text` is the reply with its special tokens kept."""
    stops = {tokenizer.eos_token_id, old_end}
    texts = [
        tokenizer.apply_chat_template(prompt_messages(item, i), tokenize=False,
                                      add_generation_prompt=True)
        for i, item in enumerate(prompts)
    ]
    records = []
    model.eval()
    for start in range(0, len(texts), batch_size):
        inputs = left_padded(tokenizer, texts[start:start + batch_size], model.device)
        with torch.no_grad():
            replies = decode(model, inputs, max_new_tokens=max_new_tokens, stop_ids=stops)
        for tokens in replies:
            last = tokens[-1]
            closing = ("new" if last == tokenizer.eos_token_id
                       else "old" if last == old_end else "none")
            records.append({"closing": closing, "text": tokenizer.decode(tokens)})
    return records


# --- the cached adapter that learns the new template ------------------------------------
ADAPTER_PREFIX = "template-adapter"
# The prompt whose next-token logits the build records, to check a reload against.
PROBE = [{"role": "user", "content": "Name a primary colour."}]
PROBE_LOGITS = "probe_logits.pt"


def template_config(*, train_rows: bool, max_steps: int = 16, **settings) -> dict:
    """The course recipe (`training.RECIPE`) with `max_steps` and `settings` put in
    (`recipe_with`), for an adapter that learns `NEW_TEMPLATE`; `train_rows` says whether
    the new tokens' rows train too (`trainable_token_indices`) or stay as the resize left
    them."""
    config = recipe_with(max_steps=max_steps, **settings)
    return {**config, "template": NEW_TEMPLATE, "train_rows": train_rows}


def probe_logits(model, tokenizer) -> torch.Tensor:
    """The next-token logits after `PROBE`, rendered with the tokenizer's template."""
    ids = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits[0, -1].float().cpu()


def _build_template_adapter(config: Mapping, data_dir: Path):
    def build(directory: Path) -> None:
        model, tokenizer = load_model(config["model"]["profile"])
        new_ids = add_template(model, tokenizer, config["template"])
        arguments = train_arguments(config)
        if config["train_rows"]:
            arguments["peft_config"].trainable_token_indices = new_ids
        trainer = train_split(model, tokenizer, arguments, data_dir, directory)
        # The adapter holds LoRA and the trained rows only; the resized vocabulary travels
        # as the tokenizer saved beside it (save_embedding_layers=False: without it PEFT
        # would add the whole 28M-parameter embedding whenever the vocabulary grew).
        trainer.model.save_pretrained(directory, save_embedding_layers=False)
        tokenizer.save_pretrained(directory)
        torch.save(probe_logits(trainer.model, tokenizer), directory / PROBE_LOGITS)
        summary = {"config": config, "new_ids": new_ids, "loss": loss_history(trainer)}
        (directory / TRAINING_LOG).write_text(json.dumps(summary, indent=1))

    return build


def template_adapter(*, train_rows: bool, max_steps: int = 16, data_dir: Path = DATA_DIR,
                     **settings) -> Path:
    """The folder of an adapter trained on the course conversations rendered with
    `NEW_TEMPLATE`, trained on first use and cached (keyed by `template_config` and the
    data, as the course adapter is). It holds the PEFT adapter, the tokenizer with the new
    tokens, the logits of `PROBE` at the end of training and `training_log.json`.
    `settings` go into the recipe (`recipe_with`: `profile="tiny"`, `layers=None`, ...)."""
    config = template_config(train_rows=train_rows, max_steps=max_steps, **settings)
    name = f"{ADAPTER_PREFIX}-{adapter_key(config, data_dir)}"
    return cached_entry(name, _build_template_adapter(config, data_dir))


def load_template_model(adapter_dir: Path):
    """`(model, tokenizer)` from a `template_adapter` folder, the right way round: the
    tokenizer saved with the adapter (new tokens, template, end token), the base model
    resized to that tokenizer's vocabulary, then the adapter loaded onto it."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    log = training_log(adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base, _ = load_model(log["config"]["model"]["profile"])
    base.resize_token_embeddings(len(tokenizer))
    base.generation_config.eos_token_id = base.config.eos_token_id = tokenizer.eos_token_id
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", LIBRARY_RENAME_NOTICE, FutureWarning)
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model, tokenizer
