"""``linear_logprobs``: per-token log-probs of a linear head without materializing the logits.

Logits are ``z = hidden @ weight.T + bias``, then ``l = softcap * tanh(logit_scale * z / softcap)``
when ``softcap`` is set, else ``l = logit_scale * z``; the result is ``log_softmax(l)[label]``.
Two exact paths compute it and its gradients:

* ``impl="torch"``: chunked ``torch.autograd.Function``s that run on any device (docs/torch_path.md).
  Matmuls run in the inputs' dtype with float32 results (float64 for float64 inputs); everything
  else (log-sum-exp, softmax, gradient of the logits, accumulations) is float32. Tiles of
  ``token chunk x vocab block`` logits fit a memory budget. Two autograd Functions:

  - recompute path (``ChunkedLinearLogprobs``): the forward keeps only the per-token log-sum-exp;
    the backward recomputes each tile's logits (8NHV FLOPs in all);
  - frozen-head path (``FrozenHeadLinearLogprobs``), chosen when ``weight`` / ``bias`` need no
    gradient and ``hidden`` does: the forward also accumulates the softmax-weighted row mean
    ``sum_v p_v c'_v W_v`` online (flash-attention style) and keeps one float32 (N, H) buffer; the
    backward is elementwise (4NHV FLOPs in all).

  Both ignore autocast (computing in the inputs' dtype), turn a non-finite log-prob into NaN (and
  its gradients with it) and raise a clear error on double backward.
* ``impl="triton"``: the fused Triton kernels (``safedpo_kernels.triton_logprobs``).

Both see only the tokens whose label is not ``ignore_index``: those are gathered before any matmul
and the result is scattered back with exact zeros at ignored positions.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import sys
from dataclasses import dataclass

import torch

from safedpo_kernels._checks import (
    IMPLS,
    check_choice,
    check_linear_inputs,
    check_logit_transform,
    env_positive_float,
)

#: Bound on the bytes of a sweep's tile buffers (TileBuffers: the float32 tile, its low-precision
#: copy, tanh for capped heads; for low-precision weight gradients over several token chunks also a
#: float32 (vocab block, H) accumulator). Override with the environment variable SAFEDPO_CHUNK_BUDGET_MB.
DEFAULT_CHUNK_BUDGET_BYTES = 48 * 2**20
#: Smallest token chunk (unless there are fewer tokens) and the vocabulary block the token chunk is
#: sized for: tiles are as tall as the budget allows with blocks of at least MIN_VOCAB_BLOCK rows,
#: so every matmul is large at any V (docs/torch_path.md has the measurements behind the choice).
MIN_TOKEN_CHUNK = 256
MIN_VOCAB_BLOCK = 1024
#: Bytes per tile cell counted against the budget: an upper bound on what a sweep holds per cell,
#: 4 (float32), 6 (bf16/fp16: + the low-precision copy, which also takes the GEMM output) or 8 / 10
#: with a cap (+ tanh); float64 8 or 16. docs/torch_path.md has the measured footprint.
_BYTES_PER_CELL = {torch.float64: 24}
_DEFAULT_BYTES_PER_CELL = 12


@dataclass(frozen=True)
class HeadOptions:
    """The logit transform after ``z = h @ W.T + b``: ``cap * tanh(scale * z / cap)`` or ``scale * z``."""

    logit_scale: float = 1.0
    softcap: float | None = None


def _chunk_budget_bytes() -> int:
    mb = env_positive_float("SAFEDPO_CHUNK_BUDGET_MB", DEFAULT_CHUNK_BUDGET_BYTES / 2**20)
    return max(1, int(mb * 2**20))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tile_sizes(num_tokens: int, vocab: int, hidden: int, dtype: torch.dtype,
               weight_grad_block: bool = False) -> tuple[int, int]:
    """(token chunk, vocab block) of the torch path within ``SAFEDPO_CHUNK_BUDGET_MB``.

    Everything in one tile if it fits; else the token chunk is as large as the budget allows with
    vocabulary blocks of ``MIN_VOCAB_BLOCK`` rows (at least ``MIN_TOKEN_CHUNK`` tokens), and the
    vocabulary block takes the rest of the budget. ``weight_grad_block``: low-precision weight
    gradients, which need a float32 (vocab block, hidden) accumulator when the tokens span several
    chunks; it is then counted in the budget.
    """
    budget = _chunk_budget_bytes()
    per_cell = _BYTES_PER_CELL.get(dtype, _DEFAULT_BYTES_PER_CELL)
    cells = max(1, budget // per_cell)
    if num_tokens * vocab <= cells:
        return max(1, num_tokens), vocab
    chunk = min(num_tokens, max(MIN_TOKEN_CHUNK, cells // MIN_VOCAB_BLOCK))
    block = max(1, min(vocab, cells // max(1, chunk)))
    if block == vocab:
        chunk = min(num_tokens, max(chunk, cells // vocab))
    if weight_grad_block and chunk < num_tokens:
        block = max(1, min(block, budget // (chunk * per_cell + 4 * hidden)))
    return max(1, chunk), block


# ---------------------------------------------------------------------------------------------
# Tiles: matmuls in the inputs' dtype with float32 results, the logit transform
# ---------------------------------------------------------------------------------------------

_OUT_DTYPE_MM: dict[str, bool] = {}


def _mm_out_dtype_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` on this device type."""
    key = f"{device.type}:{dtype}"
    if key not in _OUT_DTYPE_MM:
        try:
            a = torch.ones(2, 2, dtype=dtype, device=device)
            _OUT_DTYPE_MM[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, NotImplementedError, TypeError):
            _OUT_DTYPE_MM[key] = False
    return _OUT_DTYPE_MM[key]


def mm_native(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` with an ``acc`` result where the backend has one, else in the operands' dtype
    (the caller folds the upcast into its next elementwise pass)."""
    if a.dtype != acc and _mm_out_dtype_supported(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=acc)
    return a @ b


class TileBuffers:
    """Named flat buffers reused by every tile of a sweep: one set of tile buffers per sweep.

    ``buffers(name, shape, dtype)`` returns a contiguous ``shape`` view of the buffer ``name``,
    allocated at its first request (the first tile is the largest: token chunks and vocabulary
    blocks only shrink at the end of their spans) and reused for every later tile. Reusing them
    keeps the resident memory at one tile set: fresh (T, Vb) temporaries for every tile leave freed
    tile-sized holes that glibc's default allocator keeps resident (docs/torch_path.md has the
    measurements).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._flat: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.dtype != dtype or flat.numel() < numel:
            flat = torch.empty(numel, dtype=dtype, device=self.device)
            self._flat[name] = flat
        return flat[:numel].view(shape)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (Linux), or None where the C library has none (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_host_memory(device: torch.device) -> None:
    """After a sweep on the CPU, hand the freed heap pages back to the OS (glibc ``malloc_trim(0)``).

    glibc serves allocations below its dynamic mmap threshold (up to 32 MiB: tile buffers, (T, H)
    blocks) from the heap and keeps freed heap memory resident unless it sits at the heap's top;
    without this, a sweep's freed buffers stay resident into the next sweep and add to its peak.
    Costs a walk over the free chunks (well under a millisecond here). No-op off the CPU and
    without glibc.
    """
    if device.type == "cpu" and (trim := _malloc_trim()) is not None:
        trim(0)


def _gemm_low(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype, buffers: TileBuffers, name: str) -> torch.Tensor:
    """``a @ b`` for low-precision operands: an ``acc`` result where the backend has one
    (``out_dtype``), else the low-precision GEMM written into the reused buffer ``name``."""
    if _mm_out_dtype_supported(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=acc)
    return torch.mm(a, b, out=buffers(name, (a.shape[0], b.shape[1]), a.dtype))


def _tile_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, head: HeadOptions,
                 acc: torch.dtype, buffers: TileBuffers, row_offset: torch.Tensor | None = None):
    """``l + row_offset[:, None]`` (T, Vb) in ``acc``, and for a capped head t = tanh(scale z / cap).

    h (T, H), w (Vb, H) in the inputs' dtype, b (Vb,) or None, row_offset (T,) ``acc`` or None.
    The result is the buffer ``tile`` (t: ``tanh``; a low-precision GEMM output: ``tile_lo``).
    Without a cap, the scale and the row offset are folded into the GEMM (``addmm``) or into the
    upcast of a low-precision GEMM output, so the tile is written once or twice, not four times.
    """
    scale, cap = head.logit_scale, head.softcap
    shape = (h.shape[0], w.shape[0])
    out = buffers("tile", shape, acc)
    if h.dtype == acc:
        if cap is None and row_offset is not None:
            torch.addmm(row_offset[:, None], h, w.T, alpha=scale, out=out)
            if b is not None:
                out.add_(b.to(acc), alpha=scale)
            return out, None
        z = torch.mm(h, w.T, out=out)
    else:
        z = _gemm_low(h, w.T, acc, buffers, "tile_lo")
    if cap is None:
        if row_offset is not None:
            torch.add(row_offset[:, None], z, alpha=scale, out=out)  # upcast + scale + offset, one pass
        else:
            if z is not out:
                out.copy_(z)
            if scale != 1.0:
                out.mul_(scale)
        if b is not None:
            out.add_(b.to(acc), alpha=scale)
        return out, None
    if z is not out:
        out.copy_(z)
    if b is not None:
        out.add_(b.to(acc))
    t = torch.mul(out, scale / cap, out=buffers("tanh", shape, acc)).tanh_()
    if row_offset is None:
        torch.mul(t, cap, out=out)
    else:
        torch.add(row_offset[:, None], t, alpha=cap, out=out)
    return out, t


def _cap_derivative_(t: torch.Tensor, head: HeadOptions) -> torch.Tensor:
    """dl/dz = scale * (1 - t^2) from t = tanh(scale z / cap), in place on t."""
    return t.mul_(t).neg_().add_(1.0).mul_(head.logit_scale)


def _target_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                   head: HeadOptions, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """l_y (T,) and dl/dz at the target (T,), in ``acc``: z_y = h . W[y] + b[y] in ``acc`` arithmetic.

    Where the vocabulary tiles come from a low-precision GEMM output (bf16/fp16 without ``out_dtype``,
    e.g. on the CPU), z_y is rounded to the inputs' dtype as those tiles are, so l_y and the
    log-sum-exp carry the same rounding and it cancels in log p_y when the label dominates
    (an exact z_y against rounded tiles gave 4x eager's error on peaked distributions).
    """
    z = torch.empty(h.shape[0], dtype=acc, device=h.device)
    for r0, r1 in _spans(h.shape[0], _row_step(h.shape[1])):  # (rows, H) temporaries of ~1 MiB
        z[r0:r1] = (h[r0:r1].to(acc) * weight[labels[r0:r1]].to(acc)).sum(-1)
    if h.dtype != acc and not _mm_out_dtype_supported(h.device, h.dtype):
        z = z.to(h.dtype).to(acc)
    if bias is not None:
        z = z + bias[labels].to(acc)
    if head.softcap is None:
        return z * head.logit_scale, torch.full_like(z, head.logit_scale)
    t = torch.tanh(z * (head.logit_scale / head.softcap))
    return t * head.softcap, (1 - t * t) * head.logit_scale


def _nan_where_nonfinite_(logp: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """NaN for a token whose hidden state has a non-finite entry (a softcap would otherwise turn an
    infinite logit into a finite log-prob) and for an infinite log-prob (a +inf logit, or a label at
    a logit of -inf): never a number a loss could turn finite. In place on logp (T,); h (T, H)."""
    bad = ~torch.isfinite(logp) | ~torch.isfinite(h).all(-1)
    return logp.masked_fill_(bad, float("nan"))


def _spans(total: int, step: int):
    for start in range(0, total, step):
        yield start, min(total, start + step)


def _row_step(hidden: int) -> int:
    """Rows per slice for elementwise work on (rows, hidden) temporaries of about 2**18 elements."""
    return max(1, 2**18 // max(1, hidden))


def _logsumexp_(x: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(x, -1)`` (T,) computed in place on x (T, Vb), which it overwrites:
    no tile-sized temporary. An infinite row maximum is shifted by 0, as torch does."""
    top = x.amax(-1)
    top.masked_fill_(top.abs() == math.inf, 0.0)
    return x.sub_(top[:, None]).exp_().sum(-1).log_().add_(top)


# ---------------------------------------------------------------------------------------------
# Forward sweeps
# ---------------------------------------------------------------------------------------------


def chunked_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    head: HeadOptions = HeadOptions(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and log-sum-exp, (M,) each, float32 (float64 for float64 inputs).

    hidden (M, H), weight (V, H), bias (V,) or None, labels (M,) int64 in [0, V). Token chunks
    outside, vocabulary blocks inside with an online log-sum-exp; logp = l_y - lse.
    """
    m = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    chunk, block = tile_sizes(m, weight.shape[0], weight.shape[1], hidden.dtype)
    logp = torch.empty(m, dtype=acc, device=hidden.device)
    lse = torch.empty(m, dtype=acc, device=hidden.device)
    buffers = TileBuffers(hidden.device)
    for s0, s1 in _spans(m, chunk):
        h = hidden[s0:s1]
        run = None
        for v0, v1 in _spans(weight.shape[0], block):
            logits, _ = _tile_logits(h, weight[v0:v1], None if bias is None else bias[v0:v1], head, acc, buffers)
            part = _logsumexp_(logits)
            run = part if run is None else torch.logaddexp(run, part)
        lse[s0:s1] = run
        logp[s0:s1] = _nan_where_nonfinite_(_target_logits(h, weight, bias, labels[s0:s1], head, acc)[0] - run, h)
    return logp, lse


def frozen_head_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    head: HeadOptions = HeadOptions(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (M,) and the gradient direction D (M, H), both float32 (float64 for float64 inputs).

    d logp_i / d h_i = c'_{i,y_i} W[y_i] - sum_v p_iv c'_iv W_v =: D_i, with p the softmax of the
    transformed logits l and c' = dl/dz (``logit_scale``, or ``logit_scale * (1 - tanh^2)`` with a
    cap). The sum is accumulated in the same sweep as the log-sum-exp: per vocabulary block, with
    running max m, running sum s = sum exp(l - m) and running vector a = sum exp(l - m) c' W,
    both rescaled by exp(m_old - m_new) when the max moves; at the end lse = m + log s and the mean
    is a / s. The bias enters l (and so p) but not D. The label column is kept out of a and tracked
    as a scalar per token, so D_i = (c'_y - p_y c'_y) W[y] - (a without y) / s: on a peaked
    distribution (p_y -> 1) no GEMM output has to cancel p_y W[y] against the one-hot term.
    """
    m_tok, hid = hidden.shape
    acc = _acc_dtype(hidden.dtype)
    chunk, block = tile_sizes(m_tok, weight.shape[0], hid, hidden.dtype)
    logp = torch.empty(m_tok, dtype=acc, device=hidden.device)
    direction = torch.empty(m_tok, hid, dtype=acc, device=hidden.device)
    buffers = TileBuffers(hidden.device)
    for s0, s1 in _spans(m_tok, chunk):
        h = hidden[s0:s1]
        y = labels[s0:s1]
        mean = buffers("mean", (s1 - s0, hid), acc)
        run_max = run_sum = None
        label_weight = torch.zeros(s1 - s0, dtype=acc, device=hidden.device)  # e_y c'_y, rescaled as a
        for v0, v1 in _spans(weight.shape[0], block):
            w = weight[v0:v1]
            logits, t = _tile_logits(h, w, None if bias is None else bias[v0:v1], head, acc, buffers)
            new_max = logits.amax(-1) if run_max is None else torch.maximum(run_max, logits.amax(-1))
            e = logits.sub_(new_max[:, None]).exp_()  # exp(l - m_new), in place
            block_sum = e.sum(-1)
            if t is not None:  # weight each probability by its own cap derivative
                e.mul_(_cap_derivative_(t, head))
            if run_max is not None:
                alpha = torch.exp(run_max - new_max)
                label_weight.mul_(alpha)
            rows = ((y >= v0) & (y < v1)).nonzero().squeeze(-1)
            cols = y[rows] - v0
            label_weight[rows] = e[rows, cols]
            e[rows, cols] = 0  # the label column goes through label_weight, exactly
            e_w = e if e.dtype == w.dtype else buffers("tile_lo", e.shape, w.dtype).copy_(e)
            if run_max is None:
                run_sum = block_sum
                if e_w.dtype == acc:
                    torch.mm(e_w, w, out=mean)
                else:
                    mean.copy_(_gemm_low(e_w, w, acc, buffers, "rows_lo"))
            else:
                run_sum = run_sum.mul_(alpha).add_(block_sum)
                if not bool((alpha == 1).all()):  # the max moved for some token: rescale its sum
                    mean.mul_(alpha[:, None])
                if e_w.dtype == acc:
                    mean.addmm_(e_w, w)
                else:
                    mean += _gemm_low(e_w, w, acc, buffers, "rows_lo")
            run_max = new_max
        mean.div_(run_sum[:, None])
        label_weight.div_(run_sum)
        if head.softcap is None and head.logit_scale != 1.0:
            mean.mul_(head.logit_scale)
            label_weight.mul_(head.logit_scale)
        l_y, d_y = _target_logits(h, weight, bias, y, head, acc)
        logp[s0:s1] = _nan_where_nonfinite_(l_y - (run_max + torch.log(run_sum)), h)
        d = direction[s0:s1]
        if weight.dtype == acc:
            torch.index_select(weight, 0, y, out=d)
        else:
            d.copy_(torch.index_select(weight, 0, y, out=buffers("rows_lo", (s1 - s0, hid), weight.dtype)))
        d.mul_((d_y - label_weight)[:, None]).sub_(mean)
    return logp, direction


# ---------------------------------------------------------------------------------------------
# Backward sweep of the recompute path
# ---------------------------------------------------------------------------------------------


def chunked_backward(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    needs: tuple[bool, bool, bool],
    head: HeadOptions = HeadOptions(),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum(g * logp) w.r.t. (hidden, weight, bias), returned in the inputs' dtypes.

    d logp_i / d l_ij = onehot(y_i)_j - p_ij and dl/dz = c', so G = g (onehot - p) c' and
    grad_hidden = G @ W, grad_weight = G.T @ H, grad_bias = G.sum(0), with each tile of G
    recomputed from the saved lse. The row factor is taken out: with s = sign(g),
    ``M = exp(l - lse + log|g| + log scale) [- scale |g| at the label] (* (1 - t^2) with a cap)``
    (one GEMM with the offset folded in, one exp) gives G = -s M, so grad_hidden = -s (M @ W),
    grad_bias = M.T @ (-s), grad_weight = (-s M).T @ H (the sign applied to the tile in place).
    Every tile reuses one set of buffers (:class:`TileBuffers`).

    Vocabulary blocks outside, token chunks inside: a block's weight gradient is complete when its
    token loop ends, written once in the weight's dtype (one GEMM, as eager, when all tokens fit one
    chunk; else accumulated in a float32 block); grad_hidden accumulates in float32 (the output
    itself for float32 inputs). M is rounded to the inputs' dtype for low-precision GEMMs, as eager
    autograd rounds the logits' gradient.
    """
    need_h, need_w, need_b = needs
    m = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    low = hidden.dtype != acc
    chunk, block = tile_sizes(m, weight.shape[0], weight.shape[1], hidden.dtype, weight_grad_block=need_w and low)
    g = grad_logp.to(acc)
    abs_g = g.abs()
    row = -torch.sign(g)  # exact in every dtype (-1, 0, 1 or NaN)
    offset = torch.log(abs_g).sub_(lse)
    if head.logit_scale != 1.0:
        offset += math.log(head.logit_scale)
    onehot = abs_g * head.logit_scale
    row_lo = row.to(hidden.dtype)[:, None]
    buffers = TileBuffers(hidden.device)
    u = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
    grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    for v0, v1 in _spans(weight.shape[0], block):
        w = weight[v0:v1]
        b = None if bias is None else bias[v0:v1]
        gw = grad_w[v0:v1] if need_w else None
        gw_acc = None
        for s0, s1 in _spans(m, chunk):
            y = labels[s0:s1]
            h = hidden[s0:s1]
            tile, t = _tile_logits(h, w, b, head, acc, buffers, row_offset=offset[s0:s1])
            tile.exp_()
            rows = ((y >= v0) & (y < v1)).nonzero().squeeze(-1)
            cols = y[rows] - v0
            hit = onehot[s0:s1][rows]
            if t is not None:
                deriv = t.mul_(t).neg_().add_(1.0)  # (1 - tanh^2); the scale is in the offset
                tile.mul_(deriv)
                hit = hit * deriv[rows, cols]
            if low:
                # The label column's whole term (p_y |g| - hit) W[y] is added exactly in float32 and
                # the low-precision GEMM carries only the other columns: no bf16 partial sum has to
                # hold the large label term, and on a peaked distribution (p_y -> 1) the GEMM output
                # is not a near-cancellation of p_y W[y] against the one-hot part.
                tile[rows, cols] -= hit
                label_term = tile[rows, cols]
                tile_lo = buffers("tile_lo", tile.shape, hidden.dtype).copy_(tile)
                if need_h:
                    tile_lo[rows, cols] = 0
                    u[s0:s1] += _gemm_low(tile_lo, w, acc, buffers, "rows_lo")
                    u.index_add_(0, rows + s0, w[cols].to(acc).mul_(label_term[:, None]))
                    tile_lo[rows, cols] = label_term.to(hidden.dtype)
            else:
                tile[rows, cols] -= hit
                tile_lo = tile
                if need_h:
                    u[s0:s1].addmm_(tile, w)
            if need_b:
                grad_b[v0:v1].addmv_(tile.T, row[s0:s1])
            if need_w:
                tile_lo.mul_(row_lo[s0:s1])  # G = -s M: the (exact) sign moves onto the tile
                if s1 - s0 == m:  # one chunk holds every token: one GEMM writes the block
                    _mm_into(gw, tile_lo.T, h, acc)
                elif not low:
                    if s0 == 0:
                        torch.mm(tile_lo.T, h, out=gw)
                    else:
                        gw.addmm_(tile_lo.T, h)
                else:
                    part = _gemm_low(tile_lo.T, h, acc, buffers, "gw_lo")
                    if gw_acc is None:
                        gw_acc = buffers("gw_acc", part.shape, acc).copy_(part)
                    else:
                        gw_acc.add_(part)
        if gw_acc is not None:
            gw.copy_(gw_acc)
    grad_h = None
    if need_h:
        grad_h = u.mul_(row[:, None]).to(hidden.dtype)
    return grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> None:
    """out = a @ b, one GEMM in the operands' dtype rounded once to ``out``'s dtype."""
    native_out = a.dtype == acc or not _mm_out_dtype_supported(a.device, a.dtype)
    if native_out and a.dtype == out.dtype and out.is_contiguous():
        torch.mm(a, b, out=out)
    else:
        out.copy_(mm_native(a, b, acc))


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


def _no_autocast(device: torch.device):
    """Autocast off for this device type: the Functions compute in the inputs' dtype."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on a first-order gradient; differentiating through it raises a clear error.

    ``anchors`` (tensors that require grad) connect the gradient to the graph under
    ``create_graph=True``, so the error comes from here, not from autograd's "does not require grad".
    """

    @staticmethod
    def forward(ctx, grad, *anchors):  # noqa: D102
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):  # noqa: D102
        raise RuntimeError(
            "linear_logprobs: double backward (a gradient of its gradient) is not supported; the "
            "first-order gradients with create_graph=True are exact but cannot be differentiated again"
        )


def _guard_double_backward(grads: tuple, anchors: tuple) -> tuple:
    """Under create_graph=True, route each gradient through :class:`_NoDoubleBackward`."""
    if not torch.is_grad_enabled():
        return grads
    live = tuple(a for a in anchors if a is not None and a.requires_grad)
    if not live:
        return grads
    return tuple(g if g is None else _NoDoubleBackward.apply(g, *live) for g in grads)


def _nan_upstream(grad_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Upstream gradient with NaN on tokens whose log-prob is NaN: their gradients are NaN too."""
    bad = torch.isnan(logp)
    return grad_logp.masked_fill(bad, float("nan")) if bool(bad.any()) else grad_logp


class ChunkedLinearLogprobs(torch.autograd.Function):
    """Recompute path. Inputs are compacted: no ignored tokens. Options in a frozen HeadOptions."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, head):  # noqa: D102 - shapes in linear_logprobs
        with _no_autocast(hidden.device):
            logp, lse = chunked_forward(hidden, weight, bias, labels, head)
        release_freed_host_memory(hidden.device)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, logp)
        ctx.has_bias = bias is not None
        ctx.head = head
        return logp

    @staticmethod
    def backward(ctx, grad_logp):  # noqa: D102
        hidden, weight, bias, labels, lse, logp = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        with _no_autocast(hidden.device), torch.no_grad():
            grads = chunked_backward(_nan_upstream(grad_logp, logp), hidden, weight,
                                     bias if ctx.has_bias else None, labels, lse, needs, ctx.head)
        release_freed_host_memory(hidden.device)
        return (*_guard_double_backward(grads, (grad_logp, hidden, weight, bias)), None, None)


class FrozenHeadLinearLogprobs(torch.autograd.Function):
    """Frozen-head path: gradient w.r.t. hidden only; D (M, H) float32 saved by the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, head, anchor):  # noqa: D102
        with _no_autocast(hidden.device):
            logp, direction = frozen_head_forward(hidden, weight, bias, labels, head)
        release_freed_host_memory(hidden.device)
        ctx.save_for_backward(direction, logp, anchor)
        ctx.hidden_dtype = hidden.dtype
        return logp

    @staticmethod
    def backward(ctx, grad_logp):  # noqa: D102
        direction, logp, anchor = ctx.saved_tensors
        with torch.no_grad():
            g = _nan_upstream(grad_logp, logp).to(direction.dtype)[:, None]
            if direction.dtype == ctx.hidden_dtype:
                grad_h = direction * g
            else:  # rounded once from float32, written by row slices: no (M, H) float32 temporary
                grad_h = torch.empty(direction.shape, dtype=ctx.hidden_dtype, device=direction.device)
                for r0, r1 in _spans(direction.shape[0], _row_step(direction.shape[1])):
                    grad_h[r0:r1] = direction[r0:r1] * g[r0:r1]
        return (*_guard_double_backward((grad_h,), (grad_logp, anchor)), None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def _triton_module():
    try:
        from safedpo_kernels import triton_logprobs
    except ImportError as exc:  # triton missing, or the kernels not shipped in this build
        raise NotImplementedError(
            f"linear_logprobs(impl='triton') needs the Triton kernels, which could not be imported ({exc}); "
            "use impl='torch' or install triton"
        ) from exc
    return triton_logprobs


def _resolve_impl(impl: str, device: torch.device) -> str:
    check_choice("impl", impl, IMPLS)
    if impl == "auto":
        if device.type != "cuda":
            return "torch"
        try:
            return "triton" if _triton_module().triton_is_usable(device) else "torch"
        except NotImplementedError:
            return "torch"
    if impl == "triton" and not _triton_module().triton_is_usable(device):
        raise ValueError(
            f"impl: 'triton' needs a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter), "
            f"got tensors on {device}"
        )
    return impl


def _empty_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A (0,) result still connected to every input, so backward gives zero gradients."""
    acc = _acc_dtype(hidden.dtype)
    with _no_autocast(hidden.device):
        out = (hidden[:0].to(acc) @ weight[:0].to(acc).T).sum(-1)
        if bias is not None:
            out = out + bias[:0].to(acc).sum()
    return out


def torch_linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    head: HeadOptions = HeadOptions(),
) -> torch.Tensor:
    """The torch path on compacted inputs: hidden (M, H), labels (M,) int64 in [0, V), M >= 1.

    Picks the Function: frozen head (hidden needs a gradient, weight and bias do not), recompute
    path (weight or bias needs one), or the forward sweep alone (no gradient needed).
    """
    grad = torch.is_grad_enabled()
    need_h = grad and hidden.requires_grad
    need_wb = grad and any(t is not None and t.requires_grad for t in (weight, bias))
    if need_wb:
        return ChunkedLinearLogprobs.apply(hidden, weight, bias, labels, head)
    if need_h:
        # A 0-dim zero whose graph leads to hidden without keeping it alive (SliceBackward and
        # SumBackward save sizes only): lets a double backward reach the clear error.
        anchor = hidden[:0].sum()
        return FrozenHeadLinearLogprobs.apply(hidden, weight, bias, labels, head, anchor)
    with _no_autocast(hidden.device), torch.no_grad():
        logp = chunked_forward(hidden, weight, bias, labels, head)[0]
    release_freed_host_memory(hidden.device)
    return logp


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    impl: str = "auto",
    deterministic: bool = False,
    grad_filter: bool = False,
) -> torch.Tensor:
    """Per-token log-probs of a linear head, never materializing the (tokens x vocab) logits.

    Args:
        hidden: (..., H) float32 / float16 / bfloat16 (float64 for the torch path) hidden states.
        weight: (V, H) head weight, same dtype and device as ``hidden``.
        labels: (...) integer targets in [0, V), or ``ignore_index``.
        bias: optional (V,) head bias.
        ignore_index: label value that marks tokens without a target (prompt, padding); an integer.
        logit_scale: finite > 0; logits are multiplied by it (Cohere ``logit_scale``, Granite
            ``1 / logits_scaling``).
        softcap: None or finite > 0; logits become ``softcap * tanh(logit_scale * z / softcap)``
            (Gemma 2 ``final_logit_softcapping``).
        impl: "auto" (Triton on CUDA, torch otherwise), "torch" or "triton".
        deterministic: Triton path only: bit-identical gradients from run to run.
        grad_filter: Triton path only: skip backward tiles whose softmax is below the dtype's
            resolution (an approximation; see docs/kernels.md for its measured error).

    Returns:
        float32 tensor with ``labels``' shape (float64 for float64 inputs on the torch path):
        ``log_softmax(l)[labels]``, exactly 0.0 where ``labels == ignore_index``, NaN where an input
        of that token is non-finite. Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``
        (first order; double backward raises). Autocast does not change it: the computation runs
        in the inputs' dtype with float32 accumulation. With ``weight`` and ``bias`` frozen and
        ``hidden`` requiring grad, the frozen-head path is used automatically.
    """
    ignore_index = check_linear_inputs(hidden, weight, labels, bias, ignore_index)
    head = HeadOptions(*check_logit_transform(logit_scale, softcap))
    for name, flag in (("deterministic", deterministic), ("grad_filter", grad_filter)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    path = _resolve_impl(impl, hidden.device)
    if path == "triton" and hidden.dtype == torch.float64:
        raise TypeError("hidden: impl='triton' supports float32, float16 and bfloat16, got torch.float64")

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    keep = (flat_labels != ignore_index).nonzero().squeeze(-1)
    compact = keep.numel() < flat_labels.numel()
    # Gather the loss tokens; with none ignored, use the inputs as they are (no copy, no scatter).
    h = flat_hidden.index_select(0, keep) if compact else flat_hidden
    y = (flat_labels.index_select(0, keep) if compact else flat_labels).long()
    if keep.numel() == 0:
        picked = _empty_logprobs(h, weight, bias)
    elif path == "triton":
        # The transform keywords are passed only when set, so a plain head also works with kernels
        # that predate them.
        transform = {} if head == HeadOptions() else {"logit_scale": head.logit_scale, "softcap": head.softcap}
        picked = _triton_module().triton_linear_logprobs(
            h, weight, y, bias, deterministic=deterministic, grad_filter=grad_filter, **transform,
        )
    else:
        picked = torch_linear_logprobs(h, weight, y, bias, head)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    picked = picked.to(out_dtype)
    if not compact:
        return picked.reshape(labels.shape)
    out = torch.zeros(flat_labels.shape[0], dtype=out_dtype, device=hidden.device)
    return out.index_put((keep,), picked).reshape(labels.shape)
