"""SafeDPO and DPO, for the whole family of direct-alignment losses, on per-pair sequence log-probs.

SafeDPO (Kim et al., ICLR 2026, Eq. 12) on helpfulness-ordered pairs ``(y_w, y_l)`` with unsafe
flags ``(h_w, h_l)``:

* the safety transformation T(D): keep pairs whose winner is safe, **swap** pairs whose winner is
  unsafe and loser safe, **drop** pairs where both are unsafe. After T the winner is always safe;
* the loss over the kept pairs::

      L = -log sigmoid( u - s * delta ),   u = beta * (r_w - r_l),   r = log pi(y|x) - log pi_ref(y|x)

  where ``s = h~_l - h~_w`` is 1 exactly on safe-vs-unsafe pairs (``h_w xor h_l``) and 0 otherwise.

"SafeDAA" (paper section 3.4) applies T(D) and the margin to other direct-alignment losses g. Every
``loss_type`` in :data:`LOSS_TYPES` is written as TRL writes it, in terms of the winner's and loser's
implicit rewards ``a = beta * r_w`` and ``b = beta * r_l`` (after T), and the margin enters as
``b -> b + s * delta``: the unsafe loser is scored as if it were ``delta`` logits better than it is.
For every loss that is a function of ``u = a - b`` this is exactly "u -> u - s * delta" (Eq. 12); for
the per-response losses (apo_zero, nca_pair, bco_pair, sppo_hard) it is the same substitution on the
loser's term. docs/losses.md has the table.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

from safedpo_kernels._checks import (
    REDUCTIONS,
    _real_number,
    as_flags,
    check_beta_delta,
    check_choice,
    check_pair_logps,
    check_positive_finite,
    check_tensor,
)

#: Every ``loss_type`` the functional API, the fused modules and the integrations accept.
LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "exo_pair",
    "apo_zero",
    "apo_down",
    "sppo_hard",
    "nca_pair",
    "bco_pair",
    "discopop",
    "sigmoid_norm",
)
#: Loss types defined on per-token *mean* log-probs (TRL divides by the completion length for them).
#: The functional API expects averaged log-probs for these; the fused modules average automatically.
AVERAGED_LOSS_TYPES = ("ipo", "sigmoid_norm")
#: Loss types that read ``label_smoothing`` (sigmoid/sigmoid_norm: conservative DPO, cDPO).
LABEL_SMOOTHING_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "robust", "exo_pair")

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


class LossOptions(NamedTuple):
    """Validated loss options shared by the functional API and the fused modules."""

    beta: float
    loss_type: str
    label_smoothing: float
    discopop_tau: float


def _flag_pair(chosen_unsafe: object, rejected_unsafe: object, size: int | None = None,
               device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    cu_t = check_tensor("chosen_unsafe", chosen_unsafe)
    if size is None:
        if cu_t.dim() != 1:
            raise ValueError(f"chosen_unsafe: expected shape (B,), got {tuple(cu_t.shape)}")
        size = cu_t.shape[0]
    device = cu_t.device if device is None else device
    return (as_flags("chosen_unsafe", chosen_unsafe, size, device),
            as_flags("rejected_unsafe", rejected_unsafe, size, device))


def safety_transform(chosen_unsafe: torch.Tensor, rejected_unsafe: torch.Tensor) -> SafetyTransform:
    """T(D) from the unsafe flags of the helpfulness winner (chosen) and loser (rejected).

    chosen_unsafe, rejected_unsafe: (B,) bool, or integer/float tensors holding only 0 and 1
    (1 = unsafe); any other value raises a ValueError naming the argument.
    """
    cu, ru = _flag_pair(chosen_unsafe, rejected_unsafe)
    return SafetyTransform(keep=~(cu & ru), swap=cu & ~ru, safe_vs_unsafe=cu ^ ru)


def count_kept_pairs(chosen_unsafe: torch.Tensor, rejected_unsafe: torch.Tensor) -> torch.Tensor:
    """Number of pairs T(D) keeps (not both unsafe): a 0-dim int64 tensor on the flags' device.

    Sum it over the micro-batches of an optimizer step (and all-reduce it over data-parallel ranks)
    and pass the total as ``num_kept_pairs`` to make ``reduction="mean"`` the mean over the step.
    """
    return safety_transform(chosen_unsafe, rejected_unsafe).keep.sum()


def count_nll_tokens(
    chosen_unsafe: torch.Tensor | None,
    rejected_unsafe: torch.Tensor | None,
    chosen_token_counts: torch.Tensor,
    rejected_token_counts: torch.Tensor,
) -> torch.Tensor:
    """Trained tokens of the winners after T(D) (the NLL term's normalizer): a 0-dim int64 tensor.

    Flags None (plain DPO): the chosen responses' tokens. Token counts (B,) int. Sum it over an
    optimizer step's micro-batches and ranks and pass it as ``num_nll_tokens``.
    """
    chosen = check_tensor("chosen_token_counts", chosen_token_counts)
    rejected = check_tensor("rejected_token_counts", rejected_token_counts)
    if chosen_unsafe is None and rejected_unsafe is None:
        return chosen.sum().long()
    t = safety_transform(chosen_unsafe, rejected_unsafe)
    winner = torch.where(t.swap, rejected.to(t.swap.device), chosen.to(t.swap.device))
    return torch.where(t.keep, winner, torch.zeros_like(winner)).sum().long()


def check_loss_options(beta: float, loss_type: str, label_smoothing: float = 0.0,
                       discopop_tau: float = 0.05) -> LossOptions:
    """Validate ``beta``, ``loss_type``, ``label_smoothing`` and ``discopop_tau`` together."""
    beta, _ = check_beta_delta(beta)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    ls = check_nonnegative_finite("label_smoothing", label_smoothing)
    tau = check_positive_finite("discopop_tau", discopop_tau)
    if loss_type == "exo_pair" and not 0.0 < ls < 1.0:
        raise ValueError(f"label_smoothing: expected 0 < label_smoothing < 1 for loss_type='exo_pair' "
                         f"(the EXO paper recommends 1e-3), got {label_smoothing!r}")
    if loss_type in ("robust", "sigmoid", "sigmoid_norm") and not 0.0 <= ls < 0.5:
        raise ValueError(f"label_smoothing: expected 0 <= label_smoothing < 0.5 for loss_type={loss_type!r}, "
                         f"got {label_smoothing!r}")
    if loss_type not in LABEL_SMOOTHING_LOSS_TYPES and ls != 0.0:
        raise ValueError(f"label_smoothing: loss_type={loss_type!r} does not use label smoothing (only "
                         f"{LABEL_SMOOTHING_LOSS_TYPES} do), got {label_smoothing!r}; pass 0.0")
    return LossOptions(beta, loss_type, ls, tau)


def check_nonnegative_finite(name: str, value: object) -> float:
    """A finite real number >= 0 (Python, numpy or 0-dim tensor) as a float."""
    x = _real_number(name, value)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return x


def check_count(name: str, value: object) -> int | torch.Tensor | None:
    """A normalizer count: None, an int >= 0 (numpy integers too) or a 0-dim real tensor."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"{name}: expected an int or a 0-dim integer/float tensor, got "
                             f"{value.dtype} of shape {tuple(value.shape)}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise ValueError(f"{name}: expected an int >= 0 or a 0-dim tensor, got {value!r}")
    return int(value)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum() / count.clamp(min=1)


def pair_losses(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    margin: torch.Tensor,
    options: LossOptions,
) -> torch.Tensor:
    """Per-pair loss g of ``options.loss_type`` on ordered pairs, margin on the loser: (B,).

    chosen_logratios / rejected_logratios: (B,) ``r_w``, ``r_l`` (policy minus reference log-probs,
    per-token means for :data:`AVERAGED_LOSS_TYPES`); margin: (B,) ``s * delta`` (0 = plain loss).
    With ``a = beta * r_w``, ``b = beta * r_l + margin`` and ``u = a - b``, each loss is TRL's.
    """
    beta, kind, ls, tau = options
    a = beta * chosen_logratios
    b = beta * rejected_logratios + margin
    # beta * (r_w - r_l) - margin, computed as TRL and Liger compute beta * (r_w - r_l).
    u = beta * (chosen_logratios - rejected_logratios) - margin
    if kind in ("sigmoid", "sigmoid_norm"):
        if ls == 0.0:
            return -F.logsigmoid(u)
        return -(1 - ls) * F.logsigmoid(u) - ls * F.logsigmoid(-u)
    if kind == "hinge":
        return torch.relu(1 - u)
    if kind == "ipo":
        # TRL: (r_w - r_l - 1 / (2 beta))^2 on per-token means; u / beta with the margin in it.
        return (chosen_logratios - rejected_logratios - margin / beta - 1 / (2 * beta)) ** 2
    if kind == "robust":
        return (-(1 - ls) * F.logsigmoid(u) + ls * F.logsigmoid(-u)) / (1 - 2 * ls)
    if kind == "exo_pair":
        log_pw, log_pl = math.log1p(-ls), math.log(ls)
        return torch.sigmoid(u) * (F.logsigmoid(u) - log_pw) + torch.sigmoid(-u) * (F.logsigmoid(-u) - log_pl)
    if kind == "discopop":
        modulation = torch.sigmoid(u / tau)
        return -F.logsigmoid(u) * (1 - modulation) + torch.exp(-u) * modulation
    if kind == "apo_zero":
        return 1 - torch.sigmoid(a) + torch.sigmoid(b)
    if kind == "apo_down":
        return torch.sigmoid(a) + 1 - torch.sigmoid(u)
    if kind == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + margin / beta + 0.5 / beta) ** 2
    if kind == "nca_pair":
        return -F.logsigmoid(a) - 0.5 * F.logsigmoid(-a) - 0.5 * F.logsigmoid(-b)
    if kind == "bco_pair":
        return -F.logsigmoid(a) - F.logsigmoid(-b)
    raise AssertionError(kind)  # check_loss_options rejects anything else


class NLLTerm(NamedTuple):
    """Inputs of the NLL (RPO) term: a token mean of -log pi over the T(D) winners' tokens.

    chosen/rejected_token_logp_sums (B,): sum of the response's token log-probs; chosen/rejected_
    token_counts (B,): its number of trained tokens; alpha: weight; num_tokens: the normalizer
    (None = this call's winner tokens).
    """

    alpha: float
    chosen_token_logp_sums: torch.Tensor
    rejected_token_logp_sums: torch.Tensor
    chosen_token_counts: torch.Tensor
    rejected_token_counts: torch.Tensor
    num_tokens: int | torch.Tensor | None


def safedpo_objective(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    transform: SafetyTransform,
    *,
    delta: float,
    options: LossOptions,
    reduction: str,
    num_kept_pairs: int | torch.Tensor | None,
    nll: NLLTerm | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """The loss on already-validated inputs (shared by the functional API and the fused modules).

    Returns ``(loss, metrics, nll)``: metrics are per-call means over the kept pairs (0-dim
    float32); nll the NLL term (before alpha) in the loss dtype, or None without one.
    """
    pc = policy_chosen_logps
    dtype = _compute_dtype(pc)
    keep, swap, sv = transform

    def ordered(chosen: torch.Tensor | None, rejected: torch.Tensor | None):
        if chosen is None:
            return None, None
        return torch.where(swap, rejected, chosen), torch.where(swap, chosen, rejected)

    pw, pl = ordered(pc.to(dtype), policy_rejected_logps.to(dtype))
    rw, rl = ordered(None if ref_chosen_logps is None else ref_chosen_logps.to(dtype),
                     None if ref_rejected_logps is None else ref_rejected_logps.to(dtype))
    cr = pw if rw is None else pw - rw
    rr = pl if rl is None else pl - rl
    margin = sv.to(dtype) * float(delta)
    # Mask before and after the loss: a dropped pair's log-probs (even inf/NaN ones) then get an
    # exact zero gradient instead of 0 * NaN.
    zero = torch.zeros_like(cr)
    g = pair_losses(torch.where(keep, cr, zero), torch.where(keep, rr, zero), margin, options)
    per_pair = torch.where(keep, g, zero)
    n_kept = keep.sum()
    if reduction == "mean":
        denom = n_kept if num_kept_pairs is None else num_kept_pairs
        if isinstance(denom, torch.Tensor):
            denom = denom.to(device=per_pair.device, dtype=dtype).clamp(min=1)
        else:
            denom = max(int(denom), 1)
        loss = per_pair.sum() / denom
    elif reduction == "sum":
        loss = per_pair.sum()
    else:
        loss = per_pair
    nll_value = None
    if nll is not None:
        sums_w, _ = ordered(nll.chosen_token_logp_sums.to(dtype), nll.rejected_token_logp_sums.to(dtype))
        counts_w, _ = ordered(nll.chosen_token_counts, nll.rejected_token_counts)
        nll_sum = -torch.where(keep, sums_w, zero).sum()
        tokens = nll.num_tokens
        if tokens is None:
            tokens = torch.where(keep, counts_w, torch.zeros_like(counts_w)).sum()
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.to(device=nll_sum.device, dtype=dtype).clamp(min=1)
        else:
            tokens = max(int(tokens), 1)
        nll_value = nll_sum / tokens
        loss = loss + nll.alpha * nll_value
    with torch.no_grad():
        count = n_kept.to(dtype)
        beta = options.beta
        cw, cl = beta * cr.detach(), beta * rr.detach()
        metrics = {
            "loss": _masked_mean(per_pair.detach(), keep, count),
            "rewards/chosen": _masked_mean(cw, keep, count),
            "rewards/rejected": _masked_mean(cl, keep, count),
            "rewards/margins": _masked_mean(cw - cl, keep, count),
            "rewards/accuracies": _masked_mean((cw > cl).to(dtype), keep, count),
            "logps/chosen": _masked_mean(pw.detach(), keep, count),
            "logps/rejected": _masked_mean(pl.detach(), keep, count),
        }
        if nll_value is not None:
            metrics["nll_loss"] = nll_value.detach()
        metrics = {k: v.float() for k, v in metrics.items()}
    return loss, metrics, nll_value


def _check_ref(ref_chosen_logps: object, ref_rejected_logps: object) -> bool:
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("ref_chosen_logps and ref_rejected_logps: expected both (a reference) or neither "
                         "(reference-free)")
    return ref_chosen_logps is not None


def _nll_term(rpo_alpha: float, policy_chosen_logps, policy_rejected_logps, chosen_token_counts,
              rejected_token_counts, average_log_prob: bool, num_nll_tokens, reduction: str, size: int,
              device) -> NLLTerm | None:
    rpo_alpha = check_nonnegative_finite("rpo_alpha", rpo_alpha)
    num_nll_tokens = check_count("num_nll_tokens", num_nll_tokens)
    if rpo_alpha == 0:
        if num_nll_tokens is not None:
            raise ValueError("num_nll_tokens: given but rpo_alpha=0 (no NLL term)")
        return None
    if reduction == "none":
        raise ValueError("reduction: 'none' cannot carry the NLL term (rpo_alpha > 0), a token mean over the "
                         "batch; use 'mean' or 'sum'")
    counts = []
    for name, value in (("chosen_token_counts", chosen_token_counts), ("rejected_token_counts", rejected_token_counts)):
        if value is None:
            raise ValueError(f"{name}: required when rpo_alpha > 0 (the NLL term is a mean over tokens)")
        t = check_tensor(name, value)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or tuple(t.shape) != (size,):
            raise ValueError(f"{name}: expected an integer tensor of shape ({size},), got {t.dtype} "
                             f"{tuple(t.shape)}")
        counts.append(t.to(device))
    sums = [policy_chosen_logps, policy_rejected_logps]
    if average_log_prob:
        sums = [s * c.to(s.dtype) for s, c in zip(sums, counts)]
    return NLLTerm(float(rpo_alpha), sums[0], sums[1], counts[0], counts[1], num_nll_tokens)


def safedpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    chosen_unsafe: torch.Tensor,
    rejected_unsafe: torch.Tensor,
    *,
    beta: float = 0.1,
    delta: float = 10.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    reduction: str = "mean",
    num_kept_pairs: int | torch.Tensor | None = None,
    rpo_alpha: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
    rejected_token_counts: torch.Tensor | None = None,
    average_log_prob: bool = False,
    num_nll_tokens: int | torch.Tensor | None = None,
    return_metrics: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SafeDPO / SafeDAA loss (paper Eq. 12 for ``loss_type="sigmoid"``), applying T(D) on the fly.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) float sequence log-probs of the helpfulness
            winner ("chosen") and loser. Sums over the response tokens, except for
            ``loss_type`` in :data:`AVERAGED_LOSS_TYPES` ("ipo", "sigmoid_norm"), which TRL defines on
            per-token means: pass means (policy and reference alike) for those.
        ref_chosen_logps, ref_rejected_logps: (B,) reference log-probs, or both None for the
            reference-free loss (reference log-probs taken as 0).
        chosen_unsafe, rejected_unsafe: (B,) bool or 0/1 unsafe flags (1 = unsafe).
        beta: KL strength, > 0. delta: safety margin in logit units, >= 0 (outside beta); it enters
            each loss as ``b -> b + delta`` on the (unsafe) loser's reward of safe-vs-unsafe pairs.
        loss_type: one of :data:`LOSS_TYPES` (TRL's formulas). label_smoothing: cDPO for "sigmoid",
            the flip rate for "robust" (in [0, 0.5)), epsilon for "exo_pair" (in (0, 1)); must be 0
            for the others. discopop_tau: DiscoPOP temperature (> 0).
        reduction: "mean" over kept pairs, "sum", or "none" for (B,) with 0 on dropped pairs.
        num_kept_pairs: with reduction="mean", the number of kept pairs of the whole optimizer step
            (all micro-batches and ranks, see :func:`count_kept_pairs`); the loss is then this call's
            sum over kept pairs divided by it, so accumulated gradients equal one big batch's.
            None: this call's mean. Not checked against this call's count (that would need a sync).
        rpo_alpha: weight of the NLL (RPO) term, 0 = none. The term is Liger's ``compute_nll_loss``
            / TRL's "sft" loss: the mean over tokens of -log pi of the *winners after T(D)* (never an
            unsafe response; dropped pairs contribute nothing); it needs ``chosen_token_counts`` and
            ``rejected_token_counts`` (B,) int, the responses' trained-token counts, and
            ``average_log_prob=True`` when the given log-probs are per-token means.
            ``num_nll_tokens``: the step-wide winner-token count for exact accumulation (like
            num_kept_pairs). The NLL term is added to the reduced loss ("mean" or "sum").
        return_metrics: also return the spec's metrics (0-dim float32 tensors, per-call means over
            kept pairs after T(D)) plus ``safety/safe_vs_unsafe_frac`` (over all B pairs), pair
            counts and, with rpo_alpha > 0, ``nll_loss``.

    Returns:
        loss (0-dim, or (B,) with reduction="none"), float32 (float64 for float64 inputs);
        with ``return_metrics`` the tuple ``(loss, metrics)``.
    """
    return _functional_loss(
        (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps),
        (chosen_unsafe, rejected_unsafe), beta=beta, delta=delta, loss_type=loss_type,
        label_smoothing=label_smoothing, discopop_tau=discopop_tau, reduction=reduction,
        count=("num_kept_pairs", num_kept_pairs), rpo_alpha=rpo_alpha, token_counts=(chosen_token_counts,
        rejected_token_counts), average_log_prob=average_log_prob, num_nll_tokens=num_nll_tokens,
        return_metrics=return_metrics,
    )


def _functional_loss(logps, flags, *, beta, delta, loss_type, label_smoothing, discopop_tau, reduction, count,
                     rpo_alpha, token_counts, average_log_prob, num_nll_tokens, return_metrics):
    """Validation and dispatch shared by :func:`safedpo_loss` and :func:`dpo_loss` (flags None)."""
    n = 4 if _check_ref(logps[2], logps[3]) else 2
    ref = check_pair_logps(LOGP_NAMES[:n], logps[:n])
    _, delta = check_beta_delta(beta, delta)
    options = check_loss_options(beta, loss_type, label_smoothing, discopop_tau)
    check_choice("reduction", reduction, REDUCTIONS)
    count_name, normalizer = count
    normalizer = check_count(count_name, normalizer)
    if normalizer is not None and reduction != "mean":
        raise ValueError(f"{count_name}: only used with reduction='mean', got reduction={reduction!r}")
    if flags is None:
        t = all_kept(ref.shape[0], ref.device)
    else:
        cu, ru = _flag_pair(*flags, ref.shape[0], ref.device)
        t = SafetyTransform(keep=~(cu & ru), swap=cu & ~ru, safe_vs_unsafe=cu ^ ru)
    nll = _nll_term(rpo_alpha, logps[0], logps[1], *token_counts, average_log_prob, num_nll_tokens, reduction,
                    ref.shape[0], ref.device)
    loss, metrics, _ = safedpo_objective(*logps, t, delta=delta or 0.0, options=options, reduction=reduction,
                                         num_kept_pairs=normalizer, nll=nll)
    if not return_metrics:
        return loss
    if flags is not None:
        metrics.update(transform_metrics(t))
    return loss, metrics


def transform_metrics(t: SafetyTransform) -> dict[str, torch.Tensor]:
    """Share of safe-vs-unsafe pairs (over all B) and kept / swapped / dropped counts, float32."""
    batch = max(t.keep.shape[0], 1)
    return {
        "safety/safe_vs_unsafe_frac": t.safe_vs_unsafe.sum().float() / batch,
        "pairs/kept": t.keep.sum().float(),
        "pairs/swapped": t.swap.sum().float(),
        "pairs/dropped": (~t.keep).sum().float(),
    }


def all_kept(size: int, device: torch.device) -> SafetyTransform:
    """The identity transform (plain DPO): every pair kept, none swapped, no margin."""
    false = torch.zeros(size, dtype=torch.bool, device=device)
    return SafetyTransform(keep=~false, swap=false, safe_vs_unsafe=false)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    reduction: str = "mean",
    num_pairs: int | torch.Tensor | None = None,
    rpo_alpha: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
    rejected_token_counts: torch.Tensor | None = None,
    average_log_prob: bool = False,
    num_nll_tokens: int | torch.Tensor | None = None,
    return_metrics: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain DPO-family loss on (B,) sequence log-probs: the baselines SafeDPO is compared with.

    Same arguments, loss types, reductions and metrics as :func:`safedpo_loss`, without flags or
    margin; ``num_pairs`` is the step-wide pair count for exact accumulation (as num_kept_pairs).
    """
    return _functional_loss(
        (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps), None, beta=beta,
        delta=None, loss_type=loss_type, label_smoothing=label_smoothing, discopop_tau=discopop_tau,
        reduction=reduction, count=("num_pairs", num_pairs), rpo_alpha=rpo_alpha,
        token_counts=(chosen_token_counts, rejected_token_counts), average_log_prob=average_log_prob,
        num_nll_tokens=num_nll_tokens, return_metrics=return_metrics,
    )


__all__ = [
    "AVERAGED_LOSS_TYPES",
    "LABEL_SMOOTHING_LOSS_TYPES",
    "LOSS_TYPES",
    "SafetyTransform",
    "check_loss_options",
    "count_kept_pairs",
    "count_nll_tokens",
    "dpo_loss",
    "pair_losses",
    "safedpo_loss",
    "safety_transform",
]
