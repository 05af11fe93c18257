"""Architectures of real models, shipped as their public `config.json`, for exact counts offline.

Each bundled file in `sft_helpers/data/architectures/` holds the Hub id it was copied from and
that model's config. A config is all it takes to count parameters (`sft_helpers.lora`) or to
build the model on PyTorch's `meta` device: every tensor has a shape and a dtype but no
storage, so even a 70B model is "built" in seconds with no weights and no download.

    >>> load_config("llama-3-8b").num_key_value_heads
    8
    >>> meta_model("smollm2-135m").num_parameters()
    134515008
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

DATA_DIR = Path(__file__).parent / "data" / "architectures"
ARCHITECTURES: tuple[str, ...] = (
    "llama-3-8b",
    "llama-3-70b",
    "mistral-7b",
    "qwen2.5-7b",
    "gemma-2-9b",
    "smollm2-135m",
)


def _bundled(name: str) -> dict:
    return json.loads((DATA_DIR / f"{name}.json").read_text())


def hub_id(name: str) -> str:
    """The Hugging Face Hub id whose `config.json` the bundled architecture `name` copies.

    >>> hub_id("mistral-7b")
    'mistralai/Mistral-7B-v0.1'
    """
    _check_name(name)
    return _bundled(name)["hub_id"]


def _check_name(name: str) -> None:
    if name not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {name!r}: give one of {', '.join(ARCHITECTURES)} "
            "or the path of a config.json"
        )


def config_from_dict(values: dict) -> PretrainedConfig:
    """The transformers config class of `values["model_type"]`, filled with `values`.

    >>> config_from_dict({"model_type": "llama", "hidden_size": 64}).hidden_size
    64
    """
    if "model_type" not in values:
        raise ValueError("a config needs a 'model_type' (e.g. 'llama') to pick its class")
    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def load_config(name_or_path: str | Path) -> PretrainedConfig:
    """The config of a bundled architecture (see `ARCHITECTURES`) or of a `config.json` file.

    A folder that holds a `config.json` works too. Nothing is downloaded.

    >>> load_config("qwen2.5-7b").hidden_size
    3584
    """
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return config_from_dict(json.loads(path.read_text()))
    _check_name(str(name_or_path))
    return config_from_dict(_bundled(str(name_or_path))["config"])


def meta_model(name_or_config: str | Path | PretrainedConfig) -> torch.nn.Module:
    """The causal LM of a config, built on the `meta` device: shapes and dtypes, no weights.

    >>> meta_model("llama-3-8b").model.layers[0].self_attn.k_proj.weight.shape
    torch.Size([1024, 4096])
    """
    config = (
        name_or_config
        if isinstance(name_or_config, PretrainedConfig)
        else load_config(name_or_config)
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
