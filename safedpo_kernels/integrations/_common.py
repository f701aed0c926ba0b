"""What the Trainer and TRL integrations share: batch -> sequence log-probs -> SafeDPO loss + metrics."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from safedpo_kernels.integrations.model import causal_lm_sequence_logps, forward_hidden_states, output_head
from safedpo_kernels.losses import safedpo_loss

#: Batch keys that are not model inputs (everything else in a batch is passed to the model's forward).
NON_MODEL_KEYS = frozenset(
    {"labels", "completion_mask", "chosen_unsafe", "rejected_unsafe", "ref_chosen_logps", "ref_rejected_logps",
     "cu_seqlens"}
)


def model_sequence_logps(
    model: nn.Module,
    batch: Mapping[str, Any],
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    average: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """(2B,) sequence log-probs of ``labels`` under ``model`` via its root forward (DDP-safe, no logits).

    ``batch`` holds ``input_ids`` (2B, T), ``attention_mask`` and any other model inputs (keys in
    :data:`NON_MODEL_KEYS` are not passed to the model), or a packed batch: ``input_ids`` /
    ``position_ids`` (1, total) and ``cu_seqlens`` (2B + 1,).
    """
    kwargs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS and k not in ("input_ids", "attention_mask")}
    hidden = forward_hidden_states(model, batch["input_ids"], batch.get("attention_mask"), **kwargs)
    head = output_head(model)
    return causal_lm_sequence_logps(hidden, head.weight, labels, bias=head.bias, logit_scale=head.logit_scale,
                                    softcap=head.softcap, cu_seqlens=batch.get("cu_seqlens"),
                                    ignore_index=ignore_index, average=average, impl=impl)


def batch_reference_logps(batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Precomputed ``(ref_chosen_logps, ref_rejected_logps)`` (B,) from a batch, or None if absent."""
    rc, rr = batch.get("ref_chosen_logps"), batch.get("ref_rejected_logps")
    if rc is None and rr is None:
        return None
    if rc is None or rr is None:
        raise ValueError("batch: expected both ref_chosen_logps and ref_rejected_logps or neither")
    return rc, rr


def batch_flags(batch: Mapping[str, Any], pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen_unsafe, rejected_unsafe)`` (B,) from a batch; ValueError naming the missing key."""
    for key in ("chosen_unsafe", "rejected_unsafe"):
        if key not in batch:
            raise ValueError(
                f"batch: expected a '{key}' (B,) bool tensor (1 = unsafe) next to the token ids; "
                "load the data with safedpo_kernels.data.load_pairs, which adds the unsafe flags"
            )
    return batch["chosen_unsafe"], batch["rejected_unsafe"]


def safedpo_from_logps(
    policy_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    batch: Mapping[str, Any],
    *,
    beta: float,
    delta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SafeDPO loss and metrics from (2B,) policy log-probs (chosen rows first) and (B,) reference ones."""
    if policy_logps.shape[0] % 2:
        raise ValueError(f"input_ids: expected 2B rows (B chosen then B rejected), got {policy_logps.shape[0]}")
    b = policy_logps.shape[0] // 2
    cu, ru = batch_flags(batch, b)
    dev = policy_logps.device
    return safedpo_loss(
        policy_logps[:b], policy_logps[b:], ref_chosen_logps.to(dev), ref_rejected_logps.to(dev),
        cu.to(dev), ru.to(dev), beta=beta, delta=delta, return_metrics=True,
    )


class MetricsBuffer:
    """Per-mode lists of metric values between two ``Trainer.log`` calls, averaged when logged.

    ``add(metrics, reduce)`` appends each 0-dim tensor after ``reduce`` (e.g. a cross-process mean);
    ``pop(mode)`` returns the means and clears the mode.
    """

    def __init__(self) -> None:
        self._values: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def add(self, mode: str, metrics: Mapping[str, torch.Tensor],
            reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        names = sorted(metrics)
        stacked = torch.stack([metrics[k].detach().float().reshape(()) for k in names])
        if reduce is not None:
            stacked = reduce(stacked)
        for name, value in zip(names, stacked.tolist()):
            self._values[mode][name].append(value)

    def pop(self, mode: str) -> dict[str, float]:
        out = {k: sum(v) / len(v) for k, v in self._values[mode].items() if v}
        self._values[mode].clear()
        return out


def gather_mean(accelerator: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A reduce function for :meth:`MetricsBuffer.add`: mean over processes (one all-gather per step)."""

    def reduce(stacked: torch.Tensor) -> torch.Tensor:
        gathered = accelerator.gather(stacked.to(accelerator.device).unsqueeze(0))
        return gathered.reshape(-1, stacked.numel()).mean(0).cpu()

    return reduce


class LossOnlyPredictionMixin:
    """``prediction_step`` for Trainer subclasses whose loss never builds logits: loss only.

    Mixed in before ``transformers.Trainer`` (or TRL's ``DPOTrainer``), whose ``_prepare_inputs``,
    ``compute_loss_context_manager`` and ``compute_loss`` it calls.
    """

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """Evaluation: the SafeDPO loss only (there are no logits to return)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
