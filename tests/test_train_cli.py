"""`python -m sft_helpers.train`: configs are validated before any model loads, a run writes an
adapter and metrics, and two processes under `accelerate launch` end with the same adapter."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import PartialState
from safetensors.torch import load_file

from sft_helpers import train
from sft_helpers.data import DATA_DIR, SPLIT_FILES
from sft_helpers.models import load_model
from sft_helpers.train import ConfigError, adapter_digest, load_train_config, main
from sft_helpers.training import RECIPE

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
TRAIN_LINES = (DATA_DIR / SPLIT_FILES["train"]).read_text(encoding="utf-8").splitlines()
# A tiny run: 2 layers, short sequences, 2 steps of 2 examples (each well under a second).
TINY_RUN = {
    "model": {"profile": "tiny"},
    "data": {"train": "train.jsonl"},
    "lora": {"r": 4, "alpha": 8, "layers": None},  # all the tiny model's 2 layers
    "training": {"max_length": 96, "max_steps": 2, "batch_size": 2, "learning_rate": 5.0e-3},
}
LAUNCH_TIMEOUT_S = 240


def write_run(folder: Path, config: dict, name: str = "run.yaml") -> Path:
    """A config file in `folder` next to a 16-conversation train.jsonl from the course data."""
    (folder / "train.jsonl").write_text("\n".join(TRAIN_LINES[:16]) + "\n", encoding="utf-8")
    path = folder / name
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def with_changes(changes: dict) -> dict:
    """TINY_RUN with `changes` merged into its sections."""
    config = copy.deepcopy(TINY_RUN)
    for section, value in changes.items():
        if isinstance(value, dict) and isinstance(config.get(section), dict):
            config[section].update(value)
        else:
            config[section] = value
    return config


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything loads a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the config is invalid")

    monkeypatch.setattr(train, "load_model", refuse)


# --- validation ----------------------------------------------------------------------------

BAD_CONFIGS = {
    "unknown section": (
        {"modle": {"profile": "tiny"}}, ["unknown key modle", "did you mean model?"],
    ),
    "TRL's old name": (
        {"training": {"max_seq_length": 96}},
        ["unknown key training.max_seq_length", "did you mean max_length?", "'warmup_steps'"],
    ),
    "key in the wrong section": (
        {"lora": {"max_length": 96}}, ["unknown key lora.max_length", "training.max_length"],
    ),
    "zero steps": ({"training": {"max_steps": 0}},
                   ["training.max_steps must be a positive int, not 0"]),
    "steps as text": ({"training": {"max_steps": "2"}}, ["training.max_steps", "not '2'"]),
    "negative lr": ({"training": {"learning_rate": -1.0}}, ["training.learning_rate", "positive"]),
    "zero batch": ({"training": {"batch_size": 0}}, ["training.batch_size"]),
    "zero rank": ({"lora": {"r": 0}}, ["lora.r must be a positive int, not 0"]),
    "negative layer": ({"lora": {"layers": [-1]}}, ["lora.layers"]),
    "empty targets": ({"lora": {"target_modules": []}}, ["lora.target_modules"]),
    "packing as text": (
        {"training": {"packing": "yes"}}, ["training.packing must be true or false"],
    ),
    "negative warm-up": ({"training": {"warmup_steps": -1}}, ["training.warmup_steps"]),
    "int8": ({"model": {"quantization": "int8"}},
             ["model.quantization must be null or 'nf4', not 'int8'"]),
    "label mode": ({"masking": {"labels": "everything"}}, ["masking.labels", "'pad_eos'"]),
    "section not a mapping": ({"training": 5}, ["training must be a mapping"]),
    "no data": ({"data": {"train": None}}, ["data.train is required"]),
    "unknown format": ({"data": {"train": "train.jsonl", "format": "openai"}},
                       ["data.format must be null (detect it) or one of", "'sharegpt'"]),
    "wrong format": ({"data": {"train": "train.jsonl", "format": "alpaca"}},
                     ["data.train: train.jsonl line 1: a row in the alpaca format needs the field "
                      "'instruction'"]),
    "zero examples": ({"data": {"train": "train.jsonl", "max_examples": 0}},
                      ["data.max_examples"]),
    "missing data file": ({"data": {"train": "nowhere.jsonl"}},
                          ["data.train: no file 'nowhere.jsonl'"]),
    "hub id offline": ({"model": {"profile": "HuggingFaceTB/SmolLM2-360M-Instruct"}},
                       ["model.profile", "HF_HUB_OFFLINE"]),
    "unknown profile": ({"model": {"profile": "smollm"}}, ["model.profile", "unknown profile"]),
}


@pytest.mark.parametrize("changes, expected", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_a_bad_config_names_the_file_and_the_key(tmp_path, monkeypatch, no_model_load,
                                                   changes, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_run(tmp_path, with_changes(changes))
    with pytest.raises(ConfigError) as error:
        load_train_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: "), message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize("lines, expected", [
    ([TRAIN_LINES[0], "{not json"], "train.jsonl line 2: not valid JSON"),
    (['{"id": "x", "conversation": []}'],
     "train.jsonl line 1: fields ['conversation', 'id'] match no known format"),
    ([TRAIN_LINES[0].replace('"role": "assistant"', '"role": "bot"')],
     "train.jsonl line 1: message 1: unknown role 'bot'"),
    (['{"messages": [{"role": "user", "content": "Hi"}]}'],
     "train.jsonl line 1: conversation: no assistant message"),
    ([], "train.jsonl holds no rows"),
], ids=["invalid JSON", "no messages", "unknown role", "no assistant turn", "empty file"])
def test_bad_training_data_names_the_file_and_the_line(tmp_path, no_model_load, lines, expected):
    path = write_run(tmp_path, TINY_RUN)
    (tmp_path / "train.jsonl").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ConfigError, match="data.train") as error:
        load_train_config(path)
    assert expected in str(error.value)


def test_a_learning_rate_that_yaml_reads_as_text_gets_a_hint(tmp_path, no_model_load):
    path = write_run(tmp_path, TINY_RUN)
    path.write_text(path.read_text().replace("learning_rate: 0.005", "learning_rate: 3e-3"))
    with pytest.raises(ConfigError, match=r"learning_rate must be a positive number, not '3e-3' "
                                          r"\(YAML reads 3e-3 as text"):
        load_train_config(path)


def test_defaults_fill_what_the_file_leaves_out(tmp_path):
    config = load_train_config(write_run(tmp_path, TINY_RUN))
    assert config["masking"]["labels"] == "assistant"
    assert config["lora"]["layers"] is None and config["lora"]["target_modules"][0] == "q_proj"
    bare = {"model": {"profile": "tiny"}, "data": {"train": "train.jsonl"}}
    assert load_train_config(write_run(tmp_path, bare))["lora"] == RECIPE["lora"]
    assert config["training"]["warmup_steps"] == 0 and config["training"]["packing"] is False
    assert config["data"]["train"] == str((tmp_path / "train.jsonl").resolve())
    assert config["output_dir"] == str(Path("outputs") / "run")


def test_data_is_found_next_to_the_config_then_in_the_current_folder(tmp_path, monkeypatch):
    write_run(tmp_path, TINY_RUN)  # tmp_path/train.jsonl
    (tmp_path / "configs").mkdir()
    path = write_run(tmp_path / "configs", TINY_RUN)
    assert load_train_config(path)["data"]["train"] == str(tmp_path / "configs" / "train.jsonl")
    (tmp_path / "configs" / "train.jsonl").unlink()
    monkeypatch.chdir(tmp_path)
    assert load_train_config(path)["data"]["train"] == str(tmp_path / "train.jsonl")


@pytest.mark.parametrize("sample, expected", [
    ("alpaca.jsonl", "alpaca"), ("sharegpt.json", "sharegpt"),
    ("prompt_completion.csv", "prompt_completion"), ("messages.jsonl", "messages"),
])
def test_every_sample_format_is_a_valid_training_file(tmp_path, no_model_load, sample, expected):
    data = str(DATA_DIR / "samples" / sample)
    config = load_train_config(write_run(tmp_path, with_changes({"data": {"train": data}})))
    assert config["data"]["format"] is None  # detected when the run reads it
    stated = with_changes({"data": {"train": data, "format": expected}})
    assert load_train_config(write_run(tmp_path, stated))["data"]["format"] == expected


@pytest.mark.slow
def test_the_cli_trains_on_a_sharegpt_file_as_it_is(tmp_path, capsys):
    data = str(DATA_DIR / "samples" / "sharegpt.json")
    path = write_run(tmp_path, with_changes({"data": {"train": data}}))
    out = main(["--config", str(path), "--max-steps", "1", "--output-dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "data: 5 examples from " in printed and "format sharegpt (detected)" in printed
    assert trained(saved_adapter(out))


def test_course_paths_print_relative_to_the_course_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a notebook runs in notebooks/, outside the data's folder
    shipped = DATA_DIR / "samples" / "sharegpt.json"
    assert train._portable(shipped) == "sft_helpers/data/samples/sharegpt.json"
    assert train._portable(tmp_path / "run" / "out") == "run/out"


def test_the_capstone_config_is_valid(tmp_path):
    capstone = yaml.safe_load((REPO / "configs" / "capstone.yaml").read_text())
    capstone["data"]["train"] = "train.jsonl"  # the capstone's own data may not exist yet
    config = load_train_config(write_run(tmp_path, capstone, "capstone.yaml"))
    assert config["model"] == {"profile": "smollm2-135m-instruct", "quantization": "nf4"}
    assert (config["lora"]["r"], config["lora"]["alpha"]) == (8, 16)
    assert config["training"]["learning_rate"] == 3e-3


def test_the_cli_exits_2_with_the_message_before_loading(tmp_path, no_model_load, capsys):
    path = write_run(tmp_path, with_changes({"training": {"max_steps": 0}}))
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(path), "--output-dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: training.max_steps must be a positive int, not 0\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharded_training_refuses_an_nf4_base(tmp_path, monkeypatch, no_model_load, flag):
    monkeypatch.setenv(flag, "true")  # what accelerate launch sets for fsdp.yaml / zero3
    nf4 = with_changes({"model": {"quantization": "nf4"}})
    config = load_train_config(write_run(tmp_path, nf4))
    with pytest.raises(ConfigError, match="model.quantization: 'nf4' cannot be sharded"):
        train.train_from_config(config)


def test_the_cli_rejects_a_bad_override(tmp_path, no_model_load, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(write_run(tmp_path, TINY_RUN)), "--max-steps", "0"])
    assert exit_.value.code == 2
    assert "--max-steps: must be a positive int, not '0'" in capsys.readouterr().err


# --- training ------------------------------------------------------------------------------


def saved_adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter_model.safetensors")


def trained(adapter: dict[str, torch.Tensor]) -> bool:
    """PEFT starts every lora_B at zero: a non-zero one has been trained."""
    return any(t.abs().max() > 0 for name, t in adapter.items() if "lora_B" in name)


@pytest.mark.slow
def test_a_two_step_run_writes_adapter_and_metrics(tmp_path):
    path = write_run(tmp_path, with_changes({"training": {"max_steps": 5}}))
    out = main(["--config", str(path), "--max-steps", "2", "--output-dir", str(tmp_path / "out")])
    assert out == tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["training"]["max_steps"] == 2  # the override won
    assert len(metrics["loss"]) == 2 and all(math.isfinite(x) for x in metrics["loss"])
    assert metrics["loss"][0] != metrics["loss"][1]
    assert metrics["world_size"] == 1 and metrics["device"] == str(PartialState().device)
    assert metrics["train_tokens"] > 0 and metrics["train_seconds"] > 0
    assert (out / "adapter_config.json").is_file()
    assert trained(saved_adapter(out))
    assert metrics["adapter_sha256"] == [adapter_digest(saved_adapter(out))]


def test_the_digest_changes_with_any_value_name_or_dtype():
    adapter = {"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.zeros(3, 2)}
    digest = adapter_digest(adapter)
    assert adapter_digest(dict(reversed(adapter.items()))) == digest  # order does not matter
    nudged = {**adapter, "a.lora_B.weight": adapter["a.lora_B.weight"].clone()}
    nudged["a.lora_B.weight"][2, 1] = 1e-6
    renamed = {"b.lora_A.weight": adapter["a.lora_A.weight"], "a.lora_B.weight": torch.zeros(3, 2)}
    half = {name: t.half() for name, t in adapter.items()}
    transposed = {**adapter, "a.lora_B.weight": torch.zeros(2, 3)}
    assert len({digest, *map(adapter_digest, [nudged, renamed, half, transposed])}) == 5


@pytest.mark.slow
def test_two_processes_end_with_the_same_trained_adapter(tmp_path):
    """DDP on two CPU processes (gloo) with an NF4 base, as in the capstone: gradients are
    averaged, so both ranks' adapters match."""
    path = write_run(tmp_path, with_changes({"model": {"profile": "tiny", "quantization": "nf4"}}))
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"),
        "-m", "sft_helpers.train", "--config", str(path), "--max-steps", "2",
        "--output-dir", str(out),
    ]
    start = time.perf_counter()
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
        # No CUDA: the ranks then join a gloo group on the CPU, even on a machine with GPUs.
        env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""},
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2, f"{metrics['world_size']} process(es) after {seconds:.0f} s"
    rank0, rank1 = metrics["adapter_sha256"]
    assert rank0 == rank1
    assert rank0 == adapter_digest(saved_adapter(out))  # the ranks hashed what was saved
    assert trained(saved_adapter(out))
    assert len(metrics["loss"]) == 2 and all(math.isfinite(x) for x in metrics["loss"])


# --- accelerate configs --------------------------------------------------------------------


def test_every_accelerate_config_is_there():
    assert [p.name for p in ACCELERATE_CONFIGS] == [
        "cpu_2proc.yaml", "deepspeed_zero3.yaml", "fsdp.yaml", "multi_gpu_ddp.yaml",
    ]


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_loads_the_config(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(str(path))  # unknown top-level keys raise
    assert config.num_processes >= 2
    # accelerate copies fsdp_config / deepspeed_config entries onto `accelerate launch`
    # options without checking them: a misspelt key would be silently ignored.
    options = {action.dest for action in launch_command_parser()._actions}
    for key in [*config.fsdp_config, *config.deepspeed_config]:
        assert key in options, f"{path.name}: {key} is not an accelerate launch option"
    header = path.read_text().splitlines()[0]
    assert header.startswith("# ") and len(header) > 20, "the first line says what it is for"
    assert ("RUN in CI" in path.read_text()) == (path.name == "cpu_2proc.yaml")


def test_the_fsdp_config_wraps_the_llama_decoder_layer():
    from accelerate.commands.config.config_args import ClusterConfig

    fsdp = ClusterConfig.from_yaml_file(str(REPO / "configs" / "accelerate" / "fsdp.yaml"))
    layer = type(load_model("tiny")[0].model.layers[0]).__name__
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == layer
    assert fsdp.fsdp_config["fsdp_reshard_after_forward"] is True  # FSDP2's full shard
