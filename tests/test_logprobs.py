"""linear_logprobs(impl="torch"): values and gradients against float64 eager autograd."""

import sys

import pytest
import torch

import safedpo_kernels
import safedpo_kernels.logprobs as lp
from safedpo_kernels import linear_logprobs
from safedpo_kernels.reference import reference_linear_logprobs

from logprobs_testutils import f64_grads, make_inputs, rel, small_chunks  # noqa: F401 (fixture)


_inputs = make_inputs


def _f64_grads(hidden, weight, labels, bias, upstream):
    return f64_grads(hidden, weight, labels, bias, upstream)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(37,), (3, 13), (2, 2, 9)])
def test_float32_matches_float64_reference(seed, small_chunks, shape, bias):
    hidden, weight, labels, b = _inputs(shape, 72, 333, torch.float32, bias=bias)
    leaves = [hidden.requires_grad_(), weight.requires_grad_()] + ([b.requires_grad_()] if bias else [])
    out = linear_logprobs(hidden, weight, labels, bias=b, impl="torch")
    assert out.dtype == torch.float32 and out.shape == labels.shape
    assert torch.all(out[labels == -100] == 0)
    upstream = torch.randn(shape)
    grads = torch.autograd.grad((out * upstream).sum(), leaves)
    ref, ref_grads = _f64_grads(hidden, weight, labels, b, upstream)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


def test_float64_is_exact_to_rounding(seed, small_chunks):
    hidden, weight, labels, b = _inputs((29,), 40, 333, torch.float64, bias=True)
    leaves = [hidden.requires_grad_(), weight.requires_grad_(), b.requires_grad_()]
    out = linear_logprobs(hidden, weight, labels, bias=b, impl="torch")
    upstream = torch.randn(29, dtype=torch.float64)
    grads = torch.autograd.grad((out * upstream).sum(), leaves)
    ref, ref_grads = _f64_grads(hidden, weight, labels, b, upstream)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


_rel = rel


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_eager(seed, small_chunks, dtype):
    """Normwise error vs float64 (on the same low-precision inputs) at most the eager error (+10%).

    Eager rounds the logits and their gradient to the input dtype; the chunked path keeps the logits'
    softmax and gradient in float32 and rounds only the GEMM operands/outputs, so its error is at
    most eager's; the 10% covers the per-vocab-block rounding of partial grad_hidden sums (measured
    0.6-0.9x eager at these shapes). Elementwise maxima are not compared: near-zero entries make them noise.
    """
    hidden, weight, labels, b = _inputs((41,), 64, 333, dtype, bias=True)
    leaves = [hidden.requires_grad_(), weight.requires_grad_(), b.requires_grad_()]
    upstream = torch.randn(41)
    out = linear_logprobs(hidden, weight, labels, bias=b, impl="torch")
    grads = torch.autograd.grad((out * upstream).sum(), leaves)
    eager = reference_linear_logprobs(hidden, weight, labels, bias=b)
    eager_grads = torch.autograd.grad((eager * upstream).sum(), leaves)
    ref, ref_grads = _f64_grads(hidden, weight, labels, b, upstream)
    assert _rel(out, ref) <= 1.1 * _rel(eager, ref)
    for g, e, r in zip(grads, eager_grads, ref_grads):
        assert g.dtype == dtype
        assert _rel(g, r) <= 1.1 * _rel(e, r), (_rel(g, r), _rel(e, r))


def test_tile_sizes_follow_budget(monkeypatch):
    monkeypatch.setenv("SAFEDPO_CHUNK_BUDGET_MB", "12")
    budget = 12 * 2**20
    # Small vocabulary: one block, as many tokens as the budget allows.
    chunk, block = lp.tile_sizes(100_000, 2000, 1024, torch.float32)
    assert block == 2000 and chunk * block * 4 * 3 <= budget < (chunk + 1) * block * 4 * 3
    # Large vocabulary: the token chunk stays at the floor and the vocabulary is split.
    for v in (32000, 128256, 152064):
        chunk, block = lp.tile_sizes(100_000, v, 1024, torch.float32)
        assert chunk == lp.MIN_TOKEN_CHUNK and block < v
        assert chunk * block * 4 * 3 <= budget < chunk * (block + 1) * 4 * 3
        # bf16 weight gradients: the float32 (block, H) accumulator is in the budget too.
        chunk, block = lp.tile_sizes(100_000, v, 1024, torch.bfloat16, weight_grad_block=True)
        assert chunk == lp.MIN_TOKEN_CHUNK and chunk * block * 12 + block * 1024 * 4 <= budget
    assert lp.tile_sizes(5, 32000, 64, torch.float32)[0] == 5
    assert lp.tile_sizes(1, 1, 1, torch.float64) == (1, 1)
    for bad in ("lots", "nan", "inf", "-1", "0"):
        monkeypatch.setenv("SAFEDPO_CHUNK_BUDGET_MB", bad)
        with pytest.raises(ValueError, match="SAFEDPO_CHUNK_BUDGET_MB"):
            lp.tile_sizes(10, 10, 4, torch.float32)


def test_all_ignored_gives_zeros_and_zero_grads(seed):
    hidden, weight, labels, b = _inputs((2, 5), 16, 50, torch.float32, bias=True)
    labels[:] = -100
    leaves = [hidden.requires_grad_(), weight.requires_grad_(), b.requires_grad_()]
    out = linear_logprobs(hidden, weight, labels, bias=b, impl="torch")
    assert torch.equal(out, torch.zeros(2, 5))
    out.sum().backward()
    for t in leaves:
        assert t.grad is not None and torch.all(t.grad == 0)


def test_one_token_and_empty_input(seed):
    hidden, weight, labels, _ = _inputs((1,), 8, 7, torch.float64, ignore_frac=0.0)
    out = linear_logprobs(hidden, weight, labels, impl="torch")
    torch.testing.assert_close(out, reference_linear_logprobs(hidden, weight, labels))
    empty = linear_logprobs(torch.zeros(0, 8), torch.zeros(7, 8), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)


def test_custom_ignore_index(seed):
    hidden, weight, labels, _ = _inputs((20,), 8, 30, torch.float64, ignore_frac=0.0)
    labels[::3] = 29  # a valid vocab id used as the ignore marker
    out = linear_logprobs(hidden, weight, labels, ignore_index=29, impl="torch")
    assert torch.all(out[::3] == 0)
    torch.testing.assert_close(out, reference_linear_logprobs(hidden, weight, labels, ignore_index=29))


def test_frozen_weight_and_no_grad_paths(seed):
    hidden, weight, labels, _ = _inputs((13,), 16, 40, torch.float32)
    hidden.requires_grad_()
    out = linear_logprobs(hidden, weight, labels, impl="torch")  # weight frozen
    (g,) = torch.autograd.grad(out.sum(), hidden)
    assert weight.grad is None and torch.isfinite(g).all()
    with torch.no_grad():
        nograd = linear_logprobs(hidden, weight, labels, impl="torch")
    assert not nograd.requires_grad
    torch.testing.assert_close(nograd, out.detach())


def test_noncontiguous_inputs(seed):
    hidden, weight, labels, _ = _inputs((11, 6), 24, 50, torch.float64)
    h_t = hidden.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    w_t = weight.T.contiguous().T
    out = linear_logprobs(h_t, w_t, labels, impl="torch")
    torch.testing.assert_close(out, reference_linear_logprobs(hidden, weight, labels))


def test_nonfinite_hidden_gives_nonfinite_output(seed):
    hidden, weight, labels, _ = _inputs((6,), 8, 20, torch.float32, ignore_frac=0.0)
    hidden[2, 3] = float("inf")
    out = linear_logprobs(hidden, weight, labels, impl="torch")
    assert not torch.isfinite(out[2])
    assert torch.isfinite(out[[0, 1, 3, 4, 5]]).all()


def test_auto_picks_torch_on_cpu_and_triton_needs_a_usable_device(seed, monkeypatch):
    assert lp._resolve_impl("auto", torch.device("cpu")) == "torch"
    # Kernels unavailable: the import fails even where another test already imported them.
    monkeypatch.setitem(sys.modules, "safedpo_kernels.triton_logprobs", None)
    monkeypatch.delattr(safedpo_kernels, "triton_logprobs", raising=False)
    hidden, weight, labels, _ = _inputs((4,), 8, 10, torch.float32)
    with pytest.raises(NotImplementedError, match="impl='triton'"):
        linear_logprobs(hidden, weight, labels, impl="triton")


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(hidden=torch.zeros(4, 9)), ValueError, "hidden"),
        (lambda a: a.update(weight=torch.zeros(10)), ValueError, "weight"),
        (lambda a: a.update(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels"),
        (lambda a: a.update(labels=torch.tensor([0, 1, 10, 2])), ValueError, r"labels.*\[0, 10\)"),
        (lambda a: a.update(labels=torch.tensor([0, -5, 1, 2])), ValueError, "labels"),
        (lambda a: a.update(labels=torch.zeros(4)), TypeError, "labels"),
        (lambda a: a.update(hidden=torch.zeros(4, 8, dtype=torch.long)), TypeError, "hidden"),
        (lambda a: a.update(weight=torch.zeros(10, 8, dtype=torch.float64)), TypeError, "dtypes differ"),
        (lambda a: a.update(bias=torch.zeros(9)), ValueError, "bias"),
        (lambda a: a.update(impl="cuda"), ValueError, "impl"),
        (lambda a: a.update(deterministic=1), TypeError, "deterministic"),
        (lambda a: a.update(hidden=[[0.0] * 8] * 4), TypeError, "hidden"),
    ],
)
def test_bad_input_names_the_argument(mutate, exc, match):
    args = dict(hidden=torch.zeros(4, 8), weight=torch.zeros(10, 8), labels=torch.tensor([0, 1, -100, 9]))
    mutate(args)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(exc, match=match):
        linear_logprobs(hidden, weight, labels, **args)
