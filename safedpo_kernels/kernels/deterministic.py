"""Deterministic backward kernels: each program owns its output rows, no atomics.

* ``_grad_hidden_kernel``: one program per token block walks the vocabulary blocks in increasing
  order and adds ``G @ W[v]`` into its rows of a float32 (M, H) accumulator.
* ``_grad_weight_kernel``: one program per vocabulary block walks the token blocks in increasing
  order and adds ``G.T @ hidden[m]`` into its rows of a float32 (V, H) accumulator; grad_bias is
  summed in registers and stored once.

Every output element is written by one program in a fixed order: bit-identical run to run. The
logits are recomputed in both kernels (10NHV FLOPs with the forward, against 8NHV for the atomics
path in ``backward.py``, whose launcher ``backward_logprobs`` launches these too).
"""

from __future__ import annotations

import triton
import triton.language as tl

from safedpo_kernels.kernels.common import grad_logits_tile, load_k_slice, load_rows, logits_tile


@triton.jit
def _grad_hidden_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    lse_ptr,
    omp_ptr,
    g_ptr,
    dh_ptr,
    M,
    V,
    H,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_dhm,
    filter_eps,
    # Meta-parameters
    HAS_BIAS: tl.constexpr,
    FILTER: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program per token block; vocabulary blocks in increasing order; dh rows owned (zeroed)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    labels, lse, omp, g = load_rows(labels_ptr, lse_ptr, omp_ptr, g_ptr, offs_m, M)
    offs_k = tl.arange(0, BLOCK_H)
    for vb in range(0, tl.cdiv(V, BLOCK_V)):
        offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        logits = logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_m, offs_v, M, V, H,
            stride_hm, stride_hk, stride_wv, stride_wk,
            HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        grad, p_max, any_hit = grad_logits_tile(logits, offs_v, labels, lse, omp, g)
        if FILTER:
            needed = (p_max >= filter_eps) | (any_hit > 0)
        else:
            needed = True
        if needed:
            if UPCAST:
                grad_in = grad
            else:
                grad_in = grad.to(hidden_ptr.dtype.element_ty)
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + offs_k
                mask_k = ks < H
                w = load_k_slice(weight_ptr, offs_v, ks, stride_wv, stride_wk, mask_v, mask_k, UPCAST)
                dh_ptrs = dh_ptr + offs_m[:, None].to(tl.int64) * stride_dhm + ks[None, :]
                mask = mask_m[:, None] & mask_k[None, :]
                acc = tl.load(dh_ptrs, mask=mask, other=0.0)
                acc = tl.dot(grad_in, w, acc, input_precision=DOT_PRECISION)
                tl.store(dh_ptrs, acc, mask=mask)


@triton.jit
def _grad_weight_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    lse_ptr,
    omp_ptr,
    g_ptr,
    dw_ptr,
    db_ptr,
    M,
    V,
    H,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_dwv,
    filter_eps,
    # Meta-parameters
    HAS_BIAS: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    FILTER: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program per vocab block; token blocks in increasing order; dw rows owned (zeroed)."""
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    offs_k = tl.arange(0, BLOCK_H)
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for mb in range(0, tl.cdiv(M, BLOCK_M)):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        labels, lse, omp, g = load_rows(labels_ptr, lse_ptr, omp_ptr, g_ptr, offs_m, M)
        logits = logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_m, offs_v, M, V, H,
            stride_hm, stride_hk, stride_wv, stride_wk,
            HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        grad, p_max, any_hit = grad_logits_tile(logits, offs_v, labels, lse, omp, g)
        if FILTER:
            needed = (p_max >= filter_eps) | (any_hit > 0)
        else:
            needed = True
        if needed:
            if COMPUTE_DB:
                db += tl.sum(grad, axis=0)
            if COMPUTE_DW:
                if UPCAST:
                    grad_in = grad
                else:
                    grad_in = grad.to(hidden_ptr.dtype.element_ty)
                for k0 in range(0, H, BLOCK_H):
                    ks = k0 + offs_k
                    mask_k = ks < H
                    h = load_k_slice(hidden_ptr, offs_m, ks, stride_hm, stride_hk, mask_m, mask_k, UPCAST)
                    dw_ptrs = dw_ptr + offs_v[:, None].to(tl.int64) * stride_dwv + ks[None, :]
                    mask = mask_v[:, None] & mask_k[None, :]
                    acc = tl.load(dw_ptrs, mask=mask, other=0.0)
                    acc = tl.dot(tl.trans(grad_in), h, acc, input_precision=DOT_PRECISION)
                    tl.store(dw_ptrs, acc, mask=mask)
    if COMPUTE_DB:
        tl.store(db_ptr + offs_v, db, mask=mask_v)
