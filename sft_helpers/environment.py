"""The environment report that opens every notebook: versions, device, dtype, the profile.

`setup` sits above `models` (it reports the state of a profile's cache); the device, dtype
and seed rules it reports live in `sft_helpers.runtime`, below `models`.
"""

from __future__ import annotations

import warnings

import torch

from sft_helpers.models import describe_profile
from sft_helpers.runtime import (
    LIBRARY_RENAME_NOTICE,
    bf16_native,
    pick_device,
    pick_dtype,
    seed_everything,
    versions,
)


def setup(profile: str | None = None, seed: int = 0) -> dict[str, str]:
    """Seed everything and print the environment report that opens every notebook.

    Also silences what a learner cannot act on: the per-tensor "Loading weights" bars of
    every `from_pretrained`, and the libraries' own use of a renamed argument
    (`LIBRARY_RENAME_NOTICE`). Returns the report as a dict so a notebook can assert on it.
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", LIBRARY_RENAME_NOTICE, FutureWarning)
    seed_everything(seed)
    device = pick_device()
    report = versions()
    report["device"] = str(device)
    report["dtype"] = str(pick_dtype(device)).removeprefix("torch.")
    report["bf16 native"] = str(bf16_native(device))
    report["cpu threads"] = str(torch.get_num_threads())
    report["seed"] = str(seed)
    if profile is not None:
        report.update(describe_profile(profile))
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    return report
