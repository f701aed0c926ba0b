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


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path, tokenizer, pairs):
    """torchrun, 2 gloo ranks x 2 pairs (DDP through accelerate): the same update as 1 process x 4 pairs,
    for both trainers (the kept-pair count is all-reduced over ranks, the loss scaled by the world size)."""
    pytest.importorskip("trl")
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import torch

    script = Path(__file__).with_name("_distributed_trainers.py")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          port, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    saved_path = tmp_path / "updates.pt"
    assert out.returncode == 0 and saved_path.exists(), out.stdout[-3000:] + out.stderr[-3000:]
    saved = torch.load(saved_path, weights_only=True)
    assert saved["world"] == 2
    assert relative_difference(saved["hf"], hf_update(str(tmp_path / "hf1"), 4, 1, tokenizer, pairs)) < 1e-6
    assert relative_difference(saved["trl"], trl_update(str(tmp_path / "trl1"), 4, 1, tokenizer, pairs)) < 1e-6
