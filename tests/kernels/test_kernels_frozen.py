"""Frozen-head kernel (only hidden needs a gradient): values and grad_hidden against float64."""

import pytest
import torch
from kernels_testutils import DTYPES, bound, eager_logprobs, errors, make_inputs, values_and_grads

from safedpo_kernels.kernels import frozen_forward
from safedpo_kernels.triton_logprobs import KernelStats, triton_linear_logprobs


def _frozen_compare(inputs, dtype, **kw):
    hidden, weight, b, labels, g = inputs
    stats = KernelStats()

    def kernel(h, w, bb, y):
        return triton_linear_logprobs(h, w.detach(), y, None if bb is None else bb.detach(), stats=stats, **kw)

    def eager(h, w, bb, y):
        return eager_logprobs(h, w, bb, y, **{k: v for k, v in kw.items() if k != "variant"})

    ref = values_and_grads(eager, hidden, weight, b, labels, g, torch.float64, only_hidden=True)
    eag = values_and_grads(eager, hidden, weight, b, labels, g, dtype, only_hidden=True)
    out = values_and_grads(kernel, hidden, weight, b, labels, g, dtype, only_hidden=True)
    assert stats.frozen_head, "the frozen-head kernel did not run"
    assert out[1][0].dtype == dtype
    errs, limits = errors(out, ref), bound(errors(eag, ref), dtype)
    assert all(e <= lim for e, lim in zip(errs, limits)), (errs, limits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_head_matches_float64_on_odd_shapes(seed, dtype, bias):
    _frozen_compare(make_inputs(37, 72, 333, bias=bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scale,cap", [(0.37, None), (1.5, 2.0)])
def test_frozen_head_with_logit_transform(seed, dtype, scale, cap):
    _frozen_compare(make_inputs(37, 72, 333), dtype, logit_scale=scale, softcap=cap)


@pytest.mark.parametrize("m,v", [(1, 333), (37, 40), (3, 17)])
def test_frozen_head_one_token_and_small_vocab(seed, m, v):
    _frozen_compare(make_inputs(m, 72, v), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("v,peaked", [(333, 0.0), (300, 30.0)])  # 6 blocks, odd 5 blocks (padding tile)
def test_frozen_pair_variant(seed, dtype, v, peaked):
    _frozen_compare(make_inputs(37, 72, v, peaked=peaked), dtype, variant="frozen_pair", softcap=4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_confident_tokens(seed, dtype):
    # p(label) rounds to 1: the label column enters as (1 - p) W[y] with 1 - p from the other
    # columns, and the running max moves many times (rescaling of the accumulator).
    _frozen_compare(make_inputs(37, 72, 333, peaked=30.0), dtype)


def test_frozen_buffer_is_the_hidden_jacobian_row(seed):
    hidden, weight, b, labels, _ = make_inputs(19, 40, 150)
    lse, target, other, rows = frozen_forward(hidden, weight, labels, b)
    assert rows.shape == (19, 40) and rows.dtype == torch.float32
    h = hidden.double().requires_grad_()
    ref = eager_logprobs(h, weight.double(), b.double(), labels)
    (jac,) = torch.autograd.grad(ref.sum(), h)  # row i depends on hidden[i] only
    torch.testing.assert_close(rows.double(), jac, rtol=1e-5, atol=1e-6)
    z = hidden.double() @ weight.double().T + b.double()
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(target.double(), z.gather(1, labels[:, None])[:, 0], rtol=0, atol=1e-5)


def test_trainable_bias_or_weight_uses_the_recompute_path(seed):
    hidden, weight, b, labels, _ = make_inputs(9, 16, 50)
    for w_grad, b_grad in ((False, True), (True, False)):
        stats = KernelStats()
        out = triton_linear_logprobs(
            hidden.clone().requires_grad_(), weight.clone().requires_grad_(w_grad), labels,
            b.clone().requires_grad_(b_grad), stats=stats,
        )  # fmt: skip
        assert not stats.frozen_head and out.grad_fn is not None
    stats = KernelStats()
    triton_linear_logprobs(hidden.clone().requires_grad_(), weight, labels, b, stats=stats, variant="no_frozen_kernel")
    assert not stats.frozen_head
