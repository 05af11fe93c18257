"""Shared fixtures: a private, pre-seeded model cache for tests that exercise the cache."""

from __future__ import annotations

import shutil

import pytest

from sft_helpers import models


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty SFT_CACHE_DIR holding only a copy of the (small) shared tokenizer entry.

    Copying the tokenizer keeps each test from re-reading the 98 MB GGUF file; every model
    entry is built from scratch inside the test.
    """
    tokenizer = models.tokenizer_dir()
    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path))
    shutil.copytree(tokenizer, tmp_path / "models" / models.TOKENIZER_ENTRY)
    return tmp_path / "models"
