"""Where the course runs: device, dtype, seeds and package versions.

The bottom of the package: every module that needs a device or a seed imports it from here,
and this module imports no other course module.
"""

from __future__ import annotations

import importlib.metadata
import platform
import random

import torch

# Packages whose versions every notebook reports (all pinned in pyproject.toml).
REPORTED_PACKAGES = (
    "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes",
)
# Compute capability from which a GPU has native bfloat16 (Ampere). A T4 (Colab's free
# tier) is 7.5: torch may still say bf16 is "supported" there, but only by slow emulation.
BF16_MIN_CAPABILITY = (8, 0)
# transformers 5 renamed `gradient_checkpointing`; TRL and PEFT still read the old name and
# raise this FutureWarning, which says nothing a learner can act on.
LIBRARY_RENAME_NOTICE = r".*gradient_checkpointing.*deprecated"


def pick_device(device: str | None = None) -> torch.device:
    """The device to use: `device` if given, else CUDA when present, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_native(device: torch.device | str) -> bool:
    """True when `device` computes in bfloat16 natively (CUDA compute capability >= 8.0)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= BF16_MIN_CAPABILITY


def pick_dtype(device: torch.device | str) -> torch.dtype:
    """The training/inference dtype for `device`: the one place the course decides it.

    float32 on the CPU (fast there, and exact enough to assert numbers), bfloat16 on GPUs
    that support it natively, float16 on older GPUs such as Colab's T4.

    >>> pick_dtype("cpu")
    torch.float32
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if bf16_native(device) else torch.float16


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch so that a notebook gives the same numbers every run."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def versions() -> dict[str, str]:
    """Python and the installed version of each reported package."""
    found = {"python": platform.python_version()}
    for name in REPORTED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
