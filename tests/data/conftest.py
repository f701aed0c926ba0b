"""Fixtures for the data tests: the committed tokenizer and a per-test datasets cache."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fixture_tokenizer():
    """The committed tiny tokenizer (load once; tests that mutate it must copy it first)."""
    from safedpo_kernels.data import load_fixture_tokenizer

    return load_fixture_tokenizer()


@pytest.fixture
def hf_cache(tmp_path) -> dict:
    """``load_pairs`` kwargs that keep the datasets cache of a test inside its tmp folder."""
    return {"cache_dir": str(tmp_path / "hf_cache")}
