"""The environment report that opens every notebook: versions, device, dtype, the profile.

`setup` sits above `models` (it reports the state of a profile's cache); the device, dtype
and seed rules it reports live in `sft_helpers.runtime`, below `models`.
"""

from __future__ import annotations

import logging
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

# bitsandbytes 0.50, on a CPU with AVX512-BF16, tries to fetch an optional 4-bit kernel from
# the Hugging Face Hub and logs this when the `kernels` package is absent; the course runs
# offline, and bitsandbytes falls back to its built-in kernel.
OPTIONAL_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward"


def _not_optional_kernel_notice(record: logging.LogRecord) -> bool:
    return OPTIONAL_KERNEL_NOTICE not in record.getMessage()


def setup(profile: str | None = None, seed: int = 0) -> dict[str, str]:
    """Seed everything and print the environment report that opens every notebook.

    Also silences what a learner cannot act on: the per-tensor "Loading weights" bars of
    every `from_pretrained`, the libraries' own use of a renamed argument
    (`LIBRARY_RENAME_NOTICE`) and bitsandbytes' notice of an optional kernel it cannot
    download (`OPTIONAL_KERNEL_NOTICE`). Returns the report as a dict so a notebook can
    assert on it.
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", LIBRARY_RENAME_NOTICE, FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_optional_kernel_notice)
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
