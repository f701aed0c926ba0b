"""Test-wide environment: set before anything imports triton, transformers or datasets.

* TRITON_INTERPRET=1 runs the Triton kernels on the CPU through Triton's interpreter.
* HF_HUB_OFFLINE / HF_DATASETS_OFFLINE make an accidental hub call fail at once instead of
  retrying for about a minute (no machine here reaches the hub).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import secrets  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def seed() -> int:
    """Fresh random inputs every run: seeds torch from the OS and prints the seed (shown on failure)."""
    value = secrets.randbelow(2**31 - 1)
    torch.manual_seed(value)
    print(f"torch seed: {value}")
    return value
