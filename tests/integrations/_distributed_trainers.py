"""2 gloo ranks (CPU) train one step of each trainer on 2 pairs each; rank 0 saves the parameter updates.
Run by test_integrations_accumulation.py under torchrun:

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT _distributed_trainers.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _accumulation import hf_update, trl_update  # noqa: E402


def main(out: str) -> None:
    from safedpo_kernels.data import load_fixture_tokenizer, load_pairs

    tokenizer = load_fixture_tokenizer()
    pairs, _ = load_pairs("fixture:pku_tiny", limit=24)
    updates = {"hf": hf_update(os.path.join(out, "hf"), 2, 1, tokenizer, pairs),
               "trl": trl_update(os.path.join(out, "trl"), 2, 1, tokenizer, pairs)}
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"world": world, **{k: {n: t.clone() for n, t in v.items()} for k, v in updates.items()}},
                   os.path.join(out, "updates.pt"))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
