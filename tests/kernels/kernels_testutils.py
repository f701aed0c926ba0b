"""Shared helpers for the kernel tests: inputs, the float64 eager reference, error measures.

Tolerances: a low-precision result passes when its relative error against float64 is no worse
than the same-dtype eager PyTorch result's times 1.25, plus eps/8 of the dtype, plus 4 float32
ulps (the kernels return float32 / accumulate in float32: a few ulps of rounding even where eager
happens to be exact, e.g. one token). Eager rounds logits, softmax and gradients to the dtype; the
kernels accumulate in float32, so they are usually better (see docs/kernels.md).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "kernel tests run under the Triton interpreter (tests/conftest.py)"

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str):
    """Import ``scripts/<name>.py`` afresh as module ``name`` (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def make_inputs(m: int, h: int, v: int, *, bias: bool = True, peaked: float = 0.0):
    """float32 hidden (m, h), weight (v, h), bias (v,) | None, labels (m,) int64, upstream g (m,).

    ``peaked > 0`` aligns each hidden row with its label's weight row (softmax concentrated on the
    label, like a trained LM), so most (token, vocab) tiles hold only tiny probabilities.
    """
    weight = torch.randn(v, h) / h**0.5
    labels = torch.randint(0, v, (m,))
    hidden = torch.randn(m, h)
    if peaked:
        hidden = peaked * weight[labels] / weight[labels].norm(dim=1, keepdim=True) + 0.3 * hidden
    b = 0.5 * torch.randn(v) if bias else None
    g = torch.randn(m)
    return hidden, weight, b, labels, g


def eager_logprobs(hidden, weight, bias, labels, *, logit_scale=1.0, softcap=None):
    """Eager reference in the inputs' dtype: transform(hidden @ weight.T + bias), log_softmax, gather."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits * (logit_scale / softcap))
    else:
        logits = logits * logit_scale
    return torch.log_softmax(logits, dim=-1).gather(1, labels[:, None])[:, 0]


def values_and_grads(fn, hidden, weight, bias, labels, g, dtype, *, only_hidden=False):
    """Run ``fn(hidden, weight, bias, labels)`` on copies cast to ``dtype``; return (logp, grads)
    (grads of hidden, weight, bias; of hidden alone with ``only_hidden``, a frozen head)."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = fn(leaves[0], leaves[1], leaves[2], labels)
    present = [t for t in leaves[: 1 if only_hidden else 3] if t is not None]
    grads = torch.autograd.grad(out, present, g.to(out.dtype))
    return out.detach(), list(grads)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def errors(result, ref) -> list[float]:
    (v, gs), (rv, rgs) = result, ref
    return [rel_err(v, rv)] + [rel_err(a, b) for a, b in zip(gs, rgs)]


def bound(eager_errs: list[float], dtype: torch.dtype) -> list[float]:
    floor = torch.finfo(dtype).eps / 8 + 4 * torch.finfo(torch.float32).eps
    return [1.25 * e + floor for e in eager_errs]
