"""Hidden states -> per-token log-probs -> sequence log-probs -> SafeDPO / DPO loss.

``FusedLinearSafeDPOLoss`` follows Liger-Kernel's ``LigerFusedLinearDPOLoss`` calling convention:
``forward(lin_weight, _input, target, ...)`` with ``_input`` (2B, T, H), the B chosen rows first and
the B rejected rows after them, and ``target`` (2B, T) already shifted (``target[:, t]`` is the token
predicted from ``_input[:, t]``), ``ignore_index`` on prompt and padding.
"""

from __future__ import annotations

import torch
from torch import nn

from safedpo_kernels._checks import (
    IMPLS,
    check_beta_delta,
    check_choice,
    check_float_tensor,
    check_tensor,
)
from safedpo_kernels.logprobs import linear_logprobs
from safedpo_kernels.losses import dpo_loss, safedpo_loss


def sequence_logps(
    token_logps: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, average: bool = False
) -> torch.Tensor:
    """Sequence log-probs from token log-probs.

    token_logps (rows, T) float with 0 at ignored positions, target (rows, T) int. Returns (rows,):
    the sum over non-ignored tokens, or with ``average`` their mean (0 for a row with none).
    """
    if average:
        count = (target != ignore_index).sum(-1).clamp(min=1)
        return token_logps.sum(-1) / count.to(token_logps.dtype)
    return token_logps.sum(-1)


def packed_sequence_logps(
    token_logps: torch.Tensor,
    target: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    ignore_index: int = -100,
    average: bool = False,
) -> torch.Tensor:
    """Per-sequence log-probs of a padding-free (packed) batch.

    token_logps (total,) and target (total,) flattened over the concatenated sequences;
    cu_seqlens (S + 1,) int, cumulative sequence starts (0 first, total last). Returns (S,).
    """
    total = token_logps.shape[0]
    check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens: expected a 1-D integer tensor (S + 1,), got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
    cu = cu_seqlens.to(device=token_logps.device, dtype=torch.long)
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"cu_seqlens: expected non-decreasing offsets from 0 to the number of tokens ({total}), "
            f"got {cu.tolist()}"
        )
    lengths = cu[1:] - cu[:-1]
    seq_id = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    sums = torch.zeros(lengths.numel(), dtype=token_logps.dtype, device=token_logps.device)
    sums = sums.index_add(0, seq_id, token_logps)
    if not average:
        return sums
    counts = torch.zeros(lengths.numel(), dtype=torch.long, device=cu.device)
    counts = counts.index_add(0, seq_id, (target != ignore_index).long())
    return sums / counts.clamp(min=1).to(sums.dtype)


class _FusedLinearPreferenceLoss(nn.Module):
    """Shared forward for the fused SafeDPO and DPO modules (hidden states to per-pair log-probs)."""

    def __init__(self, beta: float, delta: float | None, ignore_index: int, average_log_prob: bool, impl: str):
        super().__init__()
        check_beta_delta(beta, delta)
        check_choice("impl", impl, IMPLS)
        self.beta, self.delta = float(beta), delta
        self.ignore_index = int(ignore_index)
        self.average_log_prob = bool(average_log_prob)
        self.impl = impl

    def _seq_logps(self, weight, hidden, target, bias, cu_seqlens, hidden_name):
        check_float_tensor(hidden_name, hidden)
        check_tensor("target", target)
        if cu_seqlens is None:
            if hidden.dim() != 3:
                raise ValueError(f"{hidden_name}: expected shape (2B, T, H), got {tuple(hidden.shape)}")
            if hidden.shape[0] % 2:
                raise ValueError(
                    f"{hidden_name}: expected an even number of rows (B chosen then B rejected), got {hidden.shape[0]}"
                )
        tok = linear_logprobs(
            hidden, weight, target, bias=bias, ignore_index=self.ignore_index, impl=self.impl
        )
        if cu_seqlens is None:
            return sequence_logps(tok, target, ignore_index=self.ignore_index, average=self.average_log_prob)
        seq = packed_sequence_logps(
            tok.reshape(-1), target.reshape(-1), cu_seqlens, ignore_index=self.ignore_index,
            average=self.average_log_prob,
        )
        if seq.shape[0] % 2:
            raise ValueError(
                f"cu_seqlens: expected an even number of sequences (B chosen then B rejected), got {seq.shape[0]}"
            )
        return seq

    def _pair_logps(self, lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias,
                    ref_chosen_logps, ref_rejected_logps, cu_seqlens):
        """-> policy chosen, policy rejected, ref chosen, ref rejected, each (B,)."""
        seq = self._seq_logps(lin_weight, _input, target, bias, cu_seqlens, "_input")
        b = seq.shape[0] // 2
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            if ref_chosen_logps is None or ref_rejected_logps is None:
                raise ValueError("ref_chosen_logps and ref_rejected_logps: expected both or neither")
            if ref_input is not None:
                raise ValueError("ref_input: expected None when ref_chosen_logps/ref_rejected_logps are given")
            ref_c, ref_r = ref_chosen_logps, ref_rejected_logps
        elif ref_input is not None:
            weight = lin_weight if ref_weight is None else ref_weight
            rbias = bias if ref_weight is None else ref_bias
            with torch.no_grad():
                ref = self._seq_logps(weight.detach(), ref_input.detach(), target,
                                      None if rbias is None else rbias.detach(), cu_seqlens, "ref_input")
            ref_c, ref_r = ref[:b], ref[b:]
        else:
            raise ValueError(
                "ref_input / ref_chosen_logps: expected reference hidden states (ref_input) or "
                "precomputed reference log-probs (ref_chosen_logps and ref_rejected_logps)"
            )
        for name, t in (("ref_chosen_logps", ref_c), ("ref_rejected_logps", ref_r)):
            check_float_tensor(name, t)
            if tuple(t.shape) != (b,):
                raise ValueError(f"{name}: expected shape ({b},), got {tuple(t.shape)}")
        return seq[:b], seq[b:], ref_c.to(seq.device, seq.dtype), ref_r.to(seq.device, seq.dtype)


class FusedLinearSafeDPOLoss(_FusedLinearPreferenceLoss):
    """SafeDPO straight from the policy's last hidden states and lm_head weight (Liger-style module).

    Args:
        beta: KL strength (> 0). delta: safety margin (>= 0). ignore_index: label of untrained tokens.
        average_log_prob: mean instead of sum of token log-probs per sequence.
        impl: "auto" | "torch" | "triton", passed to :func:`linear_logprobs`.
    """

    def __init__(
        self,
        beta: float = 0.1,
        delta: float = 10.0,
        ignore_index: int = -100,
        average_log_prob: bool = False,
        impl: str = "auto",
    ):
        super().__init__(beta, delta, ignore_index, average_log_prob, impl)

    def forward(
        self,
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
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """SafeDPO loss and metrics.

        lin_weight (V, H); _input (2B, T, H), chosen rows then rejected rows; target (2B, T) shifted
        labels; chosen_unsafe / rejected_unsafe (B,) bool or 0/1; bias (V,) or None. The reference is
        either ``ref_input`` (2B, T, H) hidden states (with ``ref_weight``/``ref_bias``, defaulting to
        the policy's head, run under no_grad) or precomputed ``ref_chosen_logps``/``ref_rejected_logps``
        (B,). Packed layout: _input (1, total, H) or (total, H), target (1, total) or (total,),
        ``cu_seqlens`` (2B + 1,). Returns ``(loss, metrics)``, loss a 0-dim float32 tensor.
        """
        pc, pr, rc, rr = self._pair_logps(lin_weight, _input, target, bias, ref_input, ref_weight,
                                          ref_bias, ref_chosen_logps, ref_rejected_logps, cu_seqlens)
        return safedpo_loss(pc, pr, rc, rr, chosen_unsafe, rejected_unsafe, beta=self.beta,
                            delta=self.delta, return_metrics=True)


class FusedLinearDPOLoss(_FusedLinearPreferenceLoss):
    """Plain DPO from hidden states (the paper's baselines); same conventions as FusedLinearSafeDPOLoss."""

    def __init__(self, beta: float = 0.1, ignore_index: int = -100, average_log_prob: bool = False,
                 impl: str = "auto"):
        super().__init__(beta, None, ignore_index, average_log_prob, impl)

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DPO loss and metrics; arguments as :meth:`FusedLinearSafeDPOLoss.forward` without flags."""
        pc, pr, rc, rr = self._pair_logps(lin_weight, _input, target, bias, ref_input, ref_weight,
                                          ref_bias, ref_chosen_logps, ref_rejected_logps, cu_seqlens)
        return dpo_loss(pc, pr, rc, rr, beta=self.beta, return_metrics=True)
