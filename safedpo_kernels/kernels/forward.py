"""Forward kernel: per-token log-sum-exp and target logit, streaming over vocabulary blocks.

Grid: (token blocks, vocabulary splits). Program (pid_m, s) walks the vocabulary blocks
s, s + S, s + 2S, ... computing each float32 logits tile (``common.logits_tile``) and keeping an
online log-sum-exp (running max and running sum of exponentials) and the target logit. It writes
three floats per token and split (partial LSE, target logit, LSE of the non-target columns); the
launcher combines the S partials (S is a handful, chosen so the grid fills the GPU when there are
few tokens) and returns ``(logp, lse, one_minus_p)``, float32 (M,).
No (tokens x vocab) buffer exists at any time.

``forward_logprobs`` is also the forward-only entry (reference model, ``no_grad``): it saves
nothing and builds no graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing

from safedpo_kernels.kernels.common import (
    INTERPRETING,
    device_arch_and_sms,
    dot_precision,
    grouped_ids,
    logits_tile,
    upcast_flag,
)
from safedpo_kernels.kernels.config import BlockConfig, pick_config


@triton.jit
def _forward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    part_lse_ptr,
    part_tgt_ptr,
    part_other_ptr,
    M,
    V,
    H,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    num_splits,
    logit_scale,
    softcap,
    # Meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    GROUPED: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    if GROUPED:  # 1-D launch: GROUP_M token blocks x all splits run together (L2 reuse)
        pid_m, pid_s = grouped_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_splits, GROUP_M)
    else:  # 2-D launch (token block, split)
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    labels = tl.load(labels_ptr + offs_m, mask=mask_m, other=-1)

    # ---- online log-sum-exp over this split's vocabulary blocks ----
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    run_comp = tl.zeros((BLOCK_M,), dtype=tl.float32)  # Kahan compensation of run_sum
    run_other = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum of exp over the non-target columns
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    nonfinite = tl.zeros((BLOCK_M,), dtype=tl.float32)  # 0, or NaN once a row meets a non-finite logit
    for vb in range(pid_s, tl.cdiv(V, BLOCK_V), num_splits):
        offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        logits = logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_m, offs_v, M, V, H,
            stride_hm, stride_hk, stride_wv, stride_wk, logit_scale, softcap,
            HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        # logits * 0 is NaN exactly at +-inf / NaN logits: carried into the LSE so that any
        # non-finite logit of a row (not only +inf or NaN) makes its log-prob NaN.
        nonfinite += tl.sum(tl.where(offs_v[None, :] < V, logits, 0.0) * 0.0, axis=1)
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        scale = tl.exp(run_max - new_max)
        hit = offs_v[None, :] == labels[:, None]
        e = tl.exp(logits - new_max[:, None])
        run_other = run_other * scale + tl.sum(tl.where(hit, 0.0, e), axis=1)
        # Compensated (Kahan) running sum: ~1000 sequential vocab blocks at V=128k would otherwise
        # add ~sqrt(1000) ulps to the LSE; the tile sums themselves are tree reductions.
        term = tl.sum(e, axis=1) - run_comp * scale
        run_sum = run_sum * scale
        total = run_sum + term
        run_comp = (total - run_sum) - term
        run_sum = total
        run_max = new_max
        target += tl.sum(tl.where(hit, logits, 0.0), axis=1)

    # ---- one partial (lse, target) per token and split ----
    out = offs_m.to(tl.int64) * num_splits + pid_s
    tl.store(part_lse_ptr + out, run_max + tl.log(run_sum) + nonfinite, mask=mask_m)
    tl.store(part_tgt_ptr + out, target, mask=mask_m)
    tl.store(part_other_ptr + out, run_max + tl.log(run_other), mask=mask_m)


def _num_splits(num_m_blocks: int, num_v_blocks: int, sms: int) -> int:
    """Vocabulary splits so that the grid has about two programs per SM (1 with many tokens)."""
    want = -(-2 * sms // num_m_blocks)
    return max(1, min(num_v_blocks, want, 64))


def full_wave_splits(num_m_blocks: int, num_v_blocks: int, sms: int, programs_per_sm: int = 1) -> int:
    """Fewest vocabulary splits whose grid fills >= 90% of its last wave of ``sms *
    programs_per_sm`` programs (the best-filling count up to 64 when none reaches 90%)."""
    slots = sms * programs_per_sm
    best, best_fill = 1, 0.0
    for s in range(1, max(1, min(num_v_blocks, 64)) + 1):
        n = num_m_blocks * s
        fill = n / (-(-n // slots) * slots)
        if fill >= 0.9:
            return s
        if fill > best_fill + 1e-9:
            best, best_fill = s, fill
    return best


def forward_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    grouped: bool = False,
    config: BlockConfig | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs and log-sum-exp of the logits ``transform(hidden @ weight.T + bias)`` at ``labels``.

    Args:
        hidden: (M, H) float32 / float16 / bfloat16, any strides, M >= 1.
        weight: (V, H), same dtype and device, any strides.
        labels: (M,) int64 in [0, V) (not checked here: the caller validates).
        bias: (V,) or None.
        logit_scale, softcap: the logit transform (``softcap * tanh(logit_scale * z / softcap)``,
            or ``logit_scale * z`` when softcap is None).
        grouped: the "fwd_grouped" variant (1-D grouped launch, ``full_wave_splits``).
        config: block configuration (default: ``config.pick_config``).
        num_splits: vocabulary splits (default: enough programs to fill the GPU).

    Returns:
        ``(logp, lse, one_minus_p)``, float32 (M,) each: log-probs, log-sum-exp, and
        ``1 - p(label)`` computed from the non-label columns (used by the backward). A row with
        any non-finite logit gets NaN in all three.
    """
    m, h = hidden.shape
    v = weight.shape[0]
    arch, sms = device_arch_and_sms(hidden.device)
    labels = labels.contiguous()
    bias_arg = bias.contiguous() if bias is not None else hidden  # dummy pointer when HAS_BIAS=False

    def launch(cfg: BlockConfig, splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        part_lse = torch.empty((m, splits), dtype=torch.float32, device=hidden.device)
        part_tgt = torch.empty((m, splits), dtype=torch.float32, device=hidden.device)
        part_other = torch.empty((m, splits), dtype=torch.float32, device=hidden.device)
        num_m = triton.cdiv(m, cfg.block_m)
        grid = (num_m * splits,) if grouped else (num_m, splits)
        _forward_kernel[grid](
            hidden, weight, bias_arg, labels, part_lse, part_tgt, part_other,
            m, v, h,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            splits, float(logit_scale), float(softcap or 1.0),
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None,
            GROUPED=grouped,
            UPCAST=upcast_flag(hidden.dtype),
            DOT_PRECISION=dot_precision(hidden.dtype),
            GROUP_M=cfg.group_m,
            **cfg.meta(),
        )  # fmt: skip
        return part_lse, part_tgt, part_other

    def splits_for(cfg: BlockConfig) -> int:
        if num_splits is not None:
            return num_splits
        count = full_wave_splits if grouped else _num_splits
        return count(triton.cdiv(m, cfg.block_m), triton.cdiv(v, cfg.block_v), sms)

    def bench(cfg: BlockConfig) -> float:
        return triton.testing.do_bench(lambda: launch(cfg, splits_for(cfg)))

    if config is None:
        config = pick_config(
            "forward", arch=arch, element_size=hidden.element_size(), sizes=(m, v, h),
            interpreting=INTERPRETING, softcap=softcap is not None, bench=bench,
        )  # fmt: skip
    part_lse, part_tgt, part_other = launch(config, splits_for(config))
    if part_lse.shape[1] == 1:
        lse, target, other = part_lse[:, 0], part_tgt[:, 0], part_other[:, 0]
    else:
        lse = torch.logsumexp(part_lse, dim=1)
        target = part_tgt.sum(dim=1)  # one nonzero per row: the split that holds the label
        other = torch.logsumexp(part_other, dim=1)
    return finish_logprobs(lse, target, other)


def finish_logprobs(lse: torch.Tensor, target: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, lse, one_minus_p)`` from the per-token LSE, target logit and non-target LSE."""
    # 1 - p(target) from the other columns' own sum: accurate to float32 relative precision even
    # when p(target) rounds to 1 (a confident token), where 1 - exp(logp) would be all noise. For
    # such tokens log p = log1p(-(1 - p)) is accurate too, where target - lse (two nearly equal
    # numbers) would keep only their rounding error.
    one_minus_p = torch.exp(other - lse)
    logp = torch.where(one_minus_p < 0.5, torch.log1p(-one_minus_p), target - lse)
    return logp, lse, one_minus_p
