"""Fixtures of the integration tests: offline fixture data, tokenizer, collator, tiny random Llamas."""

from __future__ import annotations

import copy

import pytest

from _integration_helpers import make_llama


@pytest.fixture(scope="session")
def tokenizer():
    from safedpo_kernels.data import load_fixture_tokenizer

    return load_fixture_tokenizer()


@pytest.fixture(scope="session")
def pairs():
    """24 canonical fixture pairs (prompt, chosen, rejected, chosen_unsafe, rejected_unsafe, ...)."""
    from safedpo_kernels.data import load_pairs

    ds, _ = load_pairs("fixture:pku_tiny", limit=24)
    return ds


@pytest.fixture(scope="session")
def tokenized(pairs, tokenizer):
    from safedpo_kernels.data import tokenize_pairs

    ds, _ = tokenize_pairs(pairs, tokenizer, max_length=64)
    return ds


@pytest.fixture(scope="session")
def collator(tokenizer):
    from safedpo_kernels.data import PaddedPairCollator

    return PaddedPairCollator(tokenizer.pad_token_id)


@pytest.fixture
def tiny_pair(tokenizer):
    """(policy, frozen reference copy) tiny float32 Llamas over the fixture vocabulary."""
    policy = make_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    ref = copy.deepcopy(policy).requires_grad_(False)
    return policy, ref


