"""The Triton path through the public API: ignored tokens, degenerate batches, the fused module."""

import pytest
import torch
from kernels_testutils import make_inputs

from safedpo_kernels import FusedLinearSafeDPOLoss, linear_logprobs


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_logprobs_triton_equals_torch_with_ignored_tokens(seed, dtype):
    hidden, weight, b, _, _ = make_inputs(3 * 13, 72, 333)
    hidden = hidden.reshape(3, 13, 72).to(dtype)
    weight, b = weight.to(dtype), b.to(dtype)
    labels = torch.randint(0, 333, (3, 13))
    labels[0, :5] = -100  # prompt
    labels[2, 9:] = -100  # padding
    g = torch.randn(3, 13)
    results = {}
    for impl in ("torch", "triton"):
        h, w, bb = _leaves(hidden, weight, b)
        out = linear_logprobs(h, w, labels, bias=bb, impl=impl)
        grads = torch.autograd.grad(out, (h, w, bb), g)
        results[impl] = (out, grads)
    out, grads = results["triton"]
    assert out.shape == labels.shape and out.dtype == torch.float32
    assert torch.all(out[labels == -100] == 0.0)
    assert torch.all(grads[0][labels == -100] == 0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out, results["torch"][0], **tol)
    for a, r in zip(grads, results["torch"][1]):
        torch.testing.assert_close(a.float(), r.float(), **tol)


def test_all_ignored_and_one_token(seed):
    hidden, weight, b, labels, _ = make_inputs(6, 72, 333)
    h, w = _leaves(hidden, weight)
    none = linear_logprobs(h, w, torch.full((6,), -100), bias=b, impl="triton")
    assert torch.equal(none, torch.zeros(6))
    gh, gw = torch.autograd.grad(none.sum(), (h, w))
    assert not gh.any() and not gw.any()
    one = labels.clone()
    one[1:] = -100
    h, w = _leaves(hidden, weight)
    out = linear_logprobs(h, w, one, bias=b, impl="triton")
    ref = torch.log_softmax(hidden[0].double() @ weight.double().T + b.double(), -1)[one[0]]
    assert abs(out[0].item() - ref.item()) < 1e-5 and not out[1:].any()
    gh, gw = torch.autograd.grad(out.sum(), (h, w))
    assert gh[0].abs().sum() > 0 and not gh[1:].any() and gw.abs().sum() > 0


def test_fused_safedpo_module_triton_equals_torch(seed):
    b, t, hdim, v = 2, 9, 72, 333
    hidden = torch.randn(2 * b, t, hdim)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    weight = torch.randn(v, hdim) / hdim**0.5
    target = torch.randint(0, v, (2 * b, t))
    target[:, :3] = -100
    target[1, 7:] = -100
    chosen_unsafe, rejected_unsafe = torch.tensor([False, True]), torch.tensor([True, True])
    out = {}
    for impl in ("torch", "triton"):
        h, w = _leaves(hidden, weight)
        mod = FusedLinearSafeDPOLoss(beta=0.2, delta=4.0, impl=impl)
        loss, metrics = mod(w, h, target, chosen_unsafe, rejected_unsafe, ref_input=ref_hidden)
        grads = torch.autograd.grad(loss, (h, w))
        out[impl] = (loss, metrics, grads)
    (lt, mt, gt), (lr, mr, gr) = out["triton"], out["torch"]
    torch.testing.assert_close(lt, lr, rtol=1e-5, atol=1e-6)
    assert mt.keys() == mr.keys()
    for key in mr:
        torch.testing.assert_close(mt[key], mr[key], rtol=1e-5, atol=1e-5, msg=key)
    for a, r in zip(gt, gr):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_frozen_head_through_linear_logprobs_with_ignored_tokens(seed, monkeypatch):
    import safedpo_kernels.triton_logprobs as tl_module

    hidden, weight, b, _, _ = make_inputs(2 * 11, 72, 333)
    hidden = hidden.reshape(2, 11, 72)
    labels = torch.randint(0, 333, (2, 11))
    labels[0, :4] = -100
    labels[1, 8:] = -100
    g = torch.randn(2, 11)
    ran = []
    real = tl_module.TritonFrozenHeadLogprobs.apply
    monkeypatch.setattr(tl_module.TritonFrozenHeadLogprobs, "apply", lambda *a: ran.append(1) or real(*a))
    results = {}
    for impl in ("torch", "triton"):
        (h,) = _leaves(hidden)
        out = linear_logprobs(h, weight, labels, bias=b, impl=impl)  # weight, bias frozen
        (gh,) = torch.autograd.grad(out, h, g)
        results[impl] = (out, gh)
    assert ran, "the frozen-head kernel did not run"
    assert torch.all(results["triton"][0][labels == -100] == 0) and not results["triton"][1][labels == -100].any()
    for a, r in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
