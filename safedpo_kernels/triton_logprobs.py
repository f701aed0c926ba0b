"""Autograd over the fused Triton log-prob kernels (``safedpo_kernels.kernels``).

``triton_linear_logprobs(hidden, weight, labels, bias)`` returns ``log_softmax(hidden @ weight.T
+ bias)[labels]`` as float32 (M,), never materializing the (M, V) logits. The caller
(``safedpo_kernels.logprobs.linear_logprobs``) has already validated the inputs and removed
ignored tokens. Under ``no_grad`` (or when nothing requires grad) it runs the forward kernel
alone and keeps nothing for backward; otherwise the autograd Function saves hidden, weight,
bias, labels, the (M,) log-sum-exp and 1 - p(label), and computes in ``backward`` only the gradients that
``ctx.needs_input_grad`` asks for (a frozen lm_head costs no grad_weight work).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    from safedpo_kernels.kernels import INTERPRETING, backward_logprobs, forward_logprobs
except ImportError:  # pragma: no cover - no triton in this environment
    INTERPRETING = False
    backward_logprobs = forward_logprobs = None  # type: ignore[assignment]

__all__ = ["LogprobOptions", "triton_is_usable", "triton_linear_logprobs"]


@dataclass(frozen=True)
class LogprobOptions:
    """Backward options: ``deterministic`` (bit-identical gradients, no atomics) and
    ``grad_filter`` (skip tiles whose softmax is below the dtype's resolution)."""

    deterministic: bool = False
    grad_filter: bool = False


class TritonLinearLogprobs(torch.autograd.Function):
    """Tensors positional (hidden, weight, bias, labels), then one ``LogprobOptions``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, options: LogprobOptions):  # noqa: D102
        logp, lse, one_minus_p = forward_logprobs(hidden, weight, labels, bias)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, one_minus_p)
        ctx.options = options
        return logp

    @staticmethod
    def backward(ctx, grad_logp):  # noqa: D102
        hidden, weight, bias, labels, lse, one_minus_p = ctx.saved_tensors
        grads = backward_logprobs(
            grad_logp, hidden, weight, bias, labels, lse, one_minus_p,
            needs=tuple(ctx.needs_input_grad[:3]),
            deterministic=ctx.options.deterministic,
            grad_filter=ctx.options.grad_filter,
        )  # fmt: skip
        return (*grads, None, None)


def triton_is_usable(device: torch.device) -> bool:
    """True when the kernels can run on ``device``: CUDA with triton, or the CPU interpreter.

    The CPU case needs ``TRITON_INTERPRET=1`` set before triton was first imported (that is when
    ``triton.jit`` decides between compiling and interpreting).
    """
    if forward_logprobs is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return not INTERPRETING and torch.cuda.is_available()
    return device.type == "cpu" and INTERPRETING


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Cheap shape / dtype checks (the public API validates values; this guards direct callers)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden, weight: expected (M, H) and (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.shape[0] < 1:
        raise ValueError("hidden: expected at least one token (M >= 1), got M=0")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16) or weight.dtype != hidden.dtype:
        raise TypeError(
            f"hidden, weight: expected the same dtype among float32/float16/bfloat16, got {hidden.dtype} and {weight.dtype}"
        )
    if labels.shape != (hidden.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"labels: expected shape ({hidden.shape[0]},) int64, got {tuple(labels.shape)} {labels.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},) {hidden.dtype}, got {tuple(bias.shape)} {bias.dtype}")


def triton_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    deterministic: bool = False,
    grad_filter: bool = False,
) -> torch.Tensor:
    """Per-token log-probs ``log_softmax(hidden @ weight.T + bias)[labels]`` with the fused kernels.

    Args:
        hidden: (M, H) float32 / float16 / bfloat16, M >= 1, no ignored tokens. Any strides.
        weight: (V, H), same dtype and device. Any strides.
        labels: (M,) int64 in [0, V).
        bias: (V,) same dtype, or None.
        deterministic: gradients bit-identical from run to run (owner-computes kernels, no atomics;
            recomputes the logits once more, see docs/kernels.md).
        grad_filter: skip backward tiles whose softmax values are all below the dtype's resolution
            and that hold no label (approximate; error measured in docs/kernels.md).

    Returns:
        (M,) float32 log-probs; differentiable w.r.t. hidden, weight and bias. Gradients come back
        in the inputs' dtypes, accumulated in float32.
    """
    _check(hidden, weight, labels, bias)
    tensors = (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        options = LogprobOptions(deterministic=deterministic, grad_filter=grad_filter)
        return TritonLinearLogprobs.apply(hidden, weight, bias, labels, options)
    return forward_logprobs(hidden, weight, labels, bias)[0]
