"""Frozen-head forward: log-probs plus d logp / d hidden in one sweep over the vocabulary (4NHV).

When the head (weight, bias) is frozen and only ``hidden`` needs a gradient,

    d logp_i / d hidden_i = s_y W[y] - sum_v p_v s_v W[v],   s_v = d logit_v / d z_v

(``s_v = logit_scale``, or ``logit_scale * (1 - (logit_v / softcap)**2)`` under a softcap, with
z = hidden @ weight.T + bias). The softmax-weighted row sum is accumulated in the forward sweep
itself, flash-attention style: with the running max m, ``acc = sum_{v != y} exp(logit_v - m) s_v
W[v]`` is rescaled by exp(m_old - m_new) whenever m moves, and divided by the running sum of
exponentials at the end. The label column is left out of ``acc`` and enters as ``(1 - p_y) s_y
W[y]`` with 1 - p_y from the other columns' sum, so a confident token (p_y ~ 1) keeps its small
gradient accurately. The kernel stores

    R_i = (1 - p_y) s_y W[y] - acc_i / sum_i      (float32, (M, H), the "frozen buffer")

and the backward is the elementwise ``grad_hidden = g[:, None] * R``: no matmul over V.

Memory/traffic: ``acc`` lives in the float32 R rows of the program's token block (in global
memory, owned by the program: no atomics, deterministic), walked in BLOCK_H slices after each
vocabulary block: a (BLOCK_M, BLOCK_H) register tile at a time, so any H fits. This reads and
writes BLOCK_M x H floats per vocabulary block (arithmetic intensity ~BLOCK_V / 2 FLOP per byte
of accumulator traffic; docs/kernels.md discusses it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from safedpo_kernels.kernels.common import (
    INTERPRETING,
    device_arch_and_sms,
    dot_precision,
    load_k_slice,
    logit_slope,
    logits_tile,
    upcast_flag,
)
from safedpo_kernels.kernels.config import BlockConfig, pick_config


@triton.jit
def _exp_tile(logits, offs_v, labels, new_max, logit_scale, softcap, V, HAS_SOFTCAP: tl.constexpr):
    """For one logits tile and the new running max: (sum of exp, sum of exp over non-label columns,
    label logit or 0, 0/NaN non-finite marker, per row) and coef = exp(logit - max) * slope with
    the label column zeroed (float32)."""
    mask_v = offs_v < V
    hit = offs_v[None, :] == labels[:, None]
    e = tl.exp(logits - new_max[:, None])
    e_other = tl.where(hit, 0.0, e)
    coef = e_other * logit_slope(logits, mask_v, logit_scale, softcap, HAS_SOFTCAP)
    nonfinite = tl.sum(tl.where(mask_v[None, :], logits, 0.0) * 0.0, axis=1)
    target = tl.sum(tl.where(hit, logits, 0.0), axis=1)
    return tl.sum(e, axis=1), tl.sum(e_other, axis=1), target, nonfinite, coef


@triton.jit
def _frozen_forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, tgt_ptr, other_ptr, r_ptr,
    M, V, H, stride_hm, stride_hk, stride_wv, stride_wk, stride_rm,
    logit_scale, softcap,
    # Meta-parameters
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PAIR: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    labels = tl.load(labels_ptr + offs_m, mask=mask_m, other=-1)
    offs_k = tl.arange(0, BLOCK_H)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    run_comp = tl.zeros((BLOCK_M,), dtype=tl.float32)  # Kahan compensation of run_sum
    run_other = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    nonfinite = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # PAIR: two vocabulary blocks per step (one accumulator load/store for both: half the traffic)
    for vb in range(0, tl.cdiv(V, BLOCK_V), 1 + PAIR):
        offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        logits = logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_m, offs_v, M, V, H,
            stride_hm, stride_hk, stride_wv, stride_wk, logit_scale, softcap,
            HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        tile_max = tl.max(logits, axis=1)
        if PAIR:  # columns >= V (past the last block) are -inf: they add nothing
            offs_v2 = offs_v + BLOCK_V
            logits2 = logits_tile(
                hidden_ptr, weight_ptr, bias_ptr, offs_m, offs_v2, M, V, H,
                stride_hm, stride_hk, stride_wv, stride_wk, logit_scale, softcap,
                HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H,
            )  # fmt: skip
            tile_max = tl.maximum(tile_max, tl.max(logits2, axis=1))
        # ---- online LSE (as in forward.py), plus the non-label sum and the target logit ----
        new_max = tl.maximum(run_max, tile_max)
        scale = tl.exp(run_max - new_max)
        sum_e, sum_other, tgt, bad, coef = _exp_tile(
            logits, offs_v, labels, new_max, logit_scale, softcap, V, HAS_SOFTCAP
        )
        if PAIR:
            sum_e2, sum_other2, tgt2, bad2, coef2 = _exp_tile(
                logits2, offs_v2, labels, new_max, logit_scale, softcap, V, HAS_SOFTCAP
            )
            sum_e += sum_e2
            sum_other += sum_other2
            tgt += tgt2
            bad += bad2
        nonfinite += bad
        target += tgt
        run_other = run_other * scale + sum_other
        term = sum_e - run_comp * scale
        run_sum = run_sum * scale
        total = run_sum + term
        run_comp = (total - run_sum) - term
        run_sum = total
        run_max = new_max
        # ---- acc[m, k] = acc[m, k] * scale[m] + sum_{v != y} e[m, v] s[m, v] W[v, k] ----
        if not UPCAST:
            coef = coef.to(hidden_ptr.dtype.element_ty)
            if PAIR:
                coef2 = coef2.to(hidden_ptr.dtype.element_ty)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + offs_k
            mask_k = ks < H
            r_ptrs = r_ptr + offs_m[:, None].to(tl.int64) * stride_rm + ks[None, :]
            mask = mask_m[:, None] & mask_k[None, :]
            acc = tl.load(r_ptrs, mask=mask, other=0.0) * scale[:, None]
            w = load_k_slice(weight_ptr, offs_v, ks, stride_wv, stride_wk, offs_v < V, mask_k, UPCAST)
            acc = tl.dot(coef, w, acc, input_precision=DOT_PRECISION)
            if PAIR:
                w2 = load_k_slice(weight_ptr, offs_v2, ks, stride_wv, stride_wk, offs_v2 < V, mask_k, UPCAST)
                acc = tl.dot(coef2, w2, acc, input_precision=DOT_PRECISION)
            tl.store(r_ptrs, acc, mask=mask)

    # ---- R = (1 - p_y) s_y W[y] - acc / sum  (NaN for a row with a non-finite logit) ----
    lse = run_max + tl.log(run_sum) + nonfinite
    other = run_max + tl.log(run_other)
    omp = tl.exp(other - lse)
    omp = tl.where(omp < 0.5, omp, 1.0 - tl.exp(target - lse))  # as grad_logits_tile's label column
    if HAS_SOFTCAP:
        t = target / softcap
        slope_y = logit_scale * (1.0 - t * t)
    else:
        slope_y = logit_scale + 0.0 * target
    coef_y = omp * slope_y
    inv_sum = 1.0 / run_sum
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + offs_k
        mask_k = ks < H
        r_ptrs = r_ptr + offs_m[:, None].to(tl.int64) * stride_rm + ks[None, :]
        mask = mask_m[:, None] & mask_k[None, :]
        acc = tl.load(r_ptrs, mask=mask, other=0.0)
        w_y = load_k_slice(weight_ptr, labels, ks, stride_wv, stride_wk, mask_m, mask_k, UPCAST).to(tl.float32)
        r = coef_y[:, None] * w_y - acc * inv_sum[:, None] + nonfinite[:, None]
        tl.store(r_ptrs, r, mask=mask)
    tl.store(lse_ptr + offs_m, lse, mask=mask_m)
    tl.store(tgt_ptr + offs_m, target, mask=mask_m)
    tl.store(other_ptr + offs_m, other, mask=mask_m)


def frozen_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    pair: bool = False,
    config: BlockConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen-head forward. Shapes and dtypes as ``forward_logprobs``; ``pair``: the
    "frozen_pair" variant (two vocabulary blocks per accumulator update).

    Returns:
        ``(lse, target, other, grad_rows)``: float32 (M,) log-sum-exp, target logit and LSE of
        the non-target columns (combine with ``forward.finish_logprobs``), and float32 (M, H)
        ``R`` with ``d logp_i / d hidden_i = R_i``.
    """
    m, h = hidden.shape
    v = weight.shape[0]
    arch, _ = device_arch_and_sms(hidden.device)
    if config is None:  # no autotuning here: the kernel writes its own accumulator (not re-runnable)
        config = pick_config(
            "frozen", arch=arch, element_size=hidden.element_size(), sizes=(m, v, h), interpreting=INTERPRETING,
            softcap=softcap is not None, pair=pair,
        )
    labels = labels.contiguous()
    bias_arg = bias.contiguous() if bias is not None else hidden
    rows = lambda: torch.empty(m, dtype=torch.float32, device=hidden.device)  # noqa: E731
    lse, target, other = rows(), rows(), rows()
    grad_rows = torch.zeros((m, h), dtype=torch.float32, device=hidden.device)
    _frozen_forward_kernel[(triton.cdiv(m, config.block_m),)](
        hidden, weight, bias_arg, labels, lse, target, other, grad_rows,
        m, v, h, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), h,
        float(logit_scale), float(softcap or 1.0),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, PAIR=pair,
        UPCAST=upcast_flag(hidden.dtype), DOT_PRECISION=dot_precision(hidden.dtype), **config.meta(),
    )  # fmt: skip
    return lse, target, other, grad_rows
