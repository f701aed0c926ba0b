"""One optimizer step of each trainer (plain SGD, no clipping) and the parameter update it makes: shared by
the gradient-accumulation test and the 2-rank check (``_distributed_trainers.py``).

The 4 pairs are (keep, keep, swap, drop) in T(D) terms, so however the sampler splits them into two
micro-batches or two ranks the halves keep different numbers of pairs (2 + 1): a per-micro-batch
mean would give a different update than one batch of 4.
"""

from __future__ import annotations

import copy

import torch

# Rows of the fixture's canonical pairs with flags (chosen_unsafe, rejected_unsafe) =
# (0, 0), (0, 1), (1, 0), (1, 1): keep, keep + margin, swap, drop.
FLAGS = ((False, False), (False, True), (True, False), (True, True))


def four_pairs(pairs):
    """4 fixture pairs, one per T(D) case (same text rows whatever the split)."""
    rows = []
    for cu, ru in FLAGS:
        rows.append(next(i for i in range(len(pairs)) if (pairs[i]["chosen_unsafe"], pairs[i]["rejected_unsafe"]) ==
                         (cu, ru) and i not in rows))
    return pairs.select(rows)


def make_policy(vocab: int, pad: int):
    from _integration_helpers import make_llama

    return make_llama(vocab, pad_token_id=pad, seed=3)


def common_args(out: str, per_device: int, accumulation: int) -> dict:
    return dict(output_dir=out, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                max_steps=1, learning_rate=1.0, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant",
                weight_decay=0.0, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=11,
                logging_steps=1)


def update_of(trainer, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: (p.detach() - before[n]) for n, p in model.named_parameters()}


def hf_update(out: str, per_device: int, accumulation: int, tokenizer, pairs) -> dict[str, torch.Tensor]:
    from safedpo_kernels.data import PaddedPairCollator, tokenize_pairs
    from safedpo_kernels.integrations import SafeDPOHFConfig, SafeDPOHFTrainer, add_reference_logps

    data, _ = tokenize_pairs(four_pairs(pairs), tokenizer, max_length=48)
    policy = make_policy(len(tokenizer), tokenizer.pad_token_id)
    ref = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy
        for p in ref.parameters():
            p.mul_(0.9)
    data = add_reference_logps(data, ref, PaddedPairCollator(tokenizer.pad_token_id), progress=False)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    cfg = SafeDPOHFConfig(**common_args(out, per_device, accumulation), beta=0.1, delta=2.0, rpo_alpha=0.3)
    trainer = SafeDPOHFTrainer(policy, cfg, train_dataset=data, processing_class=tokenizer)
    return update_of(trainer, before)


def trl_update(out: str, per_device: int, accumulation: int, tokenizer, pairs) -> dict[str, torch.Tensor]:
    from trl import DPOConfig

    from safedpo_kernels.integrations import SafeDPOTrainer

    policy = make_policy(len(tokenizer), tokenizer.pad_token_id)
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.9)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    cfg = DPOConfig(**common_args(out, per_device, accumulation), beta=0.1, max_length=48, bf16=False,
                    dataset_num_proc=None)
    trainer = SafeDPOTrainer(policy, ref, cfg, train_dataset=four_pairs(pairs), processing_class=tokenizer,
                             delta=2.0, rpo_alpha=0.3)
    return update_of(trainer, before)


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| / max |b| over all parameters (b is the one-batch update)."""
    assert a.keys() == b.keys()
    scale = max(v.abs().max().item() for v in b.values())
    assert scale > 0
    return max((a[k] - b[k]).abs().max().item() for k in b) / scale
