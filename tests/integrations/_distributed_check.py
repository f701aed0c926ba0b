"""2-rank gloo check (CPU): SafeDPO gradients through DDP and through the FSDP2 root wrapper equal a
single-process run on the union of the ranks' batches. Run by test_integrations_model.py:

    python tests/integrations/_distributed_check.py PORT OUT_FILE
Prints "MAXDIFF ddp=<x> fsdp=<y>" (largest absolute gradient difference, float64) on success; also
checks that output_head refuses the sharded lm_head weight outside the root's forward.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD, PAIRS, T, V = 2, 3, 11, 97


def make_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).double()


def rank_batch(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(1, V, (2 * PAIRS, T), generator=g)
    labels = ids.clone()
    labels[:, : 3 + rank] = -100  # prompt
    labels[0, -2:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    flags = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]])[torch.arange(PAIRS) + rank]
    refs = -torch.rand(2, PAIRS, generator=g, dtype=torch.float64) * 50
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "chosen_unsafe": flags[:, 0].bool(),
            "rejected_unsafe": flags[:, 1].bool(), "ref_chosen_logps": refs[0], "ref_rejected_logps": refs[1]}


def loss_of(seq: torch.Tensor, batch: dict) -> torch.Tensor:
    from safedpo_kernels import safedpo_loss

    return safedpo_loss(seq[:PAIRS], seq[PAIRS:], batch["ref_chosen_logps"], batch["ref_rejected_logps"],
                        batch["chosen_unsafe"], batch["rejected_unsafe"], beta=0.1, delta=10.0)


def full_grads(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name.removeprefix("lm.").removeprefix("module.")] = (g.full_tensor() if isinstance(g, DTensor) else g)
    return out


def worker(rank: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from safedpo_kernels.integrations import SequenceLogpsModel, causal_lm_sequence_logps, forward_hidden_states
    from safedpo_kernels.integrations import output_head

    batch = rank_batch(rank)
    # DDP: the Trainer/TRL path (root forward with logits_to_keep=1, weight read outside).
    ddp = DDP(make_lm())
    hidden = forward_hidden_states(ddp, batch["input_ids"], batch["attention_mask"])
    head = output_head(ddp)
    loss_of(causal_lm_sequence_logps(hidden, head.weight, batch["labels"], bias=head.bias), batch).backward()
    ddp_grads = full_grads(ddp)
    # FSDP2: the documented root wrapper.
    wrapper = SequenceLogpsModel(make_lm())
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in wrapper.lm.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(wrapper, mesh=mesh)
    loss_of(wrapper(batch["input_ids"], batch["attention_mask"], batch["labels"]), batch).backward()
    fsdp_grads = full_grads(wrapper)
    try:  # outside the root's forward the head is a sharded DTensor: must be refused, not used
        output_head(wrapper.lm)
        refused = False
    except RuntimeError as exc:
        refused = "root module" in str(exc)
    if rank == 0:
        torch.save({"ddp": {k: v.clone() for k, v in ddp_grads.items()},
                    "fsdp": {k: v.clone() for k, v in fsdp_grads.items()}, "refused": refused}, out_path)
    dist.barrier()
    dist.destroy_process_group()


def main(port: int, out_path: str) -> None:
    from safedpo_kernels.integrations import SequenceLogpsModel

    mp.start_processes(worker, args=(port, out_path), nprocs=WORLD, start_method="spawn")
    saved = torch.load(out_path, weights_only=True)
    ddp_grads, fsdp_grads = saved["ddp"], saved["fsdp"]
    assert saved["refused"], "output_head used a sharded lm_head weight outside the FSDP root's forward"
    single = SequenceLogpsModel(make_lm())
    total = sum(loss_of(single(b["input_ids"], b["attention_mask"], b["labels"]), b)
                for b in (rank_batch(r) for r in range(WORLD))) / WORLD  # DDP / FSDP average over ranks
    total.backward()
    ref = full_grads(single)
    diffs = {}
    for name, grads in (("ddp", ddp_grads), ("fsdp", fsdp_grads)):
        assert grads.keys() == ref.keys(), (name, sorted(set(grads) ^ set(ref)))
        diffs[name] = max((grads[k] - ref[k]).abs().max().item() for k in ref)
    scale = max(g.abs().max().item() for g in ref.values())
    assert scale > 0
    print(f"MAXDIFF ddp={diffs['ddp']:.3e} fsdp={diffs['fsdp']:.3e} scale={scale:.3e}")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
    sys.stdout.flush()
    os._exit(0)
