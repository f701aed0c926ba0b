"""Hidden states -> per-token log-probs -> sequence log-probs -> SafeDPO / DPO loss.

``FusedLinearSafeDPOLoss`` and ``FusedLinearDPOLoss`` are drop-in replacements for Liger-Kernel's
``LigerFusedLinearDPOLoss``: the same constructor arguments in the same positional order, the same
``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None)``
and the same return value ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean,
rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards))``. ``_input`` is (2B, T, H), the B
chosen rows first and the B rejected rows after them; ``target`` (2B, T) is already shifted
(``target[:, t]`` is the token predicted from ``_input[:, t]``), ``ignore_index`` on prompt and padding.
The (2B, T, V) logits are never materialized (see :func:`safedpo_kernels.linear_logprobs`).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from safedpo_kernels._checks import (
    IMPLS,
    check_beta_delta,
    check_choice,
    check_float_tensor,
    check_ignore_index,
    check_linear_inputs,
    check_logit_transform,
    check_tensor,
)
from safedpo_kernels.logprobs import linear_logprobs
from safedpo_kernels.losses import (
    AVERAGED_LOSS_TYPES,
    NLLTerm,
    check_nonnegative_finite,
    all_kept,
    check_count,
    check_loss_options,
    safedpo_objective,
    safety_transform,
    transform_metrics,
)

#: Rows of the head weight reduced at a time for the logits-mean metric (bounds its fp32 temporary).
_WEIGHT_MEAN_BLOCK = 8192
#: Hidden-state elements upcast at a time for the logits-mean metric.
_LOGITS_MEAN_BLOCK_ELEMS = 2**24


def _row_sums_counts(
    token_logps: torch.Tensor, target: torch.Tensor, ignore_index: int, cu_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence token log-prob sums and trained-token counts (int64), padded or packed layout."""
    valid = (target != ignore_index).long()
    if cu_seqlens is None:
        return token_logps.sum(-1), valid.sum(-1)
    total = token_logps.shape[0]
    check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens: expected a 1-D integer tensor (S + 1,), got {tuple(cu_seqlens.shape)} "
                         f"{cu_seqlens.dtype}")
    cu = cu_seqlens.to(device=token_logps.device, dtype=torch.long)
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"cu_seqlens: expected non-decreasing offsets from 0 to the number of tokens ({total}), got {cu.tolist()}"
        )
    lengths = cu[1:] - cu[:-1]
    seq_id = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    sums = torch.zeros(lengths.numel(), dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, seq_id, token_logps)
    counts = torch.zeros(lengths.numel(), dtype=torch.long, device=cu.device).index_add(0, seq_id, valid)
    return sums, counts


def _check_target_matches(token_logps: torch.Tensor, target: object) -> torch.Tensor:
    t = check_tensor("target", target)
    if tuple(t.shape) != tuple(token_logps.shape):
        raise ValueError(f"target: expected the shape of token_logps {tuple(token_logps.shape)}, got {tuple(t.shape)}")
    return t


def sequence_logps(
    token_logps: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, average: bool = False
) -> torch.Tensor:
    """Sequence log-probs from token log-probs.

    token_logps (rows, T) float with 0 at ignored positions, target (rows, T) int, the same shape.
    Returns (rows,): the sum over non-ignored tokens, or with ``average`` their mean (0 for a row
    with none).
    """
    check_float_tensor("token_logps", token_logps)
    _check_target_matches(token_logps, target)
    ignore_index = check_ignore_index("ignore_index", ignore_index)
    sums, counts = _row_sums_counts(token_logps, target, ignore_index, None)
    return sums / counts.clamp(min=1).to(sums.dtype) if average else sums


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
    check_float_tensor("token_logps", token_logps)
    _check_target_matches(token_logps, target)
    ignore_index = check_ignore_index("ignore_index", ignore_index)
    sums, counts = _row_sums_counts(token_logps, target, ignore_index, cu_seqlens)
    return sums / counts.clamp(min=1).to(sums.dtype) if average else sums


def _weight_column_mean(weight: torch.Tensor) -> torch.Tensor:
    """mean over the vocabulary of ``weight`` (V, H) -> (H,) float32 (float64 for float64), blockwise."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    acc = torch.zeros(weight.shape[1], dtype=dtype, device=weight.device)
    for start in range(0, weight.shape[0], _WEIGHT_MEAN_BLOCK):
        acc += weight[start:start + _WEIGHT_MEAN_BLOCK].to(dtype).sum(0)
    return acc / max(weight.shape[0], 1)


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


class _FusedLinearPreferenceLoss(nn.Module):
    """Shared constructor and forward of the fused SafeDPO and DPO modules (Liger's argument order)."""

    def __init__(
        self,
        ignore_index: int,
        beta: float,
        alpha: float,
        compute_nll_loss: bool,
        compiled: bool,
        use_ref_model: bool,
        average_log_prob: bool,
        chunk_size: int,
        loss_type: str,
        label_smoothing: float,
        discopop_tau: float,
        *,
        delta: float | None,
        impl: str,
        logit_scale: float,
        softcap: float | None,
    ):
        super().__init__()
        beta, delta = check_beta_delta(beta, delta)
        self.options = check_loss_options(beta, loss_type, label_smoothing, discopop_tau)
        check_choice("impl", impl, IMPLS)
        self.ignore_index = check_ignore_index("ignore_index", ignore_index)
        alpha = check_nonnegative_finite("alpha", alpha)
        self.compute_nll_loss = _check_flag("compute_nll_loss", compute_nll_loss)
        self.compiled = _check_flag("compiled", compiled)
        self.use_ref_model = _check_flag("use_ref_model", use_ref_model)
        self.average_log_prob = _check_flag("average_log_prob", average_log_prob)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
            raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
        logit_scale, softcap = check_logit_transform(logit_scale, softcap)
        self.beta, self.alpha = float(beta), float(alpha)
        self.delta = None if delta is None else float(delta)
        self.chunk_size = int(chunk_size)
        self.loss_type, self.label_smoothing, self.discopop_tau = loss_type, self.options.label_smoothing, \
            self.options.discopop_tau
        self.impl = impl
        self.logit_scale = float(logit_scale)
        self.softcap = None if softcap is None else float(softcap)

    @property
    def averages_log_probs(self) -> bool:
        """Sequence log-probs are per-token means (``average_log_prob`` or an averaged loss type, e.g. IPO)."""
        return self.average_log_prob or self.loss_type in AVERAGED_LOSS_TYPES

    def _token_logps(self, weight, hidden, target, bias, cu_seqlens, names):
        hidden_name = names[0]
        check_float_tensor(hidden_name, hidden)
        check_tensor(names[2], target)
        if cu_seqlens is None:
            if hidden.dim() != 3:
                raise ValueError(f"{hidden_name}: expected shape (2B, T, H), got {tuple(hidden.shape)}")
            if hidden.shape[0] % 2:
                raise ValueError(f"{hidden_name}: expected an even number of rows (B chosen then B rejected), "
                                 f"got {hidden.shape[0]}")
        check_linear_inputs(hidden, weight, target, bias, self.ignore_index, names=names)
        return linear_logprobs(hidden, weight, target, bias=bias, ignore_index=self.ignore_index, impl=self.impl,
                               logit_scale=self.logit_scale, softcap=self.softcap)

    def _sums_counts(self, tok, target, cu_seqlens):
        if cu_seqlens is None:
            return _row_sums_counts(tok, target, self.ignore_index, None)
        sums, counts = _row_sums_counts(tok.reshape(-1), target.reshape(-1), self.ignore_index, cu_seqlens)
        if sums.shape[0] % 2:
            raise ValueError(
                f"cu_seqlens: expected an even number of sequences (B chosen then B rejected), got {sums.shape[0]}")
        return sums, counts

    def _seq(self, sums, counts):
        return sums / counts.clamp(min=1).to(sums.dtype) if self.averages_log_probs else sums

    def _reference(self, lin_weight, target, bias, ref_input, ref_weight, ref_bias, ref_chosen_logps,
                   ref_rejected_logps, cu_seqlens, b, like):
        """-> (ref chosen (B,), ref rejected (B,)) or (None, None) without a reference model."""
        given = {"ref_input": ref_input, "ref_weight": ref_weight, "ref_bias": ref_bias,
                 "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
        if not self.use_ref_model:
            for name, value in given.items():
                if value is not None:
                    raise ValueError(f"{name}: given but use_ref_model=False (reference-free loss); pass "
                                     "use_ref_model=True to use it")
            return None, None
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            if ref_chosen_logps is None or ref_rejected_logps is None:
                raise ValueError("ref_chosen_logps and ref_rejected_logps: expected both or neither")
            for name in ("ref_input", "ref_weight", "ref_bias"):
                if given[name] is not None:
                    raise ValueError(f"{name}: expected None when ref_chosen_logps/ref_rejected_logps are given")
            ref_c, ref_r = ref_chosen_logps, ref_rejected_logps
        elif ref_input is not None:
            # The reference head: ref_weight (with ref_bias, None = no bias) or, without ref_weight, the
            # policy's weight with ref_bias if given, else the policy's bias.
            weight = lin_weight if ref_weight is None else ref_weight
            rbias = ref_bias if (ref_bias is not None or ref_weight is not None) else bias
            with torch.no_grad():
                tok = self._token_logps(weight.detach(), ref_input.detach(), target,
                                        None if rbias is None else rbias.detach(), cu_seqlens,
                                        ("ref_input", "ref_weight" if ref_weight is not None else "lin_weight",
                                         "target", "ref_bias" if ref_bias is not None else "bias"))
                ref = self._seq(*self._sums_counts(tok, target, cu_seqlens))
            ref_c, ref_r = ref[:b], ref[b:]
        else:
            if ref_weight is not None or ref_bias is not None:
                raise ValueError("ref_input: expected the reference hidden states with ref_weight/ref_bias")
            raise ValueError(
                "ref_input / ref_chosen_logps: use_ref_model=True needs reference hidden states (ref_input) or "
                "precomputed reference log-probs (ref_chosen_logps and ref_rejected_logps); pass "
                "use_ref_model=False for the reference-free loss"
            )
        for name, t in (("ref_chosen_logps", ref_c), ("ref_rejected_logps", ref_r)):
            check_float_tensor(name, t)
            if tuple(t.shape) != (b,):
                raise ValueError(f"{name}: expected shape ({b},), got {tuple(t.shape)}")
        return ref_c.to(like.device, like.dtype), ref_r.to(like.device, like.dtype)

    def _logits_means(self, lin_weight, _input, bias, cu_seqlens, b):
        """Liger's chosen/rejected logits means (over all positions of the rows and the vocabulary),
        from ``h . mean(W) + mean(b)`` without logits. With ``softcap`` the pre-cap logits' mean."""
        with torch.no_grad():
            w_mean = _weight_column_mean(lin_weight.detach())
            b_mean = 0.0 if bias is None else bias.detach().to(w_mean.dtype).mean()
            flat = _input.detach().reshape(-1, _input.shape[-1])
            # Upcast a bounded block of hidden states at a time (never a full float32 copy).
            step = max(1, _LOGITS_MEAN_BLOCK_ELEMS // max(flat.shape[1], 1))
            per_token = torch.cat([flat[i:i + step].to(w_mean.dtype) @ w_mean for i in range(0, flat.shape[0], step)]
                                  or [w_mean.new_zeros(0)])
            split = per_token.shape[0] // 2 if cu_seqlens is None else int(cu_seqlens[b])
            means = []
            for part in (per_token[:split], per_token[split:]):
                means.append(self.logit_scale * (part.sum() / max(part.numel(), 1) + b_mean))
            return means[0], means[1]

    def _forward(self, lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias, transform_fn,
                 ref_chosen_logps, ref_rejected_logps, cu_seqlens, num_pairs, num_nll_tokens, return_metrics):
        num_pairs = check_count("num_kept_pairs" if self.delta is not None else "num_pairs", num_pairs)
        num_nll_tokens = check_count("num_nll_tokens", num_nll_tokens)
        if num_nll_tokens is not None and not self.compute_nll_loss:
            raise ValueError("num_nll_tokens: given but compute_nll_loss=False (no NLL term)")
        tok = self._token_logps(lin_weight, _input, target, bias, cu_seqlens, ("_input", "lin_weight", "target", "bias"))
        sums, counts = self._sums_counts(tok, target, cu_seqlens)
        logps = self._seq(sums, counts)
        b = logps.shape[0] // 2
        pc, pr = logps[:b], logps[b:]
        rc, rr = self._reference(lin_weight, target, bias, ref_input, ref_weight, ref_bias, ref_chosen_logps,
                                 ref_rejected_logps, cu_seqlens, b, logps)
        transform = transform_fn(b, logps.device)
        nll = None
        if self.compute_nll_loss:
            nll = NLLTerm(self.alpha, sums[:b], sums[b:], counts[:b], counts[b:], num_nll_tokens)
        loss, metrics, nll_value = safedpo_objective(pc, pr, rc, rr, transform, delta=self.delta or 0.0,
                                                     options=self.options, reduction="mean",
                                                     num_kept_pairs=num_pairs, nll=nll)
        chosen_rewards = self.beta * (pc if rc is None else pc - rc)
        rejected_rewards = self.beta * (pr if rr is None else pr - rr)
        chosen_mean, rejected_mean = self._logits_means(lin_weight, _input, bias, cu_seqlens, b)
        nll_loss = nll_value.detach() if nll_value is not None else torch.zeros((), dtype=loss.dtype,
                                                                                 device=loss.device)
        aux = (pc, pr, chosen_mean, rejected_mean, nll_loss, chosen_rewards, rejected_rewards)
        if not return_metrics:
            return loss, aux
        if self.delta is not None:
            metrics.update(transform_metrics(transform))
        return loss, aux, metrics

    def extra_repr(self) -> str:
        delta = "" if self.delta is None else f", delta={self.delta}"
        return (f"beta={self.beta}{delta}, loss_type={self.loss_type!r}, ignore_index={self.ignore_index}, "
                f"use_ref_model={self.use_ref_model}, average_log_prob={self.average_log_prob}, "
                f"compute_nll_loss={self.compute_nll_loss}, alpha={self.alpha}, impl={self.impl!r}")


_ARGS_DOC = """
    Args (positional in this order, as ``LigerFusedLinearDPOLoss``):
        ignore_index: label of untrained tokens (prompt, padding).
        beta: KL strength (> 0).
        alpha: weight of the NLL term (used with ``compute_nll_loss``).
        compute_nll_loss: add ``alpha *`` the NLL (RPO) term: the mean over tokens of -log pi of the
            chosen responses (for SafeDPO: of the winners after T(D), never an unsafe response).
        compiled: accepted for Liger compatibility, a no-op (nothing here is torch.compile'd).
        use_ref_model: False = reference-free loss (reference log-probs taken as 0).
        average_log_prob: per-token mean instead of sum of token log-probs per sequence (always on
            for ``loss_type`` "ipo" and "sigmoid_norm", which TRL defines on means).
        chunk_size: accepted for Liger compatibility, a no-op (memory is bounded by the log-prob
            kernels' own chunking, not by pairs).
        loss_type: one of :data:`safedpo_kernels.LOSS_TYPES`. label_smoothing, discopop_tau: as in
            :func:`safedpo_kernels.safedpo_loss`.
    Keyword-only:
        impl: "auto" | "torch" | "triton" (see :func:`safedpo_kernels.linear_logprobs`).
        logit_scale, softcap: the head's logit transform (Cohere/Granite scale, Gemma 2 soft cap).
"""


class FusedLinearSafeDPOLoss(_FusedLinearPreferenceLoss):
    __doc__ = ("SafeDPO straight from the policy's last hidden states and lm_head weight (drop-in for Liger's "
               "LigerFusedLinearDPOLoss).\n" + _ARGS_DOC
               + "        delta: safety margin (>= 0, logit units, outside beta).\n")

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        *,
        delta: float = 10.0,
        impl: str = "auto",
        logit_scale: float = 1.0,
        softcap: float | None = None,
    ):
        super().__init__(ignore_index, beta, alpha, compute_nll_loss, compiled, use_ref_model, average_log_prob,
                         chunk_size, loss_type, label_smoothing, discopop_tau, delta=delta, impl=impl,
                         logit_scale=logit_scale, softcap=softcap)

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        *,
        chosen_unsafe: torch.Tensor | None = None,
        rejected_unsafe: torch.Tensor | None = None,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        num_kept_pairs: int | torch.Tensor | None = None,
        num_nll_tokens: int | torch.Tensor | None = None,
        return_metrics: bool = False,
    ):
        """SafeDPO loss, Liger's per-pair outputs and (optionally) the SafeDPO metrics.

        lin_weight (V, H); _input (2B, T, H), chosen rows then rejected rows; target (2B, T) shifted
        labels; bias (V,) or None. chosen_unsafe / rejected_unsafe (B,) bool or 0/1, keyword-only
        and required. The reference is ``ref_input`` (2B, T, H) hidden states through ``ref_weight``
        / ``ref_bias`` (without ``ref_weight``: the policy's weight, with ``ref_bias`` if given, else
        the policy's bias), run under no_grad, or precomputed ``ref_chosen_logps`` /
        ``ref_rejected_logps`` (B,) (per-token means when the module averages). Packed layout: _input
        (1, total, H) or (total, H), target (1, total) or (total,), ``cu_seqlens`` (2B + 1,).
        num_kept_pairs / num_nll_tokens: step-wide normalizers for exact gradient accumulation (see
        :func:`safedpo_kernels.safedpo_loss`).

        Returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
        nll_loss, chosen_rewards, rejected_rewards))`` as Liger does; with ``return_metrics`` a third
        element, the metrics dict of :func:`safedpo_kernels.safedpo_loss`. Per-pair tensors (B,) are in
        the caller's order (before T(D): a swapped pair's "chosen" is still the helpfulness winner,
        its reward ``beta * (logp - ref)``), and differentiable; loss float32 (float64 inputs:
        float64).
        """
        if chosen_unsafe is None or rejected_unsafe is None:
            legacy = any(isinstance(t, torch.Tensor) and not t.dtype.is_floating_point for t in (bias, ref_input))
            raise TypeError(
                "chosen_unsafe, rejected_unsafe: required keyword arguments (the (B,) unsafe flags)"
                + (": they look passed positionally, into bias/ref_input; the flags are keyword-only after "
                   "Liger's positional arguments: forward(lin_weight, _input, target, bias, ref_input, ref_weight, "
                   "ref_bias, *, chosen_unsafe=..., rejected_unsafe=...)" if legacy else "")
            )
        cu, ru = chosen_unsafe, rejected_unsafe

        def transform(b, device):
            check_tensor("chosen_unsafe", cu)
            check_tensor("rejected_unsafe", ru)
            for name, t in (("chosen_unsafe", cu), ("rejected_unsafe", ru)):
                if tuple(t.shape) != (b,):
                    raise ValueError(f"{name}: expected shape ({b},) (one flag per pair), got {tuple(t.shape)}")
            return safety_transform(cu.to(device), ru.to(device))

        return self._forward(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias, transform,
                             ref_chosen_logps, ref_rejected_logps, cu_seqlens, num_kept_pairs, num_nll_tokens,
                             return_metrics)


class FusedLinearDPOLoss(_FusedLinearPreferenceLoss):
    __doc__ = ("Plain DPO-family loss from hidden states (the paper's baselines); a drop-in for Liger's "
               "LigerFusedLinearDPOLoss.\n" + _ARGS_DOC)

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        *,
        impl: str = "auto",
        logit_scale: float = 1.0,
        softcap: float | None = None,
    ):
        super().__init__(ignore_index, beta, alpha, compute_nll_loss, compiled, use_ref_model, average_log_prob,
                         chunk_size, loss_type, label_smoothing, discopop_tau, delta=None, impl=impl,
                         logit_scale=logit_scale, softcap=softcap)

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        *,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        num_pairs: int | torch.Tensor | None = None,
        num_nll_tokens: int | torch.Tensor | None = None,
        return_metrics: bool = False,
    ):
        """As :meth:`FusedLinearSafeDPOLoss.forward` without flags; ``num_pairs`` the step-wide pair count."""
        return self._forward(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias, all_kept,
                             ref_chosen_logps, ref_rejected_logps, cu_seqlens, num_pairs, num_nll_tokens,
                             return_metrics)
