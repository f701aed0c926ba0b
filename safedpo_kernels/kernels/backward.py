"""Backward kernels: grad_hidden, grad_weight, grad_bias of sum_i g_i * logp_i.

With G = g * (onehot(label) - softmax(logits)) * dlogits/dz (one tile at a time, recomputed from
the saved LSE; dlogits/dz is the logit transform's slope, ``common.logit_slope``):
    grad_hidden = G @ W,  grad_weight = G.T @ hidden,  grad_bias = G.sum(0).

Two schemes, both float32 accumulation, neither ever holding a (tokens x vocab) buffer:

* ``_backward_kernel`` (default, ``deterministic=False``): one program per (token block, vocab
  block) tile recomputes the logits once and adds both products into float32 accumulators with
  relaxed ``atomic_add`` (8NHV FLOPs in all with the forward). Summation order depends on the
  schedule, so the last bits vary run to run. Variants: ``STAGGER`` (each tile starts its walk over
  the hidden dimension at a different block), and a grad_weight accumulator in the 16-bit input
  dtype ("dw_lowp": the launcher passes a bf16/fp16 ``dw`` buffer; tile partials stay float32).
* ``_grad_hidden_kernel`` + ``_grad_weight_kernel`` (``deterministic=True``, in
  ``deterministic.py``): each program owns its output rows and walks the other dimension in a
  fixed order, adding into its rows with plain loads and stores; no atomics, bit-identical run to
  run (10NHV FLOPs in all).

Gradient filtering (``FILTER=True``): a tile is skipped when none of its labels falls in it and
its largest softmax value is below ``filter_eps``; skipped tiles are counted into an int32 device
counter (``KernelStats``). The "filter_sorted" variant runs on a copy of the head sorted by mean
logit (``_vocab_order``) so that the likely columns share few vocabulary blocks.
The matmuls of G take G rounded to the input dtype (as eager bf16 autograd does), so they run on
the tensor cores; the accumulators stay float32.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl
import triton.testing

from safedpo_kernels.kernels.common import (
    INTERPRETING,
    device_arch_and_sms,
    dot_precision,
    grad_logits_tile,
    grouped_ids,
    load_k_slice,
    load_rows,
    logits_tile,
    tile_needed,
    upcast_flag,
)
from safedpo_kernels.kernels.config import BlockConfig, pick_config
from safedpo_kernels.kernels.deterministic import deterministic_launchers
from safedpo_kernels.kernels.variants import KernelStats, KernelVariant, get_variant

#: float32 bytes of the grad_hidden accumulator the default scheme holds at once (tokens are
#: processed in chunks of at most this many rows' worth); 16-bit inputs only.
GRAD_HIDDEN_CHUNK_BYTES = 64 * 2**20


def filter_eps(dtype: torch.dtype) -> float:
    """Softmax threshold below which a whole tile is skipped by gradient filtering.

    The dtype's machine epsilon / 32 (2**-12 for bfloat16, as Cut Cross-Entropy uses; 2**-15
    for float16; 2**-28 for float32): a skipped tile's entries of G are below 1/32 of the
    resolution of the dtype the gradients are returned in.
    """
    return torch.finfo(dtype).eps / 32.0


@triton.jit
def _backward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    lse_ptr,
    omp_ptr,
    g_ptr,
    dh_ptr,
    dw_ptr,
    db_ptr,
    skipped_ptr,
    M,
    V,
    H,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_dhm,
    stride_dwv,
    filter_eps,
    logit_scale,
    softcap,
    # Meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    FILTER: tl.constexpr,
    STAGGER: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_v = grouped_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(V, BLOCK_V), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_m = offs_m < M
    mask_v = offs_v < V
    labels, lse, omp, g = load_rows(labels_ptr, lse_ptr, omp_ptr, g_ptr, offs_m, M)

    # ---- G = g * (onehot - softmax) * dlogits/dz for this tile, float32 in registers ----
    logits = logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, offs_m, offs_v, M, V, H,
        stride_hm, stride_hk, stride_wv, stride_wk, logit_scale, softcap,
        HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H,
    )  # fmt: skip
    grad, p_max, any_hit = grad_logits_tile(
        logits, offs_v, mask_v, labels, lse, omp, g, logit_scale, softcap, HAS_SOFTCAP
    )
    if tile_needed(p_max, any_hit, filter_eps, skipped_ptr, pid_m >= 0, FILTER):
        if COMPUTE_DB:
            tl.atomic_add(db_ptr + offs_v, tl.sum(grad, axis=0), mask=mask_v, sem="relaxed")
        if UPCAST:
            grad_in = grad
        else:
            grad_in = grad.to(hidden_ptr.dtype.element_ty)
        # ---- dh[m, k] += G @ W[v, k];  dw[v, k] += G.T @ hidden[m, k], k block by k block ----
        offs_k = tl.arange(0, BLOCK_H)
        num_k = tl.cdiv(H, BLOCK_H)
        # STAGGER: start at a different k block per tile so concurrent programs (same token block
        # or same vocabulary block) do not add into the same addresses at the same moment.
        rot = (pid_m + pid_v) % num_k if STAGGER else 0
        for kb in range(0, num_k):
            kk = kb + rot
            kk = tl.where(kk >= num_k, kk - num_k, kk) if STAGGER else kk
            ks = kk * BLOCK_H + offs_k
            mask_k = ks < H
            if COMPUTE_DH:
                w = load_k_slice(weight_ptr, offs_v, ks, stride_wv, stride_wk, mask_v, mask_k, UPCAST)
                dh = tl.dot(grad_in, w, input_precision=DOT_PRECISION)
                dh_ptrs = dh_ptr + offs_m[:, None].to(tl.int64) * stride_dhm + ks[None, :]
                tl.atomic_add(dh_ptrs, dh, mask=mask_m[:, None] & mask_k[None, :], sem="relaxed")
            if COMPUTE_DW:
                h = load_k_slice(hidden_ptr, offs_m, ks, stride_hm, stride_hk, mask_m, mask_k, UPCAST)
                dw = tl.dot(tl.trans(grad_in), h, input_precision=DOT_PRECISION)
                dw_ptrs = dw_ptr + offs_v[:, None].to(tl.int64) * stride_dwv + ks[None, :]
                # float32 partial product; cast to the accumulator's dtype (float32, or the 16-bit
                # input dtype in the "dw_lowp" variant)
                dw = dw.to(dw_ptr.dtype.element_ty)
                tl.atomic_add(dw_ptrs, dw, mask=mask_v[:, None] & mask_k[None, :], sem="relaxed")


# -------------------------------------------------------------------------------------------------
# Launcher
# -------------------------------------------------------------------------------------------------


def _token_chunk(m: int, h: int, dtype: torch.dtype, block_m: int) -> int:
    """Rows per grad_hidden chunk: float32 inputs accumulate in the output itself (no chunking)."""
    if dtype == torch.float32:
        return m
    rows = max(block_m, GRAD_HIDDEN_CHUNK_BYTES // (4 * h) // block_m * block_m)
    return min(m, rows)


def _vocab_order(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Permutation of the vocabulary by decreasing mean raw logit over the tokens (the mean of
    ``hidden @ weight.T + bias`` is ``mean(hidden) @ weight.T + bias``: one matrix-vector product).
    Any monotone logit transform keeps the order of the raw values close enough for filtering."""
    mean_h = hidden.float().mean(0).to(weight.dtype)
    mean_z = (weight @ mean_h).float()
    if bias is not None:
        mean_z = mean_z + bias.float()
    return torch.argsort(mean_z, descending=True)


def backward_logprobs(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    one_minus_p: torch.Tensor,
    *,
    needs: tuple[bool, bool, bool],
    logit_scale: float = 1.0,
    softcap: float | None = None,
    deterministic: bool = False,
    grad_filter: bool = False,
    variant: KernelVariant | None = None,
    stats: KernelStats | None = None,
    configs: dict[str, BlockConfig] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_logp * logp)`` w.r.t. (hidden, weight, bias), in the inputs' dtypes.

    Args:
        grad_logp: (M,) upstream gradient (any float dtype, any strides).
        hidden: (M, H), weight: (V, H), bias: (V,) or None, labels: (M,) int64: as in forward.
        lse, one_minus_p: (M,) float32 log-sum-exp and 1 - p(label) from ``forward_logprobs``.
        needs: which of (grad_hidden, grad_weight, grad_bias) to compute; others return None.
        logit_scale, softcap: the logit transform used in the forward.
        deterministic: owner-computes kernels, bit-identical run to run (see module docstring).
        grad_filter: skip tiles whose softmax is below ``filter_eps(hidden.dtype)``.
        variant: a ``KernelVariant`` (None: "default").
        stats: a ``KernelStats`` that receives the evaluated and skipped tile counts.
        configs: block configuration per kernel name ("backward", "grad_hidden", "grad_weight");
            missing names use ``config.pick_config``.
    """
    variant = variant or get_variant(None)
    need_h, need_w, need_b = needs
    need_b = need_b and bias is not None
    if not (need_h or need_w or need_b):
        return None, None, None
    if grad_filter and variant.vocab_order:
        # Sorted copy of the head (labels renumbered); the gradients are scattered back.
        perm = _vocab_order(hidden, weight, bias)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        sorted_grads = backward_logprobs(
            grad_logp, hidden, weight[perm], None if bias is None else bias[perm], inverse[labels],
            lse, one_minus_p, needs=needs, logit_scale=logit_scale, softcap=softcap,
            deterministic=deterministic, grad_filter=True, variant=replace(variant, vocab_order=False),
            stats=stats, configs=configs,
        )  # fmt: skip
        dh, dw_sorted, db_sorted = sorted_grads
        dw = db = None
        if dw_sorted is not None:
            dw = torch.empty_like(dw_sorted)
            dw[perm] = dw_sorted
        if db_sorted is not None:
            db = torch.empty_like(db_sorted)
            db[perm] = db_sorted
        return dh, dw, db
    m, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    arch, _ = device_arch_and_sms(dev)
    g = grad_logp.to(torch.float32).contiguous()
    lse = lse.contiguous()
    omp = one_minus_p.contiguous()
    labels = labels.contiguous()
    bias_arg = bias.contiguous() if bias is not None else hidden
    stats = stats if stats is not None else KernelStats()
    skipped = stats.counter(dev)
    tiles = lambda rows, cfg: triton.cdiv(rows, cfg.block_m) * triton.cdiv(v, cfg.block_v)  # noqa: E731
    flags = dict(
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        FILTER=grad_filter,
        UPCAST=upcast_flag(hidden.dtype),
        DOT_PRECISION=dot_precision(hidden.dtype),
    )
    # scalars after the strides: filter threshold, logit scale, softcap (1.0 when unused)
    scalars = (filter_eps(hidden.dtype), float(logit_scale), float(softcap or 1.0))
    strides = (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
    zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=dev)  # noqa: E731
    # grad_weight accumulator dtype: float32, or the 16-bit input dtype in the "dw_lowp" variant
    # (never under the interpreter's bf16 workaround, whose bf16 arithmetic is broken).
    dw_dtype = torch.float32
    if variant.dw_lowp and weight.dtype != torch.float32 and not flags["UPCAST"]:
        dw_dtype = weight.dtype

    def run_fused(cfg: BlockConfig):
        dw = torch.zeros((v, h), dtype=dw_dtype, device=dev) if need_w else None
        db = zeros(v) if need_b else None
        chunk = _token_chunk(m, h, hidden.dtype, cfg.block_m) if need_h else m
        # float32 grad_hidden accumulator: the whole (M, H) when it fits the chunk budget (or the
        # input is float32), else one chunk at a time, cast into the input-dtype output.
        dh = zeros(m, h) if need_h and chunk == m else None
        out_h = torch.empty((m, h), dtype=hidden.dtype, device=dev) if need_h and chunk < m else dh
        for s in range(0, m, chunk):
            e = min(m, s + chunk)
            dh_chunk = zeros(e - s, h) if need_h and chunk < m else dh
            grid = (tiles(e - s, cfg),)
            stats.evaluated_tiles += grid[0]
            _backward_kernel[grid](
                hidden[s:e], weight, bias_arg, labels[s:e], lse[s:e], omp[s:e], g[s:e],
                dh_chunk if need_h else g, dw if need_w else g, db if need_b else g, skipped,
                e - s, v, h, *strides, h, h, *scalars,
                COMPUTE_DH=need_h, COMPUTE_DW=need_w, COMPUTE_DB=need_b, STAGGER=variant.stagger,
                GROUP_M=cfg.group_m, **flags, **cfg.meta(),
            )  # fmt: skip
            if need_h and chunk < m:
                out_h[s:e] = dh_chunk
        return out_h, dw, db

    def bench(fn, cfg: BlockConfig) -> float:
        """Autotuning timing; the statistics are restored afterwards (benchmark runs do not count)."""
        saved = (skipped.clone(), stats.evaluated_tiles)
        ms = triton.testing.do_bench(lambda: fn(cfg))
        skipped.copy_(saved[0])
        stats.evaluated_tiles = saved[1]
        return ms

    def choose(kernel: str, fn) -> BlockConfig:
        if configs is not None and kernel in configs:
            return configs[kernel]
        return pick_config(
            kernel, arch=arch, element_size=hidden.element_size(), sizes=(m, v, h),
            interpreting=INTERPRETING, softcap=softcap is not None, bench=lambda cfg: bench(fn, cfg),
            pair=deterministic and variant.det_pair, lowp=dw_dtype != torch.float32,
        )  # fmt: skip

    if deterministic:
        run_h, run_w = deterministic_launchers(
            hidden, weight, bias_arg, labels, lse, omp, g, skipped, strides, scalars, flags,
            needs=(need_h, need_w, need_b), pair=variant.det_pair,
        )  # fmt: skip
        dh = dw = db = None
        if need_h:
            cfg = choose("grad_hidden", run_h)
            dh = run_h(cfg)
            stats.evaluated_tiles += tiles(m, cfg)
        if need_w or need_b:
            cfg = choose("grad_weight", run_w)
            dw, db = run_w(cfg)
            stats.evaluated_tiles += tiles(m, cfg)
    else:
        dh, dw, db = run_fused(choose("backward", run_fused))
    return (
        None if dh is None else dh.to(hidden.dtype),
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )
