"""Deterministic backward kernels: each program owns its output rows, no atomics.

* ``_grad_hidden_kernel``: one program per token block walks the vocabulary blocks in increasing
  order and adds ``G @ W[v]`` into its rows of a float32 (M, H) accumulator.
* ``_grad_weight_kernel``: one program per vocabulary block walks the token blocks in increasing
  order and adds ``G.T @ hidden[m]`` into its rows of a float32 (V, H) accumulator; grad_bias is
  summed in registers and stored once.

Every output element is written by one program in a fixed order: bit-identical run to run. The
logits are recomputed in both kernels (10NHV FLOPs with the forward, against 8NHV for the atomics
path in ``backward.py``, whose launcher ``backward_logprobs`` launches these too).

``PAIR`` (the "det_pair" variant): two blocks of the walked dimension per step, both products
added to the accumulator between one load and one store: half the float32 accumulator traffic
(the dominant memory cost of this mode), same order every run. With filtering, a skipped tile of
a pair contributes exactly zero, as it would unpaired.
"""

from __future__ import annotations

import triton
import triton.language as tl

from safedpo_kernels.kernels.common import (
    grad_logits_tile,
    load_k_slice,
    load_rows,
    logits_tile,
    tile_needed,
)


@triton.jit
def _grad_tile(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, omp_ptr, g_ptr, skipped_ptr,
    offs_m, offs_v, M, V, H, stride_hm, stride_hk, stride_wv, stride_wk,
    filter_eps, logit_scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr, PAIR: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """G = d(sum g logp)/dz for one (token block, vocab block) tile; returns (G in the dot's
    operand dtype, G float32 (for grad_bias), whether it was kept). With PAIR a filtered tile's
    G is zeroed (its pair partner may still be used); unpaired, the caller skips it instead."""
    labels, lse, omp, g = load_rows(labels_ptr, lse_ptr, omp_ptr, g_ptr, offs_m, M)
    logits = logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, offs_m, offs_v, M, V, H,
        stride_hm, stride_hk, stride_wv, stride_wk, logit_scale, softcap,
        HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H,
    )  # fmt: skip
    grad, p_max, any_hit = grad_logits_tile(
        logits, offs_v, offs_v < V, labels, lse, omp, g, logit_scale, softcap, HAS_SOFTCAP
    )
    if PAIR:  # False for a pair's padding tile past the matrix (not counted as skipped)
        in_range = (tl.min(offs_m, axis=0) < M) & (tl.min(offs_v, axis=0) < V)
    else:
        in_range = M > 0
    needed = tile_needed(p_max, any_hit, filter_eps, skipped_ptr, in_range, FILTER)
    if FILTER and PAIR:
        grad = tl.where(needed, grad, 0.0)
    if UPCAST:
        grad_in = grad
    else:
        grad_in = grad.to(hidden_ptr.dtype.element_ty)
    return grad_in, grad, needed


@triton.jit
def _grad_hidden_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, omp_ptr, g_ptr, dh_ptr, skipped_ptr,
    M, V, H, stride_hm, stride_hk, stride_wv, stride_wk, stride_dhm,
    filter_eps, logit_scale, softcap,
    # Meta-parameters
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr, PAIR: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """One program per token block; vocabulary blocks in increasing order (pairs with PAIR);
    dh[m, k] += G_v @ W[v, k] into its own (zeroed) rows."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_H)
    for vb in range(0, tl.cdiv(V, BLOCK_V), 1 + PAIR):
        offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        grad_a, _, need_a = _grad_tile(
            hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, omp_ptr, g_ptr, skipped_ptr,
            offs_m, offs_v, M, V, H, stride_hm, stride_hk, stride_wv, stride_wk,
            filter_eps, logit_scale, softcap,
            HAS_BIAS, HAS_SOFTCAP, FILTER, PAIR, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        needed = need_a
        if PAIR:  # the next vocabulary block (all columns >= V when vb is the last: G = 0)
            offs_v2 = offs_v + BLOCK_V
            grad_b, _, need_b = _grad_tile(
                hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, omp_ptr, g_ptr, skipped_ptr,
                offs_m, offs_v2, M, V, H, stride_hm, stride_hk, stride_wv, stride_wk,
                filter_eps, logit_scale, softcap,
                HAS_BIAS, HAS_SOFTCAP, FILTER, PAIR, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H,
            )  # fmt: skip
            needed = need_a | need_b
        if needed:
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + offs_k
                mask_k = ks < H
                dh_ptrs = dh_ptr + offs_m[:, None].to(tl.int64) * stride_dhm + ks[None, :]
                mask = mask_m[:, None] & mask_k[None, :]
                acc = tl.load(dh_ptrs, mask=mask, other=0.0)
                w = load_k_slice(weight_ptr, offs_v, ks, stride_wv, stride_wk, offs_v < V, mask_k, UPCAST)
                acc = tl.dot(grad_a, w, acc, input_precision=DOT_PRECISION)
                if PAIR:
                    w2 = load_k_slice(weight_ptr, offs_v2, ks, stride_wv, stride_wk, offs_v2 < V, mask_k, UPCAST)
                    acc = tl.dot(grad_b, w2, acc, input_precision=DOT_PRECISION)
                tl.store(dh_ptrs, acc, mask=mask)


@triton.jit
def _grad_weight_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, omp_ptr, g_ptr, dw_ptr, db_ptr, skipped_ptr,
    M, V, H, stride_hm, stride_hk, stride_wv, stride_wk, stride_dwv,
    filter_eps, logit_scale, softcap,
    # Meta-parameters
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr, FILTER: tl.constexpr, PAIR: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """One program per vocab block; token blocks in increasing order (pairs with PAIR);
    dw[v, k] += G_m.T @ hidden[m, k] into its own (zeroed) rows; db[v] = sum_m G_m in registers."""
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    offs_k = tl.arange(0, BLOCK_H)
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for mb in range(0, tl.cdiv(M, BLOCK_M), 1 + PAIR):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        grad_a, grad32_a, need_a = _grad_tile(
            hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, omp_ptr, g_ptr, skipped_ptr,
            offs_m, offs_v, M, V, H, stride_hm, stride_hk, stride_wv, stride_wk,
            filter_eps, logit_scale, softcap,
            HAS_BIAS, HAS_SOFTCAP, FILTER, PAIR, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        needed = need_a
        if PAIR:  # the next token block (rows >= M when mb is the last: g = 0, G = 0)
            offs_m2 = offs_m + BLOCK_M
            grad_b, grad32_b, need_b = _grad_tile(
                hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, omp_ptr, g_ptr, skipped_ptr,
                offs_m2, offs_v, M, V, H, stride_hm, stride_hk, stride_wv, stride_wk,
                filter_eps, logit_scale, softcap,
                HAS_BIAS, HAS_SOFTCAP, FILTER, PAIR, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H,
            )  # fmt: skip
            needed = need_a | need_b
        if needed and COMPUTE_DB:
            db += tl.sum(grad32_a, axis=0)
            if PAIR:
                db += tl.sum(grad32_b, axis=0)
        if COMPUTE_DW and needed:
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + offs_k
                mask_k = ks < H
                dw_ptrs = dw_ptr + offs_v[:, None].to(tl.int64) * stride_dwv + ks[None, :]
                mask = mask_v[:, None] & mask_k[None, :]
                acc = tl.load(dw_ptrs, mask=mask, other=0.0)
                h = load_k_slice(hidden_ptr, offs_m, ks, stride_hm, stride_hk, offs_m < M, mask_k, UPCAST)
                acc = tl.dot(tl.trans(grad_a), h, acc, input_precision=DOT_PRECISION)
                if PAIR:
                    h2 = load_k_slice(hidden_ptr, offs_m2, ks, stride_hm, stride_hk, offs_m2 < M, mask_k, UPCAST)
                    acc = tl.dot(tl.trans(grad_b), h2, acc, input_precision=DOT_PRECISION)
                tl.store(dw_ptrs, acc, mask=mask)
    if COMPUTE_DB:
        tl.store(db_ptr + offs_v, db, mask=mask_v)


def deterministic_launchers(hidden, weight, bias_arg, labels, lse, omp, g, skipped, strides, scalars, flags, *, needs, pair):
    """(run_grad_hidden(cfg) -> dh float32, run_grad_weight(cfg) -> (dw | None, db | None)) for
    ``backward_logprobs``; ``flags`` are the shared constexprs, ``scalars`` (filter_eps,
    logit_scale, softcap)."""
    import torch

    need_h, need_w, need_b = needs
    m, h = hidden.shape
    v = weight.shape[0]
    zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=hidden.device)  # noqa: E731

    def run_grad_hidden(cfg):
        dh = zeros(m, h)
        _grad_hidden_kernel[(triton.cdiv(m, cfg.block_m),)](
            hidden, weight, bias_arg, labels, lse, omp, g, dh, skipped, m, v, h, *strides, h, *scalars,
            PAIR=pair, **flags, **cfg.meta(),
        )  # fmt: skip
        return dh

    def run_grad_weight(cfg):
        dw = zeros(v, h) if need_w else None
        db = zeros(v) if need_b else None
        _grad_weight_kernel[(triton.cdiv(v, cfg.block_v),)](
            hidden, weight, bias_arg, labels, lse, omp, g,
            dw if need_w else g, db if need_b else g, skipped,
            m, v, h, *strides, h, *scalars,
            COMPUTE_DW=need_w, COMPUTE_DB=need_b, PAIR=pair, **flags, **cfg.meta(),
        )  # fmt: skip
        return dw, db

    return run_grad_hidden, run_grad_weight
