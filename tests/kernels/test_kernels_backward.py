"""Backward kernels (default atomics and deterministic owner-computes) against float64."""

import pytest
import torch
from kernels_testutils import DTYPES, bound, eager_logprobs, errors, make_inputs, values_and_grads

from safedpo_kernels.kernels import backward as backward_module
from safedpo_kernels.triton_logprobs import triton_linear_logprobs


def _triton(**kw):
    return lambda h, w, b, y: triton_linear_logprobs(h, w, y, b, **kw)


def _compare(inputs, dtype, **kw):
    hidden, weight, b, labels, g = inputs
    ref = values_and_grads(eager_logprobs, hidden, weight, b, labels, g, torch.float64)
    eager = values_and_grads(eager_logprobs, hidden, weight, b, labels, g, dtype)
    out = values_and_grads(_triton(**kw), hidden, weight, b, labels, g, dtype)
    assert all(t.dtype == dtype for t in out[1])
    errs, limits = errors(out, ref), bound(errors(eager, ref), dtype)
    assert all(e <= lim for e, lim in zip(errs, limits)), (errs, limits)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_grads_match_float64_on_odd_shapes(seed, dtype, deterministic):
    _compare(make_inputs(37, 72, 333), dtype, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("m,v,bias", [(1, 333, True), (37, 40, False)])
def test_one_token_and_vocab_smaller_than_a_block(seed, deterministic, m, v, bias):
    _compare(make_inputs(m, 72, v, bias=bias), torch.float32, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True])
def test_only_requested_grads_are_computed(seed, deterministic, monkeypatch):
    hidden, weight, b, labels, g = make_inputs(37, 72, 333)
    seen = []
    real = backward_module.backward_logprobs

    def spy(*args, needs, **kw):
        seen.append(needs)
        return real(*args, needs=needs, **kw)

    monkeypatch.setattr("safedpo_kernels.triton_logprobs.backward_logprobs", spy)
    h = hidden.clone().requires_grad_()
    # frozen head through the recompute backward (the frozen-head kernel has no backward kernel)
    out = triton_linear_logprobs(h, weight, labels, b, deterministic=deterministic, variant="no_frozen_kernel")
    (gh,) = torch.autograd.grad(out, h, g)
    assert seen[-1] == (True, False, False)
    w, bb = weight.clone().requires_grad_(), b.clone().requires_grad_()
    out = triton_linear_logprobs(hidden, w, labels, bb, deterministic=deterministic)
    gw, gb = torch.autograd.grad(out, (w, bb), g)
    assert seen[-1] == (False, True, True)
    ref = values_and_grads(eager_logprobs, hidden, weight, b, labels, g, torch.float64)
    for got, want in zip((gh, gw, gb), ref[1]):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_deterministic_mode_is_bit_identical_and_matches_default(seed):
    inputs = make_inputs(37, 72, 333)
    first = values_and_grads(_triton(deterministic=True), *inputs, torch.float16)
    second = values_and_grads(_triton(deterministic=True), *inputs, torch.float16)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    default = values_and_grads(_triton(), *inputs, torch.float16)
    for a, b in zip(first[1], default[1]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-4)


def test_grad_hidden_chunking_matches_one_chunk(seed, monkeypatch):
    inputs = make_inputs(37, 72, 333)
    whole = values_and_grads(_triton(), *inputs, torch.float16)
    monkeypatch.setattr(backward_module, "GRAD_HIDDEN_CHUNK_BYTES", 16 * 72 * 4)  # one 16-row block per chunk
    assert backward_module._token_chunk(37, 72, torch.float16, 16) == 16
    chunked = values_and_grads(_triton(), *inputs, torch.float16)
    for a, b in zip(whole[1], chunked[1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_grad_filter_skips_tiles_within_its_error_bound(seed, deterministic):
    # Confident tokens (softmax peaked like a trained LM's) fill the first two 16-token blocks, so
    # their tiles hold only probabilities < eps/32 and are skipped; 21 ordinary tokens follow (their
    # tiles are kept). A batch of only confident tokens would have a gradient that is itself all
    # below the threshold: filtering is meant for, and measured on, mixed batches.
    hidden, weight, b, labels, g = inputs = make_inputs(53, 72, 333)
    labels[:32] = torch.randint(0, 64, (32,))  # all in the first vocab block: the others get skipped
    w_lab = weight[labels[:32]]
    hidden[:32] = 50.0 * w_lab / w_lab.norm(dim=1, keepdim=True) + 0.3 * torch.randn(32, 72)
    ref = values_and_grads(eager_logprobs, *inputs, torch.float64)
    exact = values_and_grads(_triton(deterministic=deterministic), *inputs, torch.float32)
    filtered = values_and_grads(_triton(deterministic=deterministic, grad_filter=True), *inputs, torch.float32)
    assert torch.equal(exact[0], filtered[0])  # the forward is never filtered
    assert not all(torch.equal(a, b) for a, b in zip(exact[1], filtered[1])), "no tile was skipped"
    # float32: skipped entries of G are < 2**-28 each; the result stays within float32 accuracy.
    errs_f, errs_x = errors(filtered, ref), errors(exact, ref)
    assert all(ef <= 2 * ex + 1e-6 for ef, ex in zip(errs_f, errs_x)), (errs_f, errs_x)
    # bfloat16: no worse than eager bf16 (the documented bound of the filter).
    _compare(inputs, torch.bfloat16, deterministic=deterministic, grad_filter=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_confident_tokens_keep_their_gradient_accuracy(seed, dtype):
    # p(label) rounds to 1 in float32: the label column's 1 - p must come from the other columns'
    # sum (saved by the forward), not from 1 - exp(logp), or the tiny gradient is pure noise.
    _compare(make_inputs(37, 72, 333, peaked=30.0), dtype)
