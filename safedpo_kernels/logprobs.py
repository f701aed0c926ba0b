"""``linear_logprobs``: per-token log-probs of a linear head without materializing the logits.

Two exact paths compute ``log_softmax(hidden @ weight.T + bias)[label]`` and its gradients:

* ``impl="torch"``: a chunked ``torch.autograd.Function`` that runs on any device. Tokens are
  processed in chunks whose ``chunk x vocab_block`` float32 logits fit a memory budget; only the
  per-token log-sum-exp (N floats) is kept between forward and backward, and each chunk's logits
  are recomputed in backward. All arithmetic is float32 (float64 for float64 inputs).
* ``impl="triton"``: the fused Triton kernels (``safedpo_kernels.triton_logprobs``).

Both see only the tokens whose label is not ``ignore_index``: those are gathered before any matmul
and the result is scattered back with exact zeros at ignored positions.
"""

from __future__ import annotations

import os

import torch

from safedpo_kernels._checks import IMPLS, check_choice, check_linear_inputs

#: Bytes of float32 logits (and their softmax / gradient) one chunk may hold at once.
#: Override with the environment variable SAFEDPO_CHUNK_BUDGET_MB.
DEFAULT_CHUNK_BUDGET_BYTES = 48 * 2**20
#: Rows of the weight upcast to float32 at a time for bf16/fp16 inputs (float32 weights are used
#: in place, as one block).
LOW_PRECISION_VOCAB_BLOCK = 8192
#: float32 buffers of shape (chunk, vocab_block) alive at once inside a chunk (logits, probs, grad).
_LIVE_BUFFERS = 3


def _chunk_budget_bytes() -> int:
    env = os.environ.get("SAFEDPO_CHUNK_BUDGET_MB")
    if env is None:
        return DEFAULT_CHUNK_BUDGET_BYTES
    try:
        mb = float(env)
    except ValueError:
        raise ValueError(f"SAFEDPO_CHUNK_BUDGET_MB: expected a number of MiB, got {env!r}") from None
    if mb <= 0:
        raise ValueError(f"SAFEDPO_CHUNK_BUDGET_MB: expected a number > 0, got {env!r}")
    return int(mb * 2**20)


def chunk_sizes(num_tokens: int, vocab: int, dtype: torch.dtype) -> tuple[int, int]:
    """(token chunk, vocab block) for the torch path: ``chunk * vocab_block * 4 * 3 <= budget``."""
    vocab_block = vocab if dtype in (torch.float32, torch.float64) else min(vocab, LOW_PRECISION_VOCAB_BLOCK)
    elem = 8 if dtype == torch.float64 else 4
    chunk = _chunk_budget_bytes() // max(1, vocab_block * elem * _LIVE_BUFFERS)
    return max(1, min(num_tokens, chunk)), vocab_block


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# The chunked torch path
# ---------------------------------------------------------------------------------------------


def _vocab_blocks(weight: torch.Tensor, bias: torch.Tensor | None, vocab_block: int, acc: torch.dtype):
    """Yield (start, weight block, bias block) upcast to the accumulation dtype."""
    for v0 in range(0, weight.shape[0], vocab_block):
        w = weight[v0 : v0 + vocab_block].to(acc)
        b = None if bias is None else bias[v0 : v0 + vocab_block].to(acc)
        yield v0, w, b


def _target_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor):
    """z_i = h_i . W[y_i] + b[y_i] for a chunk, in the accumulation dtype h already has."""
    z = (h * weight[labels].to(h.dtype)).sum(-1)
    if bias is not None:
        z = z + bias[labels].to(h.dtype)
    return z


def chunked_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and log-sum-exp, (M,) each, float32 (float64 for float64 inputs).

    For each token chunk: lse = logsumexp over vocab blocks of h @ W_blk.T + b_blk (an online
    log-sum-exp across blocks), logp = h . W[y] + b[y] - lse.
    """
    m = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    chunk, vocab_block = chunk_sizes(m, weight.shape[0], hidden.dtype)
    logp = torch.empty(m, dtype=acc, device=hidden.device)
    lse = torch.empty(m, dtype=acc, device=hidden.device)
    for s in range(0, m, chunk):
        h = hidden[s : s + chunk].to(acc)
        run = torch.full((h.shape[0],), float("-inf"), dtype=acc, device=hidden.device)
        for _, w, b in _vocab_blocks(weight, bias, vocab_block, acc):
            logits = h @ w.T
            if b is not None:
                logits += b
            run = torch.logaddexp(run, torch.logsumexp(logits, dim=-1))
        lse[s : s + chunk] = run
        logp[s : s + chunk] = _target_logits(h, weight, bias, labels[s : s + chunk]) - run
    return logp, lse


def chunked_backward(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum(g * logp) w.r.t. (hidden, weight, bias), returned in the inputs' dtypes.

    d logp_i / d z_ij = onehot(y_i)_j - softmax_ij, so with G = g * (onehot - softmax), recomputed
    per chunk and vocab block from the saved lse:
        grad_hidden = G @ W,   grad_weight = G.T @ H,   grad_bias = G.sum(0).
    The one-hot part is added into the block's G in place (one element per token whose target falls
    in the block), so no (tokens x vocab) one-hot and no scattered index_add over the weight.
    """
    need_h, need_w, need_b = needs
    m = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    chunk, vocab_block = chunk_sizes(m, weight.shape[0], hidden.dtype)
    grad_h = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    g_all = grad_logp.to(acc)
    for s in range(0, m, chunk):
        h = hidden[s : s + chunk].to(acc)
        y = labels[s : s + chunk]
        g = g_all[s : s + chunk]
        gh = torch.zeros_like(h) if need_h else None
        for v0, w, b in _vocab_blocks(weight, bias, vocab_block, acc):
            logits = h @ w.T
            if b is not None:
                logits += b
            # G = g * (onehot - softmax), in place on the logits buffer.
            grad_z = logits.sub_(lse[s : s + chunk, None]).exp_().mul_(-g[:, None])
            rows = ((y >= v0) & (y < v0 + w.shape[0])).nonzero().squeeze(-1)
            grad_z[rows, y[rows] - v0] += g[rows]
            if need_h:
                gh.addmm_(grad_z, w)
            if need_w:
                grad_w[v0 : v0 + w.shape[0]].addmm_(grad_z.T, h)
            if need_b:
                grad_b[v0 : v0 + w.shape[0]] += grad_z.sum(0)
        if need_h:
            grad_h[s : s + chunk] = gh
    return (
        None if grad_h is None else grad_h.to(hidden.dtype),
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )


class ChunkedLinearLogprobs(torch.autograd.Function):
    """Autograd over the chunked torch path. Inputs are compacted: no ignored tokens."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):  # noqa: D102 - shapes in linear_logprobs
        logp, lse = chunked_forward(hidden, weight, bias, labels)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.has_bias = bias is not None
        return logp.float() if hidden.dtype != torch.float64 else logp

    @staticmethod
    def backward(ctx, grad_logp):  # noqa: D102
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        gh, gw, gb = chunked_backward(grad_logp, hidden, weight, bias if ctx.has_bias else None, labels, lse, needs)
        return gh, gw, gb, None


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
    """A (0,) float32 result still connected to every input, so backward gives zero gradients."""
    out = (hidden[:0].float() @ weight[:0].float().T).sum(-1)
    if bias is not None:
        out = out + bias[:0].float().sum()
    return out


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
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
        ignore_index: label value that marks tokens without a target (prompt, padding).
        impl: "auto" (Triton on CUDA, torch otherwise), "torch" or "triton".
        deterministic: Triton path only: bit-identical gradients from run to run.
        grad_filter: Triton path only: skip backward tiles whose softmax is below the dtype's
            resolution (an approximation; see docs/kernels.md for its measured error).

    Returns:
        float32 tensor with ``labels``' shape (float64 for float64 inputs on the torch path):
        ``log_softmax(hidden @ weight.T + bias)[labels]``, exactly 0.0 where ``labels == ignore_index``.
        Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    check_linear_inputs(hidden, weight, labels, bias, ignore_index)
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
        picked = _triton_module().triton_linear_logprobs(
            h, weight, y, bias, deterministic=deterministic, grad_filter=grad_filter
        )
    elif torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    ):
        picked = ChunkedLinearLogprobs.apply(h, weight, bias, y)
    else:
        picked = chunked_forward(h, weight, bias, y)[0]
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    picked = picked.to(out_dtype)
    if not compact:
        return picked.reshape(labels.shape)
    out = torch.zeros(flat_labels.shape[0], dtype=out_dtype, device=hidden.device)
    return out.index_put((keep,), picked).reshape(labels.shape)
