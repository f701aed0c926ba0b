"""Eager PyTorch references: what users run today, materializing the full logits.

These functions are deliberately plain (no chunking, no custom autograd) so that tests can run them
in float64 as ground truth and benchmarks can measure the cost of the materialized path. They use
``(tokens x vocab)`` memory: do not use them for training large vocabularies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safedpo_kernels._checks import check_ignore_index, check_linear_inputs, check_logit_transform


def reference_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """``log_softmax(l)[labels]`` with the full (..., V) logits in memory.

    ``z = hidden @ weight.T + bias``; ``l = softcap * tanh(logit_scale * z / softcap)`` with a cap,
    else ``l = logit_scale * z``. hidden (..., H), weight (V, H), labels (...) int. Returns float32
    (float64 for float64 inputs: the ground truth of the tests) with labels' shape, 0 where
    ``labels == ignore_index``. The matmul and bias add run in the input dtype (as an eager bf16
    model does), the transform and log-softmax in float32. Plain autograd: no chunking.
    """
    ignore_index = check_linear_inputs(hidden, weight, labels, bias, ignore_index)
    scale, cap = check_logit_transform(logit_scale, softcap)
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(out_dtype)
    if cap is not None:
        logits = cap * torch.tanh(logits * (scale / cap))
    elif scale != 1.0:
        logits = logits * scale
    logp = torch.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def reference_sequence_logps(
    token_logps: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, average: bool = False
) -> torch.Tensor:
    """Sum (or mean over non-ignored tokens, 0 for rows with none) of (rows, T) token log-probs."""
    ignore_index = check_ignore_index("ignore_index", ignore_index)
    valid = target != ignore_index
    total = torch.where(valid, token_logps, torch.zeros_like(token_logps)).sum(-1)
    if not average:
        return total
    return total / valid.sum(-1).clamp(min=1).to(total.dtype)


def reference_safedpo_loss(
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
):
    """SafeDPO written pair by pair, exactly as the paper's table and Eq. 12 read (a loop, no masks)."""
    losses, kept = [], []
    cw, cl, pw_all, pl_all = [], [], [], []
    zero = policy_chosen_logps.sum() * 0.0
    for i in range(policy_chosen_logps.shape[0]):
        hw, hl = bool(chosen_unsafe[i]), bool(rejected_unsafe[i])
        if hw and hl:  # both unsafe: drop
            losses.append(zero)
            continue
        if hw:  # winner unsafe, loser safe: swap
            pw, pl, rw, rl = (policy_rejected_logps[i], policy_chosen_logps[i],
                              ref_rejected_logps[i], ref_chosen_logps[i])
            h_w, h_l = 0, 1
        else:
            pw, pl, rw, rl = (policy_chosen_logps[i], policy_rejected_logps[i],
                              ref_chosen_logps[i], ref_rejected_logps[i])
            h_w, h_l = 0, int(hl)
        rew_w, rew_l = beta * (pw - rw), beta * (pl - rl)
        losses.append(-F.logsigmoid(rew_w - rew_l - (h_l - h_w) * delta))
        kept.append(i)
        cw.append(rew_w)
        cl.append(rew_l)
        pw_all.append(pw)
        pl_all.append(pl)
    per_pair = torch.stack(losses) if losses else policy_chosen_logps * 0.0
    if reduction == "none":
        loss = per_pair
    elif reduction == "sum":
        loss = per_pair.sum()
    else:
        loss = per_pair.sum() / max(len(kept), 1)
    if not return_metrics:
        return loss

    def mean(xs):
        return (torch.stack(xs).detach().mean() if xs else zero.detach()).float()

    metrics = {
        "loss": mean([losses[i] for i in kept]),
        "rewards/chosen": mean(cw),
        "rewards/rejected": mean(cl),
        "rewards/margins": mean([a - b for a, b in zip(cw, cl)]),
        "rewards/accuracies": mean([(a > b).to(zero.dtype) for a, b in zip(cw, cl)]),
        "logps/chosen": mean(pw_all),
        "logps/rejected": mean(pl_all),
    }
    return loss, metrics


def reference_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
    return_metrics: bool = False,
):
    """Plain DPO: SafeDPO with every pair safe and no margin."""
    flags = torch.zeros(policy_chosen_logps.shape[0], dtype=torch.bool)
    return reference_safedpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        flags, flags, beta=beta, delta=0.0, reduction=reduction, return_metrics=return_metrics,
    )


def reference_fused_safedpo(
    lin_weight: torch.Tensor,
    _input: torch.Tensor,
    target: torch.Tensor,
    chosen_unsafe: torch.Tensor,
    rejected_unsafe: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_input: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    delta: float = 10.0,
    ignore_index: int = -100,
    average_log_prob: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
):
    """Eager SafeDPO from hidden states (2B, T, H): materialized logits, then the loss. -> (loss, metrics).

    ``logit_scale`` / ``softcap`` apply to the policy and the reference head alike.
    """
    head = {"logit_scale": logit_scale, "softcap": softcap}
    token_logps = reference_linear_logprobs(_input, lin_weight, target, bias=bias, ignore_index=ignore_index, **head)
    seq = reference_sequence_logps(token_logps, target, ignore_index=ignore_index, average=average_log_prob)
    b = seq.shape[0] // 2
    if ref_bias is not None and ref_weight is None:
        raise ValueError("ref_bias: given without ref_weight (the reference head would use bias instead)")
    if ref_chosen_logps is None:
        with torch.no_grad():
            rw = lin_weight if ref_weight is None else ref_weight
            rb = (bias if ref_weight is None else ref_bias)
            ref_tok = reference_linear_logprobs(ref_input, rw, target, bias=rb, ignore_index=ignore_index, **head)
            ref_seq = reference_sequence_logps(ref_tok, target, ignore_index=ignore_index, average=average_log_prob)
        ref_chosen_logps, ref_rejected_logps = ref_seq[:b], ref_seq[b:]
    return reference_safedpo_loss(
        seq[:b], seq[b:], ref_chosen_logps.to(seq.dtype), ref_rejected_logps.to(seq.dtype),
        chosen_unsafe, rejected_unsafe, beta=beta, delta=delta, return_metrics=True,
    )
