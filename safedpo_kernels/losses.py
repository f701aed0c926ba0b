"""SafeDPO and DPO on per-pair sequence log-probs.

SafeDPO (Kim et al., ICLR 2026, Eq. 12) on helpfulness-ordered pairs ``(y_w, y_l)`` with unsafe
flags ``(h_w, h_l)``:

* the safety transformation T(D): keep pairs whose winner is safe, **swap** pairs whose winner is
  unsafe and loser safe, **drop** pairs where both are unsafe. After T the winner is always safe;
* the loss over the kept pairs::

      L = -log sigmoid( beta * (r_w - r_l) - (h~_l - h~_w) * delta ),  r = log pi(y|x) - log pi_ref(y|x)

  where ``h~_l - h~_w`` is 1 exactly on safe-vs-unsafe pairs (``h_w xor h_l``) and 0 otherwise.

With ``delta = 0`` and all flags 0 this is plain DPO, which :func:`dpo_loss` computes directly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from safedpo_kernels._checks import (
    REDUCTIONS,
    as_flags,
    check_beta_delta,
    check_choice,
    check_pair_logps,
)

LOGP_NAMES = (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
)


class SafetyTransform(NamedTuple):
    """T(D) as boolean masks over a batch of B pairs, each (B,) bool."""

    keep: torch.Tensor  # pair stays in the loss (not both unsafe)
    swap: torch.Tensor  # helpfulness winner unsafe, loser safe: train on (y_l, y_w)
    safe_vs_unsafe: torch.Tensor  # exactly one response unsafe: the margin delta applies


def safety_transform(chosen_unsafe: torch.Tensor, rejected_unsafe: torch.Tensor) -> SafetyTransform:
    """T(D) from bool unsafe flags of the helpfulness winner (chosen) and loser (rejected)."""
    return SafetyTransform(
        keep=~(chosen_unsafe & rejected_unsafe),
        swap=chosen_unsafe & ~rejected_unsafe,
        safe_vs_unsafe=chosen_unsafe ^ rejected_unsafe,
    )


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum() / count.clamp(min=1)


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    keep: torch.Tensor,
    margin: torch.Tensor,
    *,
    beta: float,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid preference loss on already-ordered pairs: -log sigmoid(beta * (r_w - r_l) - margin).

    All tensors are (B,); ``keep`` (B,) bool selects pairs that enter the loss, ``margin`` (B,) float.
    Returns ``(loss, per_pair_losses, metrics)``. Dropped pairs contribute exactly 0 (and no
    gradient, even if their log-probs are not finite); "mean" divides by the number of kept pairs
    and gives 0 (with zero gradients) when no pair is kept.
    """
    dtype = _compute_dtype(chosen_logps)
    chosen_rewards = beta * (chosen_logps.to(dtype) - ref_chosen_logps.to(dtype))
    rejected_rewards = beta * (rejected_logps.to(dtype) - ref_rejected_logps.to(dtype))
    logits = chosen_rewards - rejected_rewards - margin.to(dtype)
    # Mask before and after the nonlinearity: a dropped pair's log-probs (even inf/NaN ones) then
    # get an exact zero gradient instead of 0 * NaN.
    zero = torch.zeros_like(logits)
    per_pair = torch.where(keep, -F.logsigmoid(torch.where(keep, logits, zero)), zero)
    n_kept = keep.sum()
    if reduction == "mean":
        loss = per_pair.sum() / n_kept.clamp(min=1).to(dtype)
    elif reduction == "sum":
        loss = per_pair.sum()
    else:
        loss = per_pair
    with torch.no_grad():
        count = n_kept.to(dtype)
        cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
        metrics = {
            "loss": _masked_mean(per_pair.detach(), keep, count),
            "rewards/chosen": _masked_mean(cr, keep, count),
            "rewards/rejected": _masked_mean(rr, keep, count),
            "rewards/margins": _masked_mean(cr - rr, keep, count),
            "rewards/accuracies": _masked_mean((cr > rr).to(dtype), keep, count),
            "logps/chosen": _masked_mean(chosen_logps.detach().to(dtype), keep, count),
            "logps/rejected": _masked_mean(rejected_logps.detach().to(dtype), keep, count),
        }
        metrics = {k: v.float() for k, v in metrics.items()}
    return loss, per_pair, metrics


def safedpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_unsafe: torch.Tensor,
    rejected_unsafe: torch.Tensor,
    *,
    beta: float = 0.1,
    delta: float = 10.0,
    reduction: str = "mean",
    return_metrics: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SafeDPO loss (paper Eq. 12) on helpfulness-ordered pairs, applying T(D) on the fly.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: (B,)
            float sequence log-probs of the helpfulness winner ("chosen") and loser.
        chosen_unsafe, rejected_unsafe: (B,) bool or 0/1 unsafe flags (1 = unsafe).
        beta: KL strength, > 0. delta: safety margin in logit units, >= 0 (outside beta).
        reduction: "mean" over kept pairs, "sum", or "none" for (B,) with 0 on dropped pairs.
        return_metrics: also return the spec's metrics (0-dim float32 tensors, means over kept pairs
            after T(D)) plus ``safety/safe_vs_unsafe_frac`` (over all B pairs) and pair counts.

    Returns:
        loss (0-dim, or (B,) with reduction="none"), float32 (float64 for float64 inputs);
        with ``return_metrics`` the tuple ``(loss, metrics)``.
    """
    ref = check_pair_logps(
        LOGP_NAMES, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    )
    check_beta_delta(beta, delta)
    check_choice("reduction", reduction, REDUCTIONS)
    cu = as_flags("chosen_unsafe", chosen_unsafe, ref.shape[0], ref.device)
    ru = as_flags("rejected_unsafe", rejected_unsafe, ref.shape[0], ref.device)
    t = safety_transform(cu, ru)
    # Re-order swapped pairs so the (safe) winner comes first.
    pw = torch.where(t.swap, policy_rejected_logps, policy_chosen_logps)
    pl = torch.where(t.swap, policy_chosen_logps, policy_rejected_logps)
    rw = torch.where(t.swap, ref_rejected_logps, ref_chosen_logps)
    rl = torch.where(t.swap, ref_chosen_logps, ref_rejected_logps)
    margin = t.safe_vs_unsafe.to(_compute_dtype(ref)) * float(delta)
    loss, _, metrics = preference_loss(pw, pl, rw, rl, t.keep, margin, beta=beta, reduction=reduction)
    if not return_metrics:
        return loss
    batch = max(ref.shape[0], 1)
    metrics["safety/safe_vs_unsafe_frac"] = t.safe_vs_unsafe.sum().float() / batch
    metrics["pairs/kept"] = t.keep.sum().float()
    metrics["pairs/swapped"] = t.swap.sum().float()
    metrics["pairs/dropped"] = (~t.keep).sum().float()
    return loss, metrics


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
    return_metrics: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain DPO (sigmoid loss) on (B,) sequence log-probs: the baseline SafeDPO is compared with.

    Same arguments, reductions and metrics as :func:`safedpo_loss`, without flags or margin.
    """
    ref = check_pair_logps(
        LOGP_NAMES, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    )
    check_beta_delta(beta)
    check_choice("reduction", reduction, REDUCTIONS)
    keep = torch.ones(ref.shape[0], dtype=torch.bool, device=ref.device)
    margin = torch.zeros(ref.shape[0], dtype=_compute_dtype(ref), device=ref.device)
    loss, _, metrics = preference_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        keep,
        margin,
        beta=beta,
        reduction=reduction,
    )
    return (loss, metrics) if return_metrics else loss
