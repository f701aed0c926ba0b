"""Shared helpers for the torch-path tests: inputs, the float64 eager reference, error measure."""

from __future__ import annotations

import pytest
import torch

import safedpo_kernels.logprobs as lp
from safedpo_kernels.reference import reference_linear_logprobs


def make_inputs(shape, h, v, dtype, ignore_frac=0.3, bias=False):
    """hidden (*shape, h) with logits of std ~2-4, weight (v, h), labels (*shape,) with ignored tokens."""
    hidden = torch.randn(*shape, h, dtype=dtype) * 2
    weight = torch.randn(v, h, dtype=dtype) / h**0.25
    labels = torch.randint(0, v, shape)
    labels[torch.rand(shape) < ignore_frac] = -100
    b = torch.randn(v, dtype=dtype) if bias else None
    return hidden, weight, labels, b


def f64_grads(hidden, weight, labels, bias, upstream, wrt=("hidden", "weight", "bias"), **head):
    """float64 eager log-probs and the gradients of sum(upstream * logp) w.r.t. ``wrt``."""
    named = {"hidden": hidden.detach().double().requires_grad_(), "weight": weight.detach().double().requires_grad_(),
             "bias": None if bias is None else bias.detach().double().requires_grad_()}
    out = reference_linear_logprobs(named["hidden"], named["weight"], labels, bias=named["bias"], **head)
    leaves = [named[k] for k in wrt if named[k] is not None]
    grads = torch.autograd.grad((out * upstream.double()).sum(), leaves)
    return out.detach(), grads


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error against a float64 reference."""
    ref = ref.detach()
    return float((a.detach().double() - ref).norm() / ref.norm().clamp_min(1e-300))


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several token chunks and several vocab blocks on tiny shapes (V=333: 7-token chunks,
    100-row vocab blocks for float32; smaller blocks where a weight-gradient block shares the budget)."""
    monkeypatch.setattr(lp, "MIN_TOKEN_CHUNK", 7)
    monkeypatch.setenv("SAFEDPO_CHUNK_BUDGET_MB", str(7 * 100 * 4 * 3 / 2**20))
