"""Precompute reference log-probs once, so the frozen reference model is not held during training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from safedpo_kernels.integrations.model import causal_lm_sequence_logps, hidden_states_and_head_weight


@torch.no_grad()
def reference_sequence_logps(
    ref_model: nn.Module,
    batch: dict[str, Any],
    *,
    ignore_index: int = -100,
    average_log_prob: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ref_chosen_logps, ref_rejected_logps)`` (B,) float32 of a pair batch, under no_grad.

    ``batch``: a PaddedPairCollator batch (input_ids / attention_mask / labels (2B, T), chosen rows
    first) or a PackedPairCollator one (input_ids / position_ids / labels (1, total), cu_seqlens).
    Runs only the backbone and the fused log-probs (no logits); single process or inside an FSDP
    root's forward.
    """
    device = next(ref_model.parameters()).device
    extra = {} if batch.get("position_ids") is None else {"position_ids": batch["position_ids"].to(device)}
    mask = batch.get("attention_mask")
    out = hidden_states_and_head_weight(
        ref_model, batch["input_ids"].to(device), None if mask is None else mask.to(device), **extra
    )
    seq = causal_lm_sequence_logps(out.hidden, out.weight, batch["labels"], bias=out.bias,
                                   logit_scale=out.logit_scale, softcap=out.softcap,
                                   cu_seqlens=batch.get("cu_seqlens"), ignore_index=ignore_index,
                                   average=average_log_prob, impl=impl)
    b = seq.shape[0] // 2
    return seq[:b], seq[b:]


def add_reference_logps(
    dataset: Any,
    ref_model: nn.Module,
    collator: Callable[[Sequence[dict[str, Any]]], dict[str, Any]],
    *,
    batch_size: int = 8,
    ignore_index: int = -100,
    average_log_prob: bool = False,
    impl: str = "auto",
    progress: bool = True,
) -> Any:
    """Return ``dataset`` (a tokenized ``datasets.Dataset``) with ``ref_chosen_logps`` / ``ref_rejected_logps``.

    One no-grad pass of ``ref_model`` over the rows in order, ``batch_size`` pairs at a time, batched
    by ``collator`` (e.g. ``PaddedPairCollator``). Existing reference columns are replaced. The
    model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    from tqdm.auto import tqdm

    was_training = ref_model.training
    ref_model.eval()
    chosen: list[float] = []
    rejected: list[float] = []
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc="reference log-probs", disable=not progress):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            rc, rr = reference_sequence_logps(ref_model, collator(rows), ignore_index=ignore_index,
                                              average_log_prob=average_log_prob, impl=impl)
            chosen.extend(rc.float().cpu().tolist())
            rejected.extend(rr.float().cpu().tolist())
    finally:
        ref_model.train(was_training)
    drop = [c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in dataset.column_names]
    if drop:
        dataset = dataset.remove_columns(drop)
    return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)
