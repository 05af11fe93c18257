"""Training with TRL: `train_sft`, a thin layer over `SFTTrainer`, and the cached course adapter.

`train_sft` tokenizes conversations with the course's own loss masking
(`sft_helpers.masking.tokenize_with_masking`: labels are -100 everywhere except the
assistant's replies and their closing <|im_end|>), hands TRL the ready `input_ids`/`labels`
columns (TRL keeps a `labels` column as is), and trains a LoRA adapter passed through
`peft_config`. Why our masks rather than TRL's `assistant_only_loss=True`: that option
needs a template with `{% generation %}` markers, which the default model's template lacks;
our masking works on any template, and notebook 03 checks that both give the same labels.

`course_adapter` trains the course's LoRA adapter (Pip, the house style) once and caches
it under `$SFT_CACHE_DIR/models/`, keyed by a hash of its configuration and of the data, so
that later notebooks load it in seconds; a corrupt cache entry is rebuilt.

    >>> path = course_adapter()                                   # doctest: +SKIP
    >>> model, tokenizer = load_course_model(path)                # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from sft_helpers.data import DATA_DIR, SPLIT_FILES, read_conversations
from sft_helpers.lora import TARGET_PRESETS
from sft_helpers.masking import IGNORE_INDEX, mask_dataset
from sft_helpers.models import DEFAULT_PROFILE, cached_entry, load_model
from sft_helpers.runtime import LIBRARY_RENAME_NOTICE, seed_everything

# The course recipe: every default of a training run, in the nested shape of a YAML config
# (configs/capstone.yaml). `train_sft`, `lora_config`, `course_adapter` and
# `python -m sft_helpers.train` all take their defaults from here. Sized for a 2-core CPU
# and chosen by measurement (bench/recipe_sweep.py, shown in notebook 03): of the settings
# it trained, 32 steps of four conversations at a constant 4e-3 with adapters in all 30
# layers gave the most held-out replies in the whole house style and the fewest loops, on
# two seeds, in about two minutes (`train_sft` makes each batch padding-free).
RECIPE: dict = {
    "model": {"profile": DEFAULT_PROFILE, "quantization": None},
    "masking": {"labels": "assistant"},
    "lora": {
        "r": 8,
        "alpha": 16,
        "target_modules": list(TARGET_PRESETS["all-linear"]),
        # All layers (None). Adapting only the top 12 stops backpropagation at layer 18, a
        # step 1.4x faster, but on two seeds its replies loop about twice as often.
        "layers": None,
    },
    "training": {
        "max_length": 192,
        "max_steps": 32,
        "batch_size": 4,
        "learning_rate": 4e-3,
        "warmup_steps": 0,
        "lr_scheduler": "constant_with_warmup",
        "packing": False,
        "seed": 0,
    },
}
_LORA, _TRAINING = RECIPE["lora"], RECIPE["training"]
# What the loss covers: the course's masking, and two mistakes kept to measure their cost.
# Learning-rate schedules (transformers' names): flat after the warm-up, or decaying to 0.
LR_SCHEDULERS = ("constant_with_warmup", "linear", "cosine")
LABEL_MODES = {
    "assistant": "assistant replies and their closing end-of-turn token (the course's masking)",
    "all": "every token, system and user turns included (no masking)",
    "pad_eos": "assistant replies, minus every token whose id is the pad id (pad == eos drops EOS)",
}
TRAINING_LOG = "training_log.json"
ADAPTER_PREFIX = "course-adapter"


def lora_config(
    r: int = _LORA["r"],
    alpha: float = _LORA["alpha"],
    target_modules: Sequence[str] = tuple(_LORA["target_modules"]),
    layers: Sequence[int] | None = _LORA["layers"],
):
    """The PEFT `LoraConfig` of the course: rank `r`, scale alpha/r, no dropout, on
    `target_modules` of the decoder layers `layers` (all layers when None). The defaults
    are `RECIPE["lora"]`.

    No dropout keeps a CPU run bit-for-bit repeatable (and a few dozen steps do not overfit).
    Adapting only the top layers saves time: backpropagation stops at the lowest adapter.

    >>> lora_config(r=4, layers=[28, 29]).layers_to_transform
    [28, 29]
    """
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules),
        layers_to_transform=None if layers is None else list(layers),
        bias="none", task_type="CAUSAL_LM",
    )


def masked_dataset(conversations: Sequence, tokenizer, max_length: int, labels: str = "assistant"):
    """A `datasets.Dataset` of `input_ids` and `labels`, built with
    `sft_helpers.masking.mask_dataset`; conversations that `max_length` leaves with no
    trained token are dropped (and counted in the printed note).

    `labels` picks what the loss covers (see `LABEL_MODES`): "assistant", the course's
    masking; or one of two classic mistakes that notebook 07 measures: "all" (every token,
    no masking) and "pad_eos" (the assistant masking, then every position whose id equals
    the pad token set to -100: with pad == eos that deletes the end-of-turn labels).

    >>> masked_dataset(chats, tokenizer, 256).column_names        # doctest: +SKIP
    ['input_ids', 'labels']
    """
    from datasets import Dataset

    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {sorted(LABEL_MODES)}, not {labels!r}")
    examples, n_dropped = mask_dataset(conversations, tokenizer, max_length)
    if not examples:
        raise ValueError(
            f"all {len(conversations)} conversations lost every assistant token to "
            f"max_length={max_length}: raise max_length"
        )
    if n_dropped:
        print(f"dropped {n_dropped} of {len(conversations)} conversations: max_length={max_length} "
              "cut away all of their assistant tokens")
    return Dataset.from_dict({
        "input_ids": [e["input_ids"].tolist() for e in examples],
        "labels": [_labels_for(e, labels, tokenizer.pad_token_id).tolist() for e in examples],
    })


def _labels_for(example: Mapping, mode: str, pad_token_id: int | None) -> torch.Tensor:
    if mode == "all":
        return example["input_ids"].clone()
    if mode == "pad_eos":
        return example["labels"].masked_fill(example["input_ids"] == pad_token_id, IGNORE_INDEX)
    return example["labels"]


def sft_config(
    output_dir: str | Path,
    *,
    max_length: int,
    max_steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int = 0,
    lr_scheduler: str = "constant_with_warmup",
    packing: bool = False,
    padding_free: bool,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
):
    """The `SFTConfig` that `train_sft` uses: today's TRL names (`max_length`, `packing`),
    a loss logged at every step, nothing saved or reported, mixed precision from `dtype`.

    `padding_free=True` (TRL's option) concatenates the conversations of a batch into one
    row, with `position_ids` that restart at 0 at each boundary, from which the model builds
    a per-conversation (block-diagonal) attention mask: no pad token is computed, and the
    loss is the one a padded batch gives (bench/training_speed.py measures both). The
    inputs come truncated to `max_length` (`masked_dataset`), which TRL requires of a
    padding-free run without packing. `packing=True` uses TRL's best-fit-decreasing
    packing, which is padding-free too.
    """
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        max_length=None if padding_free and not packing else max_length,
        packing=packing,
        padding_free=padding_free,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        learning_rate=learning_rate,
        lr_scheduler_type=lr_scheduler,
        warmup_steps=warmup_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # TRL turns activation checkpointing on by default. A 135M model's activations fit
        # easily, and recomputing them costs a third more compute and makes the backward pass
        # run through the frozen lower layers too (for their inputs' sake).
        activation_checkpointing=False,
        # Under DDP (accelerate launch) every LoRA weight gets a gradient: skip the search
        # for unused parameters (and its warning on every process).
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not progress,
    )


@contextlib.contextmanager
def _quiet_preparation():
    """Hide what says nothing to a learner: TRL's per-map dataset bars, and transformers'
    notice that `gradient_checkpointing` was renamed (TRL and PEFT still read the old name)."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", LIBRARY_RENAME_NOTICE, FutureWarning)
            yield
    finally:
        if bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _scoring(trained_positions_only: bool):
    """While training, make TRL's fused LM head score only the positions that have a label,
    on the CPU too (`trained_positions_only`), or leave TRL's own choice.

    TRL 1.16 projects through the head only the positions whose next-token label is not
    -100 on Triton devices (CUDA), and every position elsewhere, since on compiled backends
    (Neuron) a number of positions that changes with each batch would recompile the tiles.
    The CPU runs eagerly and compiles nothing, and a position without a label adds nothing
    to the loss or to a gradient: the same adapter comes out, bit for bit (a test checks
    it), from a faster step (bench/training_speed.py measures it). TRL takes that decision
    in one private function of the pinned version, `trl.trainer.utils._use_triton`, which
    this replaces for the run only (a test checks that it is there and put back)."""
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    if trained_positions_only:
        trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


# The layers whose rows PEFT trains through `trainable_token_indices` or `modules_to_save`.
EMBEDDING_LAYERS = ("embed_tokens", "lm_head")


def trains_embeddings(peft_config) -> bool:
    """Whether `peft_config` trains embedding rows: new tokens (`trainable_token_indices`) or
    a whole embedding or head matrix (`modules_to_save`).

    >>> trains_embeddings(lora_config())
    False
    """
    saved = getattr(peft_config, "modules_to_save", None) or ()
    return bool(getattr(peft_config, "trainable_token_indices", None)) or any(
        name in EMBEDDING_LAYERS for name in saved
    )


def _trainer_class(peft_config):
    """TRL's `SFTTrainer`, or, when `peft_config` trains embedding rows, a subclass whose
    loss is transformers' own (cross-entropy of the model's logits).

    TRL 1.16 computes the loss from `lm_head.weight` directly (a fused, chunked head that
    never builds the full logits). PEFT trains new rows of a tied head in a wrapper around
    it, and that weight does not hold them: TRL's path fails on the wrapper, and reading its
    weight would train the input rows only. TRL's own advice for another loss is to
    override `compute_loss`; this does, with the one `Trainer` has."""
    from transformers import Trainer
    from trl import SFTTrainer

    if not trains_embeddings(peft_config):
        return SFTTrainer

    class LogitsLossTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return LogitsLossTrainer


def train_sft(
    model,
    tokenizer,
    conversations: Sequence,
    *,
    output_dir: str | Path,
    max_length: int = _TRAINING["max_length"],
    max_steps: int = _TRAINING["max_steps"],
    batch_size: int = _TRAINING["batch_size"],
    learning_rate: float = _TRAINING["learning_rate"],
    warmup_steps: int = _TRAINING["warmup_steps"],
    lr_scheduler: str = _TRAINING["lr_scheduler"],
    packing: bool = _TRAINING["packing"],
    padding_free: bool = True,
    trained_positions_only: bool = True,
    peft_config=None,
    callbacks: Sequence = (),
    labels: str = RECIPE["masking"]["labels"],
    seed: int = _TRAINING["seed"],
    progress: bool = True,
):
    """Fine-tune `model` on `conversations` (lists of messages) with TRL's `SFTTrainer`.

    Every setting defaults to the course recipe (`RECIPE`); `train_arguments(recipe)`
    gives them all from a recipe. A batch is padding-free (`padding_free=False` pads it to
    its longest conversation instead, as TRL does by default). The LM head scores only
    the positions that have a label (`trained_positions_only=False`: every position, as
    TRL does off CUDA; the same loss, a slower step). The loss covers the
    assistant's tokens only (our masking; `labels` selects one of the mistakes in
    `LABEL_MODES` instead). `peft_config` defaults to `lora_config()`; TRL wraps the model
    with it. `callbacks` are transformers `TrainerCallback`s added to the run. Seeded: on
    the CPU two runs with the same arguments give the same loss at every step. Returns the
    trained trainer: `trainer.model` is the PEFT model, `loss_history(trainer)` the loss
    per step.

    >>> trainer = train_sft(model, tokenizer, chats, output_dir="out")  # doctest: +SKIP
    """
    from transformers.trainer_callback import PrinterCallback

    if not conversations:
        raise ValueError("no conversations to train on")
    seed_everything(seed)
    dataset = masked_dataset(conversations, tokenizer, max_length, labels)
    with _quiet_preparation():
        args = sft_config(
            output_dir, max_length=max_length, max_steps=max_steps, batch_size=batch_size,
            learning_rate=learning_rate, warmup_steps=warmup_steps, lr_scheduler=lr_scheduler,
            packing=packing, padding_free=padding_free, seed=seed,
            dtype=model.dtype, progress=progress,
        )
        peft_config = peft_config if peft_config is not None else lora_config()
        trainer = _trainer_class(peft_config)(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=list(callbacks),
        )
        if not progress:  # without a progress bar, Trainer prints every log line instead
            trainer.remove_callback(PrinterCallback)
        with _scoring(trained_positions_only):
            trainer.train()
    return trainer


def _logged(trainer, key: str) -> list:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def loss_history(trainer) -> list[float]:
    """The training loss at each logged step, in order."""
    return _logged(trainer, "loss")


def run_summary(trainer) -> dict:
    """What a finished run records: the loss per step, the seconds and tokens of the
    training loop alone (TRL's `train_runtime`: no loading, no tokenizing), and the device."""
    return {
        "loss": loss_history(trainer),
        "train_seconds": _logged(trainer, "train_runtime")[-1],
        "train_tokens": _logged(trainer, "num_tokens")[-1],
        "device": str(trainer.model.device),
    }


def step_clock():
    """A transformers `TrainerCallback` that appends the seconds of each optimizer step
    (forward, backward, update) to its `seconds` list: pass it to `train_sft(callbacks=...)`."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    return StepClock()


def steady_tokens_per_s(trainer, clock) -> float:
    """Real (non-pad) tokens trained per second, from the second step on: the first pays
    for allocating buffers, which a short timing would otherwise read as slowness.
    `clock` is the `step_clock()` the run was given."""
    cumulative = [entry["num_tokens"] for entry in trainer.state.log_history
                  if "num_tokens" in entry and "loss" in entry]
    per_step = [b - a for a, b in zip([0.0, *cumulative[:-1]], cumulative, strict=True)]
    if len(per_step) < 2 or len(clock.seconds) != len(per_step):
        raise ValueError(f"need a clock of every step and at least 2 steps; got "
                         f"{len(clock.seconds)} timed of {len(per_step)} logged")
    return sum(per_step[1:]) / sum(clock.seconds[1:])


# --- the cached course adapter ------------------------------------------------------------


def _data_digest(data_dir: Path) -> str:
    digest = hashlib.sha256()
    for split in sorted(SPLIT_FILES):
        digest.update((Path(data_dir) / SPLIT_FILES[split]).read_bytes())
    return digest.hexdigest()


def adapter_key(config: Mapping, data_dir: Path = DATA_DIR) -> str:
    """The cache key of an adapter: a hash of its recipe and of the course data files.

    >>> adapter_key(RECIPE) == adapter_key(recipe_with())
    True
    >>> adapter_key(RECIPE) == adapter_key(recipe_with(max_steps=1))
    False
    """
    payload = json.dumps({"config": dict(config), "data": _data_digest(data_dir)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def recipe_with(recipe: Mapping = RECIPE, **settings) -> dict:
    """A copy of `recipe` with each setting put in the section that holds it; the names are
    the YAML's (`layers`, `max_steps`, `labels`, ...). An unknown name raises `ValueError`.

    >>> recipe_with(profile="tiny", layers=None)["lora"]["layers"] is None
    True
    >>> recipe_with(lora_r=4)
    Traceback (most recent call last):
    ...
    ValueError: unknown recipe setting 'lora_r'; the settings are alpha, batch_size, labels, ...
    """
    config = copy.deepcopy(dict(recipe))
    sections = {key: name for name, values in RECIPE.items() for key in values}
    for key, value in settings.items():
        if key not in sections:
            raise ValueError(f"unknown recipe setting {key!r}; the settings are "
                             f"{', '.join(sorted(sections))}")
        config[sections[key]][key] = value
    return config


def train_arguments(recipe: Mapping) -> dict:
    """The keyword arguments of `train_sft` that `recipe` (in `RECIPE`'s shape) describes:
    the training section, the masking labels and the LoRA config. The one place a recipe
    becomes a run (the course adapter and the train CLI both call it).

    >>> sorted(train_arguments(RECIPE))
    ['batch_size', 'labels', 'learning_rate', 'lr_scheduler', 'max_length', 'max_steps',
     'packing', 'peft_config', 'seed', 'warmup_steps']
    """
    lora = recipe["lora"]
    return {
        **{key: recipe["training"][key] for key in _TRAINING},
        "labels": recipe["masking"]["labels"],
        "peft_config": lora_config(
            lora["r"], lora["alpha"], lora["target_modules"], lora["layers"]
        ),
    }


def train_split(model, tokenizer, arguments: Mapping, data_dir: Path, directory: Path):
    """`train_sft` on the train split of `data_dir` with `arguments` (from
    `train_arguments`), its scratch folder made and removed inside `directory` (an adapter's
    cache folder). Returns the trainer."""
    # Any well-formed conversations train (notebook 06 trains on data with planted
    # defects); the course data's own house-style rules are checked by its tests.
    train_file = Path(data_dir) / SPLIT_FILES["train"]
    conversations = [r["messages"] for r in read_conversations(train_file)]
    trainer = train_sft(model, tokenizer, conversations, output_dir=directory / "trainer",
                        **arguments)
    shutil.rmtree(directory / "trainer", ignore_errors=True)
    return trainer


def _build_adapter(config: Mapping, data_dir: Path):
    def build(directory: Path) -> None:
        model, tokenizer = load_model(config["model"]["profile"],
                                      quantization=config["model"]["quantization"])
        trainer = train_split(model, tokenizer, train_arguments(config), data_dir, directory)
        trainer.model.save_pretrained(directory)
        log = {
            "config": config,
            **run_summary(trainer),
            "dtype": str(trainer.model.dtype).removeprefix("torch."),
        }
        (directory / TRAINING_LOG).write_text(json.dumps(log, indent=1))

    return build


def course_adapter(*, retrain: bool = False, data_dir: Path = DATA_DIR, **settings) -> Path:
    """The folder of the course LoRA adapter, trained on first use and cached.

    The recipe is `RECIPE` with `settings` put in (`recipe_with`, e.g. `profile="tiny"`,
    `labels="all"`); the cache entry is `course-adapter-<key>` with `key = adapter_key(...)`,
    so a change to the recipe or the data trains a new adapter. `retrain=True` trains anew
    and replaces a cached copy. The folder holds the PEFT adapter and `training_log.json`
    (recipe, loss per step, training time).
    """
    config = recipe_with(**settings)
    name = f"{ADAPTER_PREFIX}-{adapter_key(config, data_dir)}"
    return cached_entry(name, _build_adapter(config, data_dir), rebuild=retrain)


def training_log(adapter_dir: Path) -> dict:
    """The `training_log.json` of a cached adapter: config, loss per step, time."""
    return json.loads((Path(adapter_dir) / TRAINING_LOG).read_text())


def load_course_model(adapter_dir: Path, *, merge: bool = False, device=None):
    """`(model, tokenizer)`: the adapter's base profile with the adapter loaded, in eval mode.

    `merge=True` folds the adapter into the base weights (`merge_and_unload`), giving a
    plain transformers model with no PEFT layers.
    """
    from peft import PeftModel

    profile = training_log(adapter_dir)["config"]["model"]["profile"]
    base, tokenizer = load_model(profile, device=device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", LIBRARY_RENAME_NOTICE, FutureWarning)
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return model, tokenizer

