"""Training from a config file: `python -m sft_helpers.train --config configs/capstone.yaml`.

One YAML file holds a whole run (model, data, masking, LoRA, training, output folder).
`load_train_config` reads it, fills the defaults and validates every value before any model
loads, raising one `ConfigError` that names the file and the key path:

    configs/capstone.yaml: training.max_steps must be a positive int, not 0

`train_from_config` then loads the model (NF4 when asked), trains with
`sft_helpers.training.train_sft`, saves the LoRA adapter and writes `metrics.json` (config,
loss per step, time, tokens, device, number of processes, and a SHA-256 of the trained LoRA
tensors on every rank). The same command scales out under `accelerate launch`:

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \\
        -m sft_helpers.train --config configs/capstone.yaml

Each process trains on its own share of every batch and DDP averages the gradients, so
every rank ends with the same adapter: the per-rank digests in `metrics.json` prove it.

    >>> config = load_train_config("configs/capstone.yaml")      # doctest: +SKIP
    >>> train_from_config(config)                                 # doctest: +SKIP
    PosixPath('outputs/capstone')
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from sft_helpers.course import COURSE_ROOT
from sft_helpers.formats import FORMATS, read_examples
from sft_helpers.models import (
    DEFAULT_PROFILE,
    GGUF_PACKAGE,
    OFFLINE_PROFILES,
    QUANTIZATIONS,
    OfflineError,
    display_path,
    load_model,
    resolve_profile,
)
from sft_helpers.training import (
    LABEL_MODES,
    LR_SCHEDULERS,
    RECIPE,
    run_summary,
    train_arguments,
    train_sft,
)

METRICS_FILE = "metrics.json"
# Where a run writes when the config names no output_dir: outputs/<config file's stem>
# (the repository ignores outputs/).
OUTPUT_ROOT = "outputs"
# Every setting, by section, with its default: the course recipe (`training.RECIPE`), plus
# the data to train on (data.train is required) and where to write.
DEFAULTS: dict = {
    "model": RECIPE["model"],
    "data": {"train": None, "format": None, "max_examples": None},
    "masking": RECIPE["masking"],
    "lora": RECIPE["lora"],
    "training": RECIPE["training"],
    "output_dir": None,
}
REQUIRED = ("data.train",)
# Names that other tools use for our settings (TRL's and PEFT's arguments, other trainers'
# config files): an unknown key among these gets the right name, even where the spelling is
# far from it.
RENAMED = {
    "max_seq_length": "max_length",
    "per_device_train_batch_size": "batch_size",
    "lr": "learning_rate",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_layers": "layers",
    "layers_to_transform": "layers",
    "num_steps": "max_steps",
}
# Distributed modes that shard the weights: they cannot flatten load_model's NF4 weights
# (stored as uint8 next to float parameters; QLoRA there needs bnb_4bit_quant_storage set to
# the compute dtype), so such a run must load the base model unquantized.
SHARDED_MODES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}
EXIT_CONFIG_ERROR = 2


class ConfigError(ValueError):
    """A training config that cannot run; the message names the file and the key path."""


# --- value checks: each returns True when the value is acceptable --------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value) -> bool:
    return _is_int(value) and value > 0


def _non_negative_int(value) -> bool:
    return _is_int(value) and value >= 0


def _positive_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value) and value > 0


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _optional(check: Callable) -> Callable:
    return lambda value: value is None or check(value)


def _one_of(options) -> Callable:
    return lambda value: isinstance(value, str | type(None)) and value in options


def _non_empty_list_of(check: Callable) -> Callable:
    return lambda value: isinstance(value, list) and bool(value) and all(map(check, value))


# The rule of every setting: (check, what the value must be).
RULES: dict[str, tuple[Callable, str]] = {
    "model.profile": (_text, "a profile name or a Hugging Face Hub id"),
    "model.quantization": (_one_of(QUANTIZATIONS), "null or 'nf4'"),
    "data.train": (_text, "the path of a .jsonl, .json or .csv file of training examples"),
    "data.format": (_optional(_one_of(FORMATS)), f"null (detect it) or one of {list(FORMATS)}"),
    "data.max_examples": (_optional(_positive_int), "null or a positive int"),
    "masking.labels": (_one_of(LABEL_MODES), f"one of {sorted(LABEL_MODES)}"),
    "lora.r": (_positive_int, "a positive int"),
    "lora.alpha": (_positive_number, "a positive number"),
    "lora.target_modules": (_non_empty_list_of(_text), "a non-empty list of module names"),
    "lora.layers": (_optional(_non_empty_list_of(_non_negative_int)),
                    "null (every layer) or a non-empty list of layer indices >= 0"),
    "training.max_length": (_positive_int, "a positive int"),
    "training.max_steps": (_positive_int, "a positive int"),
    "training.batch_size": (_positive_int, "a positive int"),
    "training.learning_rate": (_positive_number, "a positive number"),
    "training.warmup_steps": (_non_negative_int, "an int >= 0"),
    "training.lr_scheduler": (_one_of(LR_SCHEDULERS), f"one of {list(LR_SCHEDULERS)}"),
    "training.packing": (lambda value: isinstance(value, bool), "true or false"),
    "training.seed": (_non_negative_int, "an int >= 0"),
    "output_dir": (_optional(_text), "a folder path"),
}


# --- reading and validating ----------------------------------------------------------------


def _suggestion(key: str, section: str | None) -> str:
    """' (did you mean max_length?)' for a near-miss of a valid key, else ''."""
    valid = list(DEFAULTS[section]) if section else list(DEFAULTS)
    name = RENAMED.get(key)
    if name is None or name not in valid:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        name = close[0] if close else None
    if name is None:  # the right name in the wrong section?
        for other, settings in DEFAULTS.items():
            target = RENAMED.get(key, key)
            if other != section and isinstance(settings, dict) and target in settings:
                return f" (did you mean {other}.{target}?)"
        return ""
    return f" (did you mean {name}?)"


def _check_keys(raw: Mapping, section: str | None, where: str) -> None:
    valid = DEFAULTS[section] if section else DEFAULTS
    for key in raw:
        if key not in valid:
            path = f"{section}.{key}" if section else str(key)
            scope = f"section {section!r}" if section else "the top level"
            raise ConfigError(
                f"{where}: unknown key {path}{_suggestion(str(key), section)}; "
                f"the keys of {scope} are {sorted(valid)}"
            )


def _merged(raw, where: str) -> dict:
    """The defaults updated with `raw` (the parsed YAML), after checking every key exists."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a mapping of sections {sorted(DEFAULTS)}, "
                          f"not {type(raw).__name__}")
    _check_keys(raw, None, where)
    config = copy.deepcopy(DEFAULTS)
    for section, value in raw.items():
        if not isinstance(DEFAULTS[section], dict):
            config[section] = value
            continue
        if value is None:  # an empty section: all defaults
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {section} must be a mapping of "
                              f"{sorted(DEFAULTS[section])}, not {value!r}")
        _check_keys(value, section, where)
        config[section].update(value)
    return config


def _get(config: Mapping, path: str):
    section, _, key = path.partition(".")
    return config[section][key] if key else config[section]


def _check_values(config: Mapping, where: str) -> None:
    for path in REQUIRED:
        if _get(config, path) is None:
            raise ConfigError(f"{where}: {path} is required ({RULES[path][1]})")
    for path, (check, expected) in RULES.items():
        value = _get(config, path)
        if not check(value):
            hint = ""
            if isinstance(value, str) and _positive_number(_as_float(value)):
                hint = f" (YAML reads {value} as text: write it with a decimal point, e.g. 3.0e-3)"
            raise ConfigError(f"{where}: {path} must be {expected}, not {value!r}{hint}")


def _as_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _check_profile(profile: str, where: str) -> None:
    """Fail now, not after minutes, when `profile` cannot load here (offline Hub id, typo)."""
    if profile in OFFLINE_PROFILES and (
        profile != DEFAULT_PROFILE or importlib.util.find_spec(GGUF_PACKAGE) is not None
    ):
        return  # loads offline; resolving it here would build its cache (a model load)
    try:
        resolve_profile(profile)
    except (OfflineError, ValueError, FileNotFoundError) as error:
        raise ConfigError(f"{where}: model.profile: {error}") from error


def _find_data(name: str, config_file: Path, where: str) -> Path:
    candidates = [config_file.parent / name, Path.cwd() / name]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    tried = ", ".join(display_path(p) for p in candidates)
    raise ConfigError(f"{where}: data.train: no file {name!r} (looked for {tried})")


def load_train_config(
    path: str | Path, *, output_dir: str | Path | None = None, max_steps: int | None = None
) -> dict:
    """The validated config of `path` (YAML), defaults filled, paths resolved.

    `output_dir` and `max_steps` override the file's values (the CLI's `--output-dir` and
    `--max-steps`). Nothing loads a model here; every problem raises `ConfigError` naming
    the file and the key path. `data.train` is looked up next to the config file, then in
    the current folder (the repository root when run as documented); a relative
    `output_dir` is relative to the current folder, and defaults to `outputs/<config stem>`.

    >>> load_train_config("configs/capstone.yaml")["training"]["max_steps"]  # doctest: +SKIP
    24
    >>> load_train_config("bad.yaml")                              # doctest: +SKIP
    ConfigError: bad.yaml: unknown key training.max_seq_length (did you mean max_length?); ...
    """
    import yaml

    config_file = Path(path)
    where = str(path)
    try:
        raw = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{where}: cannot read the config file ({error.strerror})") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML ({error})") from error
    config = _merged(raw, where)
    if output_dir is not None:
        config["output_dir"] = str(output_dir)
    if max_steps is not None:
        config["training"]["max_steps"] = max_steps
    _check_values(config, where)
    _check_profile(config["model"]["profile"], where)
    train = _find_data(config["data"]["train"], config_file, where)
    try:
        read_examples(train, config["data"]["format"])
    except ValueError as error:
        raise ConfigError(f"{where}: data.train: {error}") from error
    config["data"]["train"] = str(train)
    config["output_dir"] = str(Path(config["output_dir"] or Path(OUTPUT_ROOT) / config_file.stem))
    return config


# --- training ------------------------------------------------------------------------------


def _process_state():
    """accelerate's view of this process (rank, number of processes, device).

    `accelerate launch` starts several processes through torchrun, which tells none of them
    to use the CPU; on a machine without CUDA the Trainer would then run each rank alone.
    ACCELERATE_USE_CPU (what accelerate's own CPU launcher sets) makes them join one gloo
    process group instead.
    """
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    return PartialState(cpu=cpu)


def _check_sharding(config: Mapping) -> None:
    modes = [name for flag, name in SHARDED_MODES.items()
             if os.environ.get(flag, "").lower() in {"1", "true"}]
    if modes and config["model"]["quantization"] == "nf4":
        raise ConfigError(
            f"model.quantization: 'nf4' cannot be sharded by {modes[0]} here: use "
            "quantization: null with this launcher, or configs/accelerate/multi_gpu_ddp.yaml"
        )


def adapter_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors (name, shape, dtype and bytes, in name order), such as a
    LoRA adapter's state dict: equal for two ranks exactly when their adapters are
    bit-for-bit the same, and equal to the digest of the saved `adapter_model.safetensors`.

    >>> adapter_digest({"w": torch.zeros(2)}) == adapter_digest({"w": torch.zeros(2)})
    True
    >>> adapter_digest({"w": torch.zeros(2)}) == adapter_digest({"w": torch.zeros(2).half()})
    False
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _portable(path: str | Path) -> str:
    """`path` relative to the current folder when inside it, else to the course folder (a
    notebook runs in notebooks/), else with `~` for the home folder: what the run prints
    and records carries no machine's paths."""
    path = Path(path).resolve()
    for base in (Path.cwd(), COURSE_ROOT):
        if path.is_relative_to(base):
            return str(path.relative_to(base))
    return display_path(path)


def train_from_config(config: Mapping) -> Path:
    """Train the run that `config` (from `load_train_config`) describes; return its
    `output_dir`, which then holds the LoRA adapter and `metrics.json`.

    Under several processes every rank trains (DDP) and only the main process writes files;
    `metrics.json` lists each rank's `adapter_digest`, all equal after a correct run.
    """
    from accelerate.utils import gather_object
    from peft import get_peft_model_state_dict

    _check_sharding(config)
    state = _process_state()
    output_dir = Path(config["output_dir"])
    records, report = read_examples(Path(config["data"]["train"]), config["data"]["format"])
    records = records[: config["data"]["max_examples"]]
    if state.is_main_process:
        how = "detected" if report["detected"] else "as configured"
        print(f"data: {report['kept']} examples from {_portable(config['data']['train'])}, "
              f"format {report['format']} ({how})", flush=True)
    model, tokenizer = load_model(
        config["model"]["profile"], quantization=config["model"]["quantization"],
        device=state.device,
    )
    trainer = train_sft(
        model, tokenizer, [r["messages"] for r in records], output_dir=output_dir / "trainer",
        progress=state.is_main_process, **train_arguments(config),
    )
    # What save_pretrained writes: the LoRA tensors, named without the adapter name.
    # One digest per rank, in rank order (a one-item list in a single process).
    digests = gather_object([adapter_digest(get_peft_model_state_dict(trainer.model))])
    # Every rank calls save_model: under FSDP or ZeRO-3 it gathers the sharded adapter;
    # only the main process writes (the adapter, tokenizer and training arguments).
    trainer.save_model(str(output_dir))
    if state.is_main_process:
        shutil.rmtree(output_dir / "trainer", ignore_errors=True)  # save_strategy "no": empty
        metrics = {
            "config": {**config, "data": {**config["data"],
                                          "train": _portable(config["data"]["train"])},
                       "output_dir": _portable(output_dir)},
            **run_summary(trainer),
            "world_size": state.num_processes,
            "adapter_sha256": digests,
        }
        (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
        print(f"adapter and {METRICS_FILE} written to {_portable(output_dir)}", flush=True)
    state.wait_for_everyone()
    return output_dir


# --- command line --------------------------------------------------------------------------


def _positive_int_arg(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive int, not {text!r}")
    return value


def main(argv: list[str] | None = None) -> Path:
    """`python -m sft_helpers.train --config FILE [--output-dir DIR] [--max-steps N]`.

    A config problem prints its message and exits with status 2 before any model loads.
    """
    parser = argparse.ArgumentParser(
        prog="python -m sft_helpers.train",
        description="Fine-tune a LoRA adapter from a YAML training config.",
    )
    parser.add_argument("--config", required=True, help="the YAML training config")
    parser.add_argument("--output-dir", help="override the config's output_dir")
    parser.add_argument("--max-steps", type=_positive_int_arg,
                        help="override training.max_steps")
    args = parser.parse_args(argv)
    try:
        config = load_train_config(args.config, output_dir=args.output_dir,
                                   max_steps=args.max_steps)
        output_dir = train_from_config(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None
    _end_process_group()
    return output_dir


def _end_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
