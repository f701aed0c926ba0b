"""Shared pieces of the log-prob kernels: the logits tile, launch-time flags, device helpers.

``logits_tile`` computes one (BLOCK_M tokens x BLOCK_V vocab) tile of ``hidden @ weight.T + bias``
in float32, streaming over the hidden dimension in BLOCK_H steps; the forward and backward
kernels all call it, so the logits are defined once.

Interpreter note: under ``TRITON_INTERPRET=1`` bfloat16 values are raw uint16 inside the
interpreter and ``tl.dot`` / arithmetic on them is garbage. Launchers pass ``UPCAST=True`` only
when interpreting a bfloat16 input, which casts each loaded tile to float32; GPU builds always get
``UPCAST=False`` so the matmuls stay bf16 tensor-core ops (the compile gate checks the SASS).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # the class of a @triton.jit function decorated while TRITON_INTERPRET=1 was set
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - very old triton
    _InterpretedFunction = ()


@triton.jit
def _probe_kernel(x_ptr):
    pass


#: True when this process decorated the kernels for Triton's CPU interpreter (TRITON_INTERPRET=1
#: was set before triton was imported). Decided once, at import, exactly as triton.jit decides.
INTERPRETING: bool = isinstance(_probe_kernel, _InterpretedFunction) if _InterpretedFunction else False


def upcast_flag(dtype: torch.dtype) -> bool:
    """The ``UPCAST`` constexpr: only for bfloat16 under the interpreter, never on a GPU."""
    return INTERPRETING and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``.

    float32 inputs follow PyTorch's own switch: "ieee" (exact fp32 FMA) unless
    ``torch.backends.cuda.matmul.allow_tf32`` is set, then "tf32". 16-bit inputs ignore it.
    """
    if dtype == torch.float32 or upcast_flag(dtype):
        if not INTERPRETING and torch.backends.cuda.matmul.allow_tf32:
            return "tf32"
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=None)
def _device_props(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def device_arch_and_sms(device: torch.device) -> tuple[str | None, int]:
    """("sm90" | "sm80" | None, number of SMs). None and 4 under the interpreter."""
    from safedpo_kernels.kernels.config import arch_of

    if INTERPRETING or device.type != "cuda":
        return None, 4
    cap, sms = _device_props(device.index if device.index is not None else torch.cuda.current_device())
    return arch_of(cap), sms


@triton.jit
def tanh_f32(x):
    """tanh in float32 to ~2 ulps, the same code on the GPU and in the interpreter (which has no
    libdevice): odd Taylor polynomial (9 terms, truncation < 5e-9 relative) for |x| < 0.55, else
    sign(x) * (1 - 2 / (exp(2|x|) + 1)); exp overflow gives exactly +-1."""
    ax = tl.abs(x)
    x2 = x * x
    p = 6404582.0 / 10854718875.0
    p = p * x2 - 929569.0 / 638512875.0
    p = p * x2 + 21844.0 / 6081075.0
    p = p * x2 - 1382.0 / 155925.0
    p = p * x2 + 62.0 / 2835.0
    p = p * x2 - 17.0 / 315.0
    p = p * x2 + 2.0 / 15.0
    p = p * x2 - 1.0 / 3.0
    p = p * x2 + 1.0
    big = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)
    return tl.where(ax < 0.55, x * p, tl.where(x < 0, -big, big))


@triton.jit
def transform_logits(z, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Logits from the raw head output z (float32): ``softcap * tanh(logit_scale * z / softcap)``
    with HAS_SOFTCAP, else ``logit_scale * z``. A non-finite z gives NaN under the cap (tanh would
    turn +-inf into a finite +-softcap and hide it); without the cap +-inf stays +-inf."""
    if HAS_SOFTCAP:
        return softcap * tanh_f32(z * (logit_scale / softcap)) + z * 0.0
    else:
        return z * logit_scale


@triton.jit
def logit_slope(logits, mask_v, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """d logits / d z per entry, float32, 0 at masked columns: ``logit_scale * (1 - (logits /
    softcap)**2)`` under the cap (1 - tanh**2), else the constant ``logit_scale``."""
    if HAS_SOFTCAP:
        t = logits / softcap
        return tl.where(mask_v[None, :], logit_scale * (1.0 - t * t), 0.0)
    else:
        return tl.where(mask_v[None, :], logit_scale, 0.0)


@triton.jit
def grouped_ids(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a 1-D launch in grouped order: GROUP_M consecutive row blocks walk the
    column blocks together, so the programs running at once share their tiles in L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def logits_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    offs_m,
    offs_v,
    M,
    V,
    H,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    logit_scale,
    softcap,
    # Meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """float32 (BLOCK_M, BLOCK_V) tile of the logits ``transform(hidden @ weight.T + bias)``
    (``transform_logits``); -inf at columns >= V.

    Rows >= M read zeros (their values are never stored). Offsets are int64.
    """
    mask_m = offs_m < M
    mask_v = offs_v < V
    offs_k = tl.arange(0, BLOCK_H)
    h_ptrs = hidden_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_k[None, :] * stride_hk
    w_ptrs = weight_ptr + offs_v[:, None].to(tl.int64) * stride_wv + offs_k[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        mask_k = (k0 + offs_k) < H
        h = tl.load(h_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_v[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_H * stride_hk
        w_ptrs += BLOCK_H * stride_wk
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        acc += b[None, :]
    logits = transform_logits(acc, logit_scale, softcap, HAS_SOFTCAP)
    return tl.where(mask_v[None, :], logits, float("-inf"))


@triton.jit
def load_k_slice(ptr, offs_r, ks, stride_r, stride_k, mask_r, mask_k, UPCAST: tl.constexpr):
    """(rows, BLOCK_H) slice ``x[offs_r, ks]`` of a strided matrix, 0 outside the masks (int64
    offsets); float32 when UPCAST (the interpreter's bf16 workaround), else the input dtype."""
    x = tl.load(
        ptr + offs_r[:, None].to(tl.int64) * stride_r + ks[None, :] * stride_k,
        mask=mask_r[:, None] & mask_k[None, :], other=0.0,
    )  # fmt: skip
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def load_rows(labels_ptr, lse_ptr, omp_ptr, g_ptr, offs_m, M):
    """Per-token label, lse, 1 - p(label) and upstream gradient; rows >= M get lse=+inf, g=0."""
    mask_m = offs_m < M
    labels = tl.load(labels_ptr + offs_m, mask=mask_m, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=float("inf"))
    omp = tl.load(omp_ptr + offs_m, mask=mask_m, other=0.0)
    g = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0)
    return labels, lse, omp, g


@triton.jit
def grad_logits_tile(
    logits,
    offs_v,
    mask_v,
    labels,
    lse,
    omp,
    g,
    logit_scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
):
    """d(sum_i g_i logp_i)/d z for one tile (z = hidden @ weight.T + bias, the raw head output):
    g * (onehot(label) - softmax(logits)) * dlogits/dz, float32; 0 at masked columns.

    At the label column, for a confident token (p > 1/2), the value uses ``omp = 1 - p(label)``
    from the forward (computed from the other columns' sum), not ``1 - p``: p rounds to 1 there
    and the difference would be pure rounding noise. Also returns the tile's largest softmax value
    and whether a label falls in it (for filtering).
    """
    p = tl.exp(logits - lse[:, None])
    hit = offs_v[None, :] == labels[:, None]
    grad = -g[:, None] * p
    # 1 - p at the label: the forward's value when p > 1/2 (accurate where p ~ 1), else 1 - p from
    # the tile (accurate where p is small, when the forward's value is a difference of two LSEs).
    label_grad = g[:, None] * tl.where(omp[:, None] < 0.5, omp[:, None], 1.0 - p)
    grad = tl.where(hit, label_grad, grad) * logit_slope(logits, mask_v, logit_scale, softcap, HAS_SOFTCAP)
    p_max = tl.max(tl.max(p, axis=1), axis=0)
    any_hit = tl.max(tl.max(hit.to(tl.int32), axis=1), axis=0)
    return grad, p_max, any_hit


@triton.jit
def tile_needed(p_max, any_hit, filter_eps, skipped_ptr, in_range, FILTER: tl.constexpr):
    """Gradient filtering: False when the tile holds no label and its largest softmax value is
    below ``filter_eps``; each skipped tile with ``in_range`` true (not a padding tile past the
    matrix) adds 1 to the int32 counter at ``skipped_ptr``. Always True without FILTER."""
    if FILTER:
        needed = (p_max >= filter_eps) | (any_hit > 0)
        if not needed:
            tl.atomic_add(skipped_ptr, in_range.to(tl.int32), sem="relaxed")
    else:
        needed = True
    return needed
