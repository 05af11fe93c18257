"""`train_sft` trains what the masks say, repeatably; the course adapter is cached and rebuilt."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from sft_helpers import training
from sft_helpers.data import DATA_DIR, SPLIT_FILES, read_split, write_jsonl
from sft_helpers.masking import IGNORE_INDEX, tokenize_with_masking
from sft_helpers.models import load_model
from sft_helpers.templates import with_generation_markers
from sft_helpers.training import (
    adapter_key,
    course_adapter,
    load_course_model,
    lora_config,
    loss_history,
    masked_dataset,
    recipe_with,
    train_arguments,
    train_sft,
    training_log,
)

CONVERSATIONS = [r["messages"] for r in read_split("train")]
# Small enough that a tiny-model step takes well under a second.
FAST = {"max_length": 96, "max_steps": 3, "batch_size": 2, "learning_rate": 5e-3}
# The tiny model has 2 layers: adapt them all, as the course recipe does with its 30.
ALL_LAYERS = {"layers": None}
TINY_ADAPTER = {"profile": "tiny", "max_length": 96, "max_steps": 2, "batch_size": 2, **ALL_LAYERS}


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def train_tiny(tmp_path, **kwargs):
    model, tokenizer = load_model("tiny")
    settings = {**FAST, **kwargs}
    return train_sft(model, tokenizer, CONVERSATIONS[:16], output_dir=tmp_path, progress=False,
                     peft_config=lora_config(**ALL_LAYERS), **settings)


def test_masked_dataset_holds_the_masking_helpers_labels(tiny):
    _, tokenizer = tiny
    dataset = masked_dataset(CONVERSATIONS[:4], tokenizer, 256)
    assert dataset.column_names == ["input_ids", "labels"]
    for row, conversation in zip(dataset, CONVERSATIONS[:4], strict=True):
        expected = tokenize_with_masking(conversation, tokenizer, 256)
        assert row["input_ids"] == expected["input_ids"].tolist()
        assert row["labels"] == expected["labels"].tolist()
        assert any(label != IGNORE_INDEX for label in row["labels"])


def test_label_modes_all_and_pad_eos_are_the_two_mistakes(tiny):
    _, tokenizer = tiny
    ours = masked_dataset(CONVERSATIONS[:4], tokenizer, 256)
    everything = masked_dataset(CONVERSATIONS[:4], tokenizer, 256, labels="all")
    pad_eos = masked_dataset(CONVERSATIONS[:4], tokenizer, 256, labels="pad_eos")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the premise of the mistake
    assert everything["labels"] == everything["input_ids"]
    for ids, good, bad in zip(ours["input_ids"], ours["labels"], pad_eos["labels"], strict=True):
        eos = tokenizer.eos_token_id
        trained_eos = [i for i, (t, y) in enumerate(zip(ids, good, strict=True)) if y == t == eos]
        assert trained_eos, "the course masking trains each reply's closing <|im_end|>"
        assert all(bad[i] == IGNORE_INDEX for i in trained_eos)  # ... the mistake drops them
        kept = [i for i, y in enumerate(good) if y != IGNORE_INDEX and i not in trained_eos]
        assert [bad[i] for i in kept] == [good[i] for i in kept]  # and nothing else
    with pytest.raises(ValueError, match="labels must be one of"):
        masked_dataset(CONVERSATIONS[:4], tokenizer, 256, labels="assistant_only")


def test_masked_dataset_drops_all_masked_examples_and_refuses_an_empty_result(tiny, capsys):
    _, tokenizer = tiny
    lengths = [len(tokenize_with_masking(c, tokenizer)["input_ids"]) for c in CONVERSATIONS[:8]]
    first_labels = [int((tokenize_with_masking(c, tokenizer)["labels"] != IGNORE_INDEX)
                        .nonzero()[0]) for c in CONVERSATIONS[:8]]
    cut = sorted(first_labels)[4]  # at this length, the 4 latest-starting replies are gone
    dataset = masked_dataset(CONVERSATIONS[:8], tokenizer, cut)
    dropped = sum(start >= cut for start in first_labels)
    assert dataset.num_rows == 8 - dropped and dropped > 0
    assert f"dropped {dropped} of 8 conversations" in capsys.readouterr().out
    assert max(map(len, dataset["input_ids"])) <= cut < max(lengths)
    with pytest.raises(ValueError, match="max_length=5"):
        masked_dataset(CONVERSATIONS[:8], tokenizer, 5)


def test_trl_assistant_only_loss_gives_the_same_labels_as_our_masking(tiny, tmp_path):
    # The library route: a template with {% generation %} markers + assistant_only_loss.
    model, tokenizer = tiny
    marked = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    marked.chat_template = with_generation_markers(tokenizer.chat_template)
    conversations = CONVERSATIONS[:24]
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_length=512,
                       bf16=False, report_to="none"),
        train_dataset=Dataset.from_dict({"messages": conversations}),
        processing_class=marked,
    )
    ours = masked_dataset(conversations, tokenizer, 512)
    assert list(trainer.train_dataset["input_ids"]) == list(ours["input_ids"])
    assert list(trainer.train_dataset["labels"]) == list(ours["labels"])


@pytest.mark.slow
def test_two_runs_give_the_same_loss_curve(tmp_path):
    first = loss_history(train_tiny(tmp_path / "a"))
    second = loss_history(train_tiny(tmp_path / "b"))
    assert len(first) == FAST["max_steps"] and all(torch.isfinite(torch.tensor(first)))
    assert first == second
    other_seed = loss_history(train_tiny(tmp_path / "c", seed=1))
    assert other_seed != first


@pytest.mark.slow
def test_train_sft_trains_the_lora_adapter_only(tmp_path):
    model, tokenizer = load_model("tiny")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = train_sft(model, tokenizer, CONVERSATIONS[:16], output_dir=tmp_path,
                        progress=False, peft_config=lora_config(r=4, **ALL_LAYERS), **FAST)
    peft_model = trainer.model
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert trainable == set(lora) and lora
    assert all(p.shape[0] == 4 for n, p in lora.items() if "lora_A" in n)
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # B moved off 0
    for name, param in peft_model.named_parameters():
        if "lora_" not in name:
            base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param, before[base_name]), name


@pytest.mark.slow
def test_packing_concatenates_with_per_sequence_positions(tmp_path):
    trainer = train_tiny(tmp_path, packing=True, max_steps=1)
    assert trainer.padding_free
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    positions = batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten()
    assert len(starts) >= 2  # several conversations share the row...
    for start, end in zip(starts.tolist(), starts.tolist()[1:] + [len(positions)], strict=True):
        # ...and each one's positions count from 0, which marks where attention must stop.
        assert positions[start:end].tolist() == list(range(end - start))
    assert all(torch.isfinite(torch.tensor(loss_history(trainer))))


def test_padding_free_batches_have_no_pads_and_the_padded_loss(tmp_path):
    padded = train_tiny(tmp_path / "padded", padding_free=False, batch_size=4)
    free = train_tiny(tmp_path / "free", batch_size=4)
    rows = next(iter(free.get_train_dataloader()))
    assert rows["input_ids"].shape[0] == 1 and "attention_mask" not in rows
    assert (rows["position_ids"][0] == 0).sum() == 4  # four conversations, one row, no pads
    padded_rows = next(iter(padded.get_train_dataloader()))
    assert padded_rows["input_ids"].shape[0] == 4
    assert padded_rows["attention_mask"].sum() == rows["input_ids"].shape[1]  # the same tokens
    assert loss_history(free) == pytest.approx(loss_history(padded), abs=1e-4)


@pytest.mark.slow
def test_scoring_only_trained_positions_gives_the_same_adapter(tmp_path, monkeypatch):
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    apply = trl_utils._ChunkedLogProbFunction.apply
    scored = []

    def spy(hidden, *args):
        scored.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy)
    every = train_tiny(tmp_path / "every", trained_positions_only=False)
    every_rows, scored[:] = list(scored), []
    trained = train_tiny(tmp_path / "trained")
    assert trl_utils._use_triton is original  # put back after the run
    labels = [int((row["labels"][:, 1:] != IGNORE_INDEX).sum()) for row in
              trained.get_train_dataloader()][: FAST["max_steps"]]
    assert scored == labels and all(s < e for s, e in zip(scored, every_rows, strict=True))
    assert loss_history(trained) == loss_history(every)
    weights = {n: p for n, p in every.model.named_parameters() if p.requires_grad}
    for name, param in trained.model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, weights[name]), name


def test_makefile_exports_the_allocator_settings_the_training_bench_reads():
    import importlib.util

    path = DATA_DIR.parents[1] / "bench" / "training_speed.py"
    spec = importlib.util.spec_from_file_location("training_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    settings = bench.allocator_settings()
    assert set(settings) == {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}
    assert all(int(value) >= 2**30 for value in settings.values())


def test_adapter_key_follows_config_and_data(tmp_path):
    config = training.RECIPE
    assert adapter_key(config) == adapter_key(recipe_with())
    assert adapter_key(config) != adapter_key(recipe_with(learning_rate=1e-3))
    for split in SPLIT_FILES.values():
        shutil.copy(DATA_DIR / split, tmp_path / split)
    assert adapter_key(config, tmp_path) == adapter_key(config)
    with open(tmp_path / SPLIT_FILES["train"], "a") as f:
        f.write(json.dumps(read_split("train")[0]) + "\n")
    assert adapter_key(config, tmp_path) != adapter_key(config)


def test_course_adapter_rejects_unknown_settings():
    with pytest.raises(ValueError, match=r"unknown recipe setting 'steps'; the settings are "):
        course_adapter(steps=3)


def test_one_recipe_gives_every_default():
    import inspect

    from sft_helpers import train

    recipe = training.RECIPE
    defaults = {name: p.default for name, p in inspect.signature(train_sft).parameters.items()}
    assert {key: defaults[key] for key in recipe["training"]} == recipe["training"]
    assert defaults["labels"] == recipe["masking"]["labels"]
    config = lora_config()
    assert (config.r, config.lora_alpha) == (recipe["lora"]["r"], recipe["lora"]["alpha"])
    assert sorted(config.target_modules) == sorted(recipe["lora"]["target_modules"])
    assert config.layers_to_transform == recipe["lora"]["layers"]
    assert {section: train.DEFAULTS[section] for section in recipe} == recipe
    arguments = train_arguments(recipe_with(max_steps=7, layers=[0]))
    assert arguments["max_steps"] == 7 and arguments["peft_config"].layers_to_transform == [0]


@pytest.mark.slow
def test_course_adapter_is_cached_reused_and_rebuilt_when_corrupt(fresh_cache, monkeypatch):
    path = course_adapter(**TINY_ADAPTER)
    log = training_log(path)
    assert path.parent == fresh_cache and path.name.startswith("course-adapter-")
    assert log["config"]["model"]["profile"] == "tiny" and len(log["loss"]) == 2
    assert log["train_seconds"] > 0 and log["train_tokens"] > 0
    weights = (path / "adapter_model.safetensors").read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached adapter should have been reused")

    with monkeypatch.context() as patched:  # undoing it must not undo fresh_cache's setenv
        patched.setattr(training, "train_sft", no_training)
        assert course_adapter(**TINY_ADAPTER) == path

    (path / "adapter_model.safetensors").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="corrupt; rebuilding"):
        rebuilt = course_adapter(**TINY_ADAPTER)
    assert rebuilt == path
    assert (path / "adapter_model.safetensors").read_bytes() == weights  # same seed, same bytes


@pytest.mark.slow
def test_merged_model_computes_what_the_adapter_model_computes(fresh_cache):
    path = course_adapter(**{**TINY_ADAPTER, "learning_rate": 5e-2})
    adapted, tokenizer = load_course_model(path)
    merged, _ = load_course_model(path, merge=True)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    ids = tokenizer.apply_chat_template(CONVERSATIONS[0], return_tensors="pt",
                                        return_dict=True)["input_ids"]
    base, _ = load_model("tiny")
    with torch.no_grad():
        adapted_logits = adapted(input_ids=ids).logits
        merged_logits = merged(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
    assert torch.allclose(adapted_logits, merged_logits, atol=1e-4)
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)  # the adapter does something


def _data_dir(folder, rows):
    write_jsonl(rows, folder / SPLIT_FILES["train"])
    shutil.copy(DATA_DIR / SPLIT_FILES["eval"], folder / SPLIT_FILES["eval"])
    return folder


def test_course_adapter_trains_on_any_well_formed_conversations(fresh_cache, monkeypatch,
                                                                tmp_path):
    # Not in the house style (a planted opener), as notebook 06 trains on.
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure! Hello."}]
    seen = []

    def capture(model, tokenizer, conversations, **kwargs):
        seen.extend(conversations)
        raise RuntimeError("captured")

    monkeypatch.setattr(training, "train_sft", capture)
    with pytest.raises(RuntimeError, match="captured"):
        course_adapter(profile="tiny", data_dir=_data_dir(tmp_path, [{"messages": chat}]))
    assert seen == [chat]
    broken = tmp_path / "broken"
    broken.mkdir()
    _data_dir(broken, [{"messages": chat}, {"messages": chat[:1]}])
    with pytest.raises(ValueError, match=r"course_train.jsonl line 2: .*no assistant message"):
        course_adapter(profile="tiny", data_dir=broken)
