"""Torch path: logit transforms, the frozen-head path, autocast, non-finite inputs, double backward.

Every value and gradient is compared with float64 eager autograd (``reference_linear_logprobs``) on
fresh random inputs; tiny chunk budgets force several token chunks and vocabulary blocks.
"""

import pytest
import torch

import safedpo_kernels.logprobs as lp
from safedpo_kernels import linear_logprobs
from safedpo_kernels.reference import reference_linear_logprobs

from logprobs_testutils import f64_grads, make_inputs, rel, small_chunks  # noqa: F401 (fixture)

HEADS = [dict(), dict(logit_scale=0.37), dict(softcap=4.0), dict(logit_scale=2.5, softcap=3.0)]


def _leaves(hidden, weight, b, frozen):
    hidden.requires_grad_()
    if not frozen:
        weight.requires_grad_()
        if b is not None:
            b.requires_grad_()
    return [hidden] if frozen else [t for t in (hidden, weight, b) if t is not None]


@pytest.mark.parametrize("head", HEADS, ids=lambda h: str(h) or "plain")
@pytest.mark.parametrize("frozen", [False, True], ids=["full", "frozen"])
def test_logit_transform_float32_and_float64(seed, small_chunks, head, frozen):
    """float32 within 1e-5 of float64 eager; float64 equal to rounding (values and gradients).
    With a bias in float32, without in float64 (test_logprobs.py covers the plain head both ways)."""
    for dtype, tol, bias in ((torch.float32, 1e-5, True), (torch.float64, 1e-12, False)):
        hidden, weight, labels, b = make_inputs((3, 13), 40, 333, dtype, bias=bias)
        leaves = _leaves(hidden, weight, b, frozen)
        out = linear_logprobs(hidden, weight, labels, bias=b, impl="torch", **head)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.all(out[labels == -100] == 0)
        upstream = torch.randn(3, 13, dtype=dtype)
        grads = torch.autograd.grad((out * upstream).sum(), leaves)
        wrt = ("hidden",) if frozen else ("hidden", "weight", "bias")
        ref, ref_grads = f64_grads(hidden, weight, labels, b, upstream, wrt=wrt, **head)
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        assert len(grads) == len(ref_grads)
        for g, r in zip(grads, ref_grads):
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol)


def test_transform_changes_the_result(seed):
    """The transform is applied (a test that could not fail otherwise): plain != scaled != capped."""
    hidden, weight, labels, _ = make_inputs((20,), 16, 50, torch.float64, ignore_frac=0.0)
    plain = linear_logprobs(hidden, weight, labels, impl="torch")
    scaled = linear_logprobs(hidden, weight, labels, impl="torch", logit_scale=0.5)
    capped = linear_logprobs(hidden, weight, labels, impl="torch", softcap=2.0)
    assert (plain - scaled).abs().max() > 1e-3 and (plain - capped).abs().max() > 1e-3
    torch.testing.assert_close(scaled, reference_linear_logprobs(hidden * 0.5, weight, labels))


# ---------------------------------------------------------------------------------------------
# Frozen-head path
# ---------------------------------------------------------------------------------------------


def test_frozen_head_path_is_chosen_automatically(seed, monkeypatch):
    calls = {"frozen": 0, "recompute": 0}
    real_frozen, real_backward = lp.frozen_head_forward, lp.chunked_backward

    def frozen(*a, **k):
        calls["frozen"] += 1
        return real_frozen(*a, **k)

    def backward(*a, **k):
        calls["recompute"] += 1
        return real_backward(*a, **k)

    monkeypatch.setattr(lp, "frozen_head_forward", frozen)
    monkeypatch.setattr(lp, "chunked_backward", backward)
    hidden, weight, labels, b = make_inputs((9,), 16, 30, torch.float32, bias=True)
    labels[0] = 3
    hidden.requires_grad_()
    out = linear_logprobs(hidden, weight, labels, bias=b, impl="torch")
    out.sum().backward()
    assert calls == {"frozen": 1, "recompute": 0} and weight.grad is None
    b.requires_grad_()  # a trainable bias needs the recompute path
    linear_logprobs(hidden, weight, labels, bias=b, impl="torch").sum().backward()
    assert calls == {"frozen": 1, "recompute": 1} and b.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head", HEADS, ids=lambda h: str(h) or "plain")
def test_frozen_head_low_precision_no_worse_than_eager(seed, small_chunks, dtype, head):
    """grad_hidden and values: normwise error vs float64 at most eager's in the same dtype (+10%).

    float32: both are float32-accurate (~1e-7, where the comparison is a coin flip), so the bound is
    2e-6 absolute instead (20 ulps of accumulated rounding over a few hundred logits)."""
    hidden, weight, labels, b = make_inputs((5, 11), 48, 333, dtype, bias=True)
    hidden.requires_grad_()
    upstream = torch.randn(5, 11)
    out = linear_logprobs(hidden, weight, labels, bias=b, impl="torch", **head)
    (g,) = torch.autograd.grad((out * upstream).sum(), hidden)
    eager = reference_linear_logprobs(hidden, weight, labels, bias=b, **head)
    (ge,) = torch.autograd.grad((eager * upstream).sum(), hidden)
    ref, (gr,) = f64_grads(hidden, weight, labels, b, upstream, wrt=("hidden",), **head)
    assert g.dtype == dtype and torch.all(g[labels == -100] == 0)
    if dtype == torch.float32:
        assert rel(out, ref) < 2e-6 and rel(g, gr) < 2e-6
    else:
        floor = 0.25 * torch.finfo(dtype).eps  # the final rounding to dtype both paths share
        assert rel(out, ref) <= 1.1 * rel(eager, ref) + floor
        assert rel(g, gr) <= 1.1 * rel(ge, gr) + floor, (rel(g, gr), rel(ge, gr))


def test_frozen_head_all_ignored_one_token_and_no_grad(seed, small_chunks):
    hidden, weight, labels, b = make_inputs((2, 4), 8, 20, torch.float32, bias=True)
    labels[:] = -100
    hidden.requires_grad_()
    out = linear_logprobs(hidden, weight, labels, bias=b, impl="torch")
    (g,) = torch.autograd.grad(out.sum(), hidden)
    assert torch.equal(out, torch.zeros(2, 4)) and torch.equal(g, torch.zeros_like(hidden))
    labels[1, 2] = 7
    out = linear_logprobs(hidden, weight, labels, bias=b, impl="torch", softcap=3.0)
    (g,) = torch.autograd.grad(out.sum(), hidden)
    ref, (gr,) = f64_grads(hidden, weight, labels, b, torch.ones(2, 4), wrt=("hidden",), softcap=3.0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), gr, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_logprobs(hidden, weight, labels, bias=b, impl="torch", softcap=3.0), out)


# ---------------------------------------------------------------------------------------------
# Autocast
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frozen", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("head", [dict(), dict(logit_scale=0.5, softcap=5.0)], ids=["plain", "capped"])
def test_autocast_does_not_change_the_float32_result(seed, small_chunks, frozen, head):
    """Under torch.autocast('cpu', bfloat16) the float32 error vs float64 stays within 2x of the
    error without autocast (in fact the computation is the same: autocast is off inside)."""
    hidden, weight, labels, b = make_inputs((37,), 64, 333, torch.float32, bias=True)
    leaves = _leaves(hidden, weight, b, frozen)
    upstream = torch.randn(37)
    wrt = ("hidden",) if frozen else ("hidden", "weight", "bias")
    ref, ref_grads = f64_grads(hidden, weight, labels, b, upstream, wrt=wrt, **head)
    results = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = linear_logprobs(hidden, weight, labels, bias=b, impl="torch", **head)
            grads = torch.autograd.grad((out * upstream).sum(), leaves)
        assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
        results.append([rel(out, ref)] + [rel(g, r) for g, r in zip(grads, ref_grads)])
    plain, under = results
    assert max(plain) < 1e-5
    for a, c in zip(plain, under):
        assert c <= 2 * a + 1e-7, (plain, under)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # forward-only path too
        assert rel(linear_logprobs(hidden, weight, labels, bias=b, impl="torch", **head), ref) < 1e-5


def test_autocast_bf16_inputs_and_empty(seed):
    hidden, weight, labels, _ = make_inputs((6,), 8, 20, torch.bfloat16, ignore_frac=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_logprobs(hidden, weight, labels, impl="torch")
        empty = linear_logprobs(torch.zeros(0, 8), torch.zeros(20, 8), torch.zeros(0, dtype=torch.long))
    assert out.dtype == torch.float32 and empty.shape == (0,) and empty.dtype == torch.float32
    torch.testing.assert_close(out, reference_linear_logprobs(hidden, weight, labels), rtol=0, atol=0.05)


# ---------------------------------------------------------------------------------------------
# Non-finite inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("frozen", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("head", [dict(), dict(softcap=3.0)], ids=["plain", "capped"])
def test_nonfinite_hidden_row_gives_nan_never_a_number(seed, small_chunks, bad, frozen, head):
    """A non-finite entry in one token's hidden state: that token's log-prob is NaN (never -inf,
    which a loss would turn into a finite number), its hidden gradient NaN; other tokens exact."""
    hidden, weight, labels, b = make_inputs((23,), 16, 333, torch.float32, ignore_frac=0.0, bias=True)
    hidden[5, 3] = bad
    leaves = _leaves(hidden, weight, b, frozen)
    out = linear_logprobs(hidden, weight, labels, bias=b, impl="torch", **head)
    assert torch.isnan(out[5])
    ok = torch.arange(23) != 5
    ref = reference_linear_logprobs(hidden.detach().double(), weight.detach().double(), labels,
                                    bias=b.detach().double(), **head)
    torch.testing.assert_close(out[ok].double(), ref[ok], rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), leaves)
    assert torch.isnan(grads[0][5]).all() and torch.isfinite(grads[0][ok]).all()
    for g in grads[1:]:  # weight and bias gradients sum over tokens: NaN everywhere
        assert torch.isnan(g).all()
    with torch.no_grad():
        assert torch.isnan(linear_logprobs(hidden, weight, labels, bias=b, impl="torch", **head)[5])


def test_nonfinite_weight_follows_ieee_and_never_gives_an_infinite_logprob(seed):
    """weight[11, 0] = inf: tokens with h[0] > 0 see a +inf logit (NaN, as eager), tokens with
    h[0] < 0 a -inf logit that just has probability 0 (finite, equal to eager)."""
    hidden, weight, labels, _ = make_inputs((40,), 8, 30, torch.float32, ignore_frac=0.0)
    labels[labels == 11] = 12
    weight[11, 0] = float("inf")
    out = linear_logprobs(hidden, weight, labels, impl="torch")
    ref = reference_linear_logprobs(hidden.double(), weight.double(), labels)
    assert torch.equal(torch.isnan(out), hidden[:, 0] > 0) and not torch.isinf(out).any()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("frozen", [False, True], ids=["full", "frozen"])
def test_minus_inf_bias_masks_a_vocabulary_entry(seed, frozen):
    """A -inf bias entry (a masked token) keeps every other log-prob and gradient exact; a label at
    the masked entry gives NaN (its log-prob would be -inf)."""
    hidden, weight, labels, b = make_inputs((30,), 8, 25, torch.float64, ignore_frac=0.0, bias=True)
    b[4] = float("-inf")
    labels[labels == 4] = 5
    leaves = _leaves(hidden, weight, None, frozen)
    out = linear_logprobs(hidden, weight, labels, bias=b, impl="torch")
    grads = torch.autograd.grad(out.sum(), leaves)
    ref, ref_grads = f64_grads(hidden, weight, labels, b, torch.ones(30), wrt=("hidden",) if frozen else ("hidden", "weight"))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    labels[0] = 4
    assert torch.isnan(linear_logprobs(hidden.detach(), weight.detach(), labels, bias=b, impl="torch")[0])


# ---------------------------------------------------------------------------------------------
# Double backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frozen", [False, True], ids=["full", "frozen"])
def test_double_backward_raises_a_clear_error(seed, frozen):
    hidden, weight, labels, b = make_inputs((9,), 8, 30, torch.float64, bias=True)
    leaves = _leaves(hidden, weight, b, frozen)
    upstream = torch.randn(9, dtype=torch.float64)
    out = linear_logprobs(hidden, weight, labels, bias=b, impl="torch")
    loss = (out * upstream).sum()
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    # The first-order gradients under create_graph=True are still exact.
    wrt = ("hidden",) if frozen else ("hidden", "weight", "bias")
    _, ref_grads = f64_grads(hidden, weight, labels, b, upstream, wrt=wrt)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="linear_logprobs: double backward .* not supported"):
        torch.autograd.grad(grads[0].pow(2).sum(), leaves)


def test_double_backward_through_a_nonlinear_loss(seed):
    """Upstream gradient that itself depends on the log-probs (a sigmoid loss), as in DPO."""
    hidden, weight, labels, _ = make_inputs((9,), 8, 30, torch.float32)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss = torch.nn.functional.logsigmoid(linear_logprobs(hidden, weight, labels, impl="torch").sum())
    (gw,) = torch.autograd.grad(loss, weight, create_graph=True)
    with pytest.raises(RuntimeError, match="linear_logprobs: double backward"):
        gw.norm().backward()


# ---------------------------------------------------------------------------------------------
# Bad options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(logit_scale=0.0), ValueError, "logit_scale: expected a finite number > 0"),
        (dict(logit_scale=float("nan")), ValueError, "logit_scale"),
        (dict(logit_scale=float("inf")), ValueError, "logit_scale"),
        (dict(logit_scale="1"), TypeError, "logit_scale"),
        (dict(softcap=0.0), ValueError, "softcap: expected a finite number > 0"),
        (dict(softcap=-30.0), ValueError, "softcap"),
        (dict(softcap=float("inf")), ValueError, "softcap"),
        (dict(softcap=True), TypeError, "softcap"),
        (dict(ignore_index=-100.9), TypeError, "ignore_index: expected an integer"),
        (dict(ignore_index=True), TypeError, "ignore_index"),
    ],
)
def test_bad_options_name_the_argument(kwargs, exc, match):
    hidden, weight, labels = torch.zeros(4, 8), torch.zeros(10, 8), torch.tensor([0, 1, -100, 9])
    with pytest.raises(exc, match=match):
        linear_logprobs(hidden, weight, labels, impl="torch", **kwargs)
    with pytest.raises(exc, match=match):
        reference_linear_logprobs(hidden, weight, labels, **kwargs)


def test_hidden_size_zero_is_a_clear_error():
    with pytest.raises(ValueError, match="weight: expected shape .* H >= 1"):
        linear_logprobs(torch.zeros(3, 0), torch.zeros(10, 0), torch.tensor([0, 1, 2]), impl="torch")


@pytest.mark.parametrize("value", ["nan", "inf", "-3", "x"])
def test_chunk_budget_env_is_checked(monkeypatch, value):
    monkeypatch.setenv("SAFEDPO_CHUNK_BUDGET_MB", value)
    with pytest.raises(ValueError, match="SAFEDPO_CHUNK_BUDGET_MB"):
        linear_logprobs(torch.zeros(3, 4), torch.zeros(10, 4), torch.tensor([0, 1, 2]), impl="torch")


def test_triton_dispatch_passes_the_transform_and_compacted_inputs(monkeypatch):
    """impl='triton' hands the compacted tokens and logit_scale / softcap to the kernels' entry point."""
    seen = []

    class FakeKernels:
        @staticmethod
        def triton_is_usable(device):
            return True

        @staticmethod
        def triton_linear_logprobs(h, w, y, b=None, **kwargs):
            seen.append((h.shape[0], y.tolist(), kwargs))
            return torch.full((h.shape[0],), -1.0)

    monkeypatch.setattr(lp, "_triton_module", lambda: FakeKernels)
    hidden, weight, labels = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([3, -100, 9, 0])
    out = linear_logprobs(hidden, weight, labels, impl="triton", logit_scale=0.5, softcap=30.0, deterministic=True)
    assert out.tolist() == [-1.0, 0.0, -1.0, -1.0]
    assert seen[0] == (3, [3, 9, 0], {"deterministic": True, "grad_filter": False, "logit_scale": 0.5, "softcap": 30.0})
    linear_logprobs(hidden, weight, labels, impl="triton")
    assert seen[1][2] == {"deterministic": False, "grad_filter": False}
