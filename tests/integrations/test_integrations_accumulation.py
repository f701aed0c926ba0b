"""Exact gradient accumulation in both trainers: 2 micro-batches x 2 pairs give the update of 1 x 4 (fp32,
1e-6 relative) with kept, swapped and dropped pairs present (the halves keep 2 and 1 pairs), and the
NLL (RPO) term normalized over the step's winner tokens."""

from __future__ import annotations

import pytest
from _accumulation import hf_update, relative_difference, trl_update


@pytest.mark.parametrize("which", ["hf", "trl"])
def test_two_micro_batches_equal_one_batch(which, tmp_path, tokenizer, pairs):
    if which == "trl":
        pytest.importorskip("trl")
    update = hf_update if which == "hf" else trl_update
    one = update(str(tmp_path / "1x4"), 4, 1, tokenizer, pairs)
    two = update(str(tmp_path / "2x2"), 2, 2, tokenizer, pairs)
    four = update(str(tmp_path / "4x1"), 1, 4, tokenizer, pairs)  # a micro-batch with no kept pair
    assert relative_difference(two, one) < 1e-6
    assert relative_difference(four, one) < 1e-6
