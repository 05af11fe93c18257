"""First load of the default model (GGUF -> dequantize -> write the cache) vs a cached load.

Both are measured in this one run, against a private empty cache folder, so the ratio
compares like with like on whatever machine runs it:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/model_load.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

CACHED_REPEATS = 3


def timed_load(profile: str) -> float:
    from sft_helpers.models import load_model

    start = time.perf_counter()
    load_model(profile)
    return time.perf_counter() - start


def main() -> None:
    from transformers.utils import logging as transformers_logging

    from sft_helpers.models import DEFAULT_PROFILE

    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SFT_CACHE_DIR"] = cache
        first = timed_load(DEFAULT_PROFILE)
        cached = statistics.median(timed_load(DEFAULT_PROFILE) for _ in range(CACHED_REPEATS))
    print(f"first load (GGUF, dequantize, write cache): {first:6.2f} s")
    print(f"cached load (median of {CACHED_REPEATS}, SHA-256 verified): {cached:6.2f} s")
    print(f"cached load is {first / cached:.1f}x faster")


if __name__ == "__main__":
    main()
