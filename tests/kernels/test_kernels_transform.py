"""Logit transforms (logit_scale, softcap), non-finite inputs and double backward on the Triton path."""

import functools

import pytest
import torch
from kernels_testutils import DTYPES, bound, eager_logprobs, errors, make_inputs, values_and_grads

from safedpo_kernels.triton_logprobs import KernelStats, triton_linear_logprobs

TRANSFORMS = [(0.37, None), (1.0, 3.0), (2.5, 1.5)]  # (logit_scale, softcap): Granite-, Gemma-like


def _run(inputs, dtype, *, frozen=False, **kw):
    """(kernel result, bound from eager in ``dtype``, float64 reference) of values and gradients."""
    hidden, weight, b, labels, g = inputs
    transform = {k: kw[k] for k in ("logit_scale", "softcap") if k in kw}
    ref_fn = functools.partial(eager_logprobs, **transform)
    if frozen:  # only hidden differentiable: the frozen-head kernel
        def ref_fn(h, w, bb, y, _f=ref_fn):  # noqa: E306
            return _f(h, w.detach(), None if bb is None else bb.detach(), y)

    def kernel(h, w, bb, y):
        if frozen:
            w, bb = w.detach(), None if bb is None else bb.detach()
        return triton_linear_logprobs(h, w, y, bb, **kw)

    ref = values_and_grads(ref_fn, hidden, weight, b, labels, g, torch.float64, only_hidden=frozen)
    eager = values_and_grads(ref_fn, hidden, weight, b, labels, g, dtype, only_hidden=frozen)
    out = values_and_grads(kernel, hidden, weight, b, labels, g, dtype, only_hidden=frozen)
    return out, errors(out, ref), bound(errors(eager, ref), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale,cap", TRANSFORMS)
def test_transform_values_and_grads_match_float64(seed, dtype, scale, cap):
    bias = cap is not None
    _, errs, limits = _run(make_inputs(37, 72, 333, bias=bias), dtype, logit_scale=scale, softcap=cap)
    assert all(e <= lim for e, lim in zip(errs, limits)), (errs, limits)


@pytest.mark.parametrize("deterministic", [False, True])
def test_softcap_saturated_logits_and_deterministic(seed, deterministic):
    # large logits: tanh saturates (slope ~ 0) on part of the tiles; the cap is small
    hidden, weight, b, labels, g = make_inputs(37, 72, 333)
    inputs = (4.0 * hidden, weight, b, labels, g)
    _, errs, limits = _run(inputs, torch.float32, softcap=2.0, deterministic=deterministic)
    assert all(e <= lim for e, lim in zip(errs, limits)), (errs, limits)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns on the inf/NaN rows
def test_non_finite_inputs_give_non_finite_logprobs(seed, frozen, cap):
    hidden, weight, b, labels, _ = make_inputs(37, 72, 333)
    hidden[5, 3] = float("inf")
    hidden[9, 0] = float("-inf")
    hidden[11, 7] = float("nan")
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(not frozen)
    stats = KernelStats()
    out = triton_linear_logprobs(h, w, labels, b, softcap=cap, stats=stats)
    assert stats.frozen_head == frozen
    bad = torch.zeros(37, dtype=torch.bool)
    bad[[5, 9, 11]] = True
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()
    (gh,) = torch.autograd.grad(out.sum(), h)
    assert torch.isnan(gh[bad]).all(dim=1).all() and torch.isfinite(gh[~bad]).all()
    # a non-finite weight entry or bias entry reaches every token
    for tensor, index in ((weight, (200, 4)), (b, (17,))):
        broken = tensor.clone()
        broken[index] = float("-inf")
        args = (weight, broken) if tensor is b else (broken, b)
        out = triton_linear_logprobs(hidden[~bad], args[0], labels[~bad], args[1], softcap=cap)
        assert torch.isnan(out).all()


@pytest.mark.parametrize("frozen", [False, True])
def test_double_backward_raises_a_clear_error(seed, frozen):
    hidden, weight, b, labels, _ = make_inputs(5, 16, 40)
    h = hidden.requires_grad_()
    w = weight.requires_grad_(not frozen)
    out = triton_linear_logprobs(h, w, labels, b)
    with pytest.raises(RuntimeError, match="triton_linear_logprobs.*double backward.*not supported"):
        torch.autograd.grad(out.sum(), h, create_graph=True)


def test_bad_transform_arguments():
    h, w, labels = torch.randn(3, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long)
    for bad in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="logit_scale"):
            triton_linear_logprobs(h, w, labels, logit_scale=bad)
    for bad in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="softcap"):
            triton_linear_logprobs(h, w, labels, softcap=bad)
    with pytest.raises(ValueError, match="variant"):
        triton_linear_logprobs(h, w, labels, variant="fastest")
