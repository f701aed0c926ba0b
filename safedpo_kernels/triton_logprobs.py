"""Autograd over the fused Triton log-prob kernels (``safedpo_kernels.kernels``).

``triton_linear_logprobs(hidden, weight, labels, bias, logit_scale=, softcap=)`` returns
``log_softmax(transform(hidden @ weight.T + bias))[labels]`` as float32 (M,), never materializing
the (M, V) logits. The caller (``safedpo_kernels.logprobs.linear_logprobs``) has already validated
the inputs and removed ignored tokens. Three paths:

* no gradient needed (``no_grad``, a reference model): the forward kernel alone, nothing saved;
* frozen head (only ``hidden`` requires grad): ``TritonFrozenHeadLogprobs``, whose forward kernel
  also produces d logp / d hidden (float32 (M, H), saved), backward elementwise (4NHV in all);
* otherwise ``TritonLinearLogprobs`` saves hidden, weight, bias, labels, the (M,) log-sum-exp and
  1 - p(label), and its backward recomputes the logits and computes only the gradients that
  ``ctx.needs_input_grad`` asks for (8NHV in all).

Both backwards raise a RuntimeError under ``create_graph=True`` (no double backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

try:
    from safedpo_kernels.kernels import (
        INTERPRETING,
        KernelStats,
        KernelVariant,
        backward_logprobs,
        finish_logprobs,
        forward_logprobs,
        frozen_forward,
        get_variant,
    )
except ImportError:  # pragma: no cover - no triton in this environment
    INTERPRETING = False
    backward_logprobs = forward_logprobs = frozen_forward = finish_logprobs = get_variant = None  # type: ignore[assignment]
    KernelStats = KernelVariant = None  # type: ignore[assignment,misc]

__all__ = ["KernelStats", "LogprobOptions", "triton_is_usable", "triton_linear_logprobs"]


@dataclass(frozen=True)
class LogprobOptions:
    """Everything besides the tensors: the logit transform (``logit_scale``, ``softcap``),
    ``deterministic`` (bit-identical gradients, no atomics), ``grad_filter`` (skip tiles whose
    softmax is below the dtype's resolution), the kernel ``variant`` and an optional ``stats``."""

    logit_scale: float = 1.0
    softcap: float | None = None
    deterministic: bool = False
    grad_filter: bool = False
    variant: KernelVariant | None = None
    stats: KernelStats | None = field(default=None, compare=False)


_DOUBLE_BACKWARD = (
    "triton_linear_logprobs (the Triton path of linear_logprobs): double backward (create_graph=True "
    "through the log-probs) is not supported; use impl='torch' with eager logits for higher-order gradients"
)


class TritonLinearLogprobs(torch.autograd.Function):
    """Recompute path. Tensors positional (hidden, weight, bias, labels), then ``LogprobOptions``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, options: LogprobOptions):  # noqa: D102
        logp, lse, one_minus_p = forward_logprobs(
            hidden, weight, labels, bias, logit_scale=options.logit_scale, softcap=options.softcap,
            grouped=options.variant.grouped_forward,
        )  # fmt: skip
        ctx.save_for_backward(hidden, weight, bias, labels, lse, one_minus_p)
        ctx.options = options
        return logp

    @staticmethod
    def backward(ctx, grad_logp):  # noqa: D102
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        hidden, weight, bias, labels, lse, one_minus_p = ctx.saved_tensors
        opt = ctx.options
        grads = backward_logprobs(
            grad_logp, hidden, weight, bias, labels, lse, one_minus_p,
            needs=tuple(ctx.needs_input_grad[:3]), logit_scale=opt.logit_scale, softcap=opt.softcap,
            deterministic=opt.deterministic, grad_filter=opt.grad_filter, variant=opt.variant, stats=opt.stats,
        )  # fmt: skip
        return (*grads, None, None)


class TritonFrozenHeadLogprobs(torch.autograd.Function):
    """Frozen-head path (only ``hidden`` needs a gradient): the forward kernel also produces the
    float32 (M, H) rows R = d logp / d hidden, the backward is ``g[:, None] * R``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, options: LogprobOptions):  # noqa: D102
        lse, target, other, grad_rows = frozen_forward(
            hidden, weight, labels, bias, logit_scale=options.logit_scale, softcap=options.softcap,
            pair=options.variant.frozen_pair,
        )
        ctx.save_for_backward(grad_rows)
        ctx.hidden_dtype = hidden.dtype
        if options.stats is not None:
            options.stats.frozen_head = True
        return finish_logprobs(lse, target, other)[0]

    @staticmethod
    def backward(ctx, grad_logp):  # noqa: D102
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        (grad_rows,) = ctx.saved_tensors
        grad_hidden = (grad_logp.to(torch.float32)[:, None] * grad_rows).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None


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


def _check(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    logit_scale: float,
    softcap: float | None,
) -> None:
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
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale: expected a finite real number, got {logit_scale!r}")
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (0 < softcap < math.inf)
    ):
        raise ValueError(f"softcap: expected None or a finite number > 0, got {softcap!r}")


def triton_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    deterministic: bool = False,
    grad_filter: bool = False,
    variant: str | None = None,
    stats: KernelStats | None = None,
) -> torch.Tensor:
    """Per-token log-probs ``log_softmax(logits)[labels]`` with the fused kernels, where
    ``logits = softcap * tanh(logit_scale * z / softcap)`` (or ``logit_scale * z`` without a cap)
    and ``z = hidden @ weight.T + bias``; the (M, V) logits never exist in memory.

    Args:
        hidden: (M, H) float32 / float16 / bfloat16, M >= 1, no ignored tokens. Any strides.
        weight: (V, H), same dtype and device. Any strides.
        labels: (M,) int64 in [0, V).
        bias: (V,) same dtype, or None.
        logit_scale: finite real multiplier of z (Cohere ``logit_scale``, Granite ``1/logits_scaling``).
        softcap: None, or the cap > 0 (Gemma 2 ``final_logit_softcapping``).
        deterministic: gradients bit-identical from run to run (owner-computes kernels, no atomics;
            recomputes the logits once more, see docs/kernels.md).
        grad_filter: skip backward tiles whose softmax values are all below the dtype's resolution
            and that hold no label (approximate; error measured in docs/kernels.md).
        variant: one of ``safedpo_kernels.kernels.KERNEL_VARIANTS`` (None = "default").
        stats: a ``KernelStats`` to fill in (variant, frozen-head, tiles evaluated and skipped by
            filtering), e.g. ``stats.skipped_fraction`` after the backward.

    When ``hidden`` requires grad and neither ``weight`` nor ``bias`` does (a frozen head, e.g.
    LoRA), the frozen-head kernel runs instead (4NHV: the forward also accumulates d logp / d
    hidden into a float32 (M, H) buffer; the backward is elementwise; deterministic by
    construction; ``grad_filter`` does not apply). The variant "no_frozen_kernel" turns this off.

    Returns:
        (M,) float32 log-probs; differentiable w.r.t. hidden, weight and bias (first order only:
        double backward raises a RuntimeError). Gradients come back in the inputs' dtypes,
        accumulated in float32. A token whose logits contain a non-finite value gets a NaN
        log-prob (and NaN gradients).
    """
    _check(hidden, weight, labels, bias, logit_scale, softcap)
    chosen = get_variant(variant)
    options = LogprobOptions(
        logit_scale=float(logit_scale), softcap=None if softcap is None else float(softcap),
        deterministic=deterministic or chosen.det_pair, grad_filter=grad_filter or chosen.vocab_order,
        variant=chosen, stats=stats,
    )  # fmt: skip
    if stats is not None:
        stats.variant = chosen.name
    head_grad = any(t is not None and t.requires_grad for t in (weight, bias))
    if torch.is_grad_enabled() and (hidden.requires_grad or head_grad):
        if chosen.frozen_kernel and not head_grad:
            return TritonFrozenHeadLogprobs.apply(hidden, weight, bias, labels, options)
        return TritonLinearLogprobs.apply(hidden, weight, bias, labels, options)
    return forward_logprobs(
        hidden, weight, labels, bias, logit_scale=options.logit_scale, softcap=options.softcap,
        grouped=chosen.grouped_forward,
    )[0]  # fmt: skip
