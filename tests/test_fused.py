"""FusedLinearSafeDPOLoss / FusedLinearDPOLoss against the eager float64 reference."""

import pytest
import torch

from safedpo_kernels import (
    FusedLinearDPOLoss,
    FusedLinearSafeDPOLoss,
    linear_logprobs,
    packed_sequence_logps,
    sequence_logps,
)
from safedpo_kernels.reference import reference_fused_safedpo


def _batch(b=4, t=11, h=24, v=97, dtype=torch.float64, bias=True):
    hidden = torch.randn(2 * b, t, h, dtype=dtype)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    weight = torch.randn(v, h, dtype=dtype) / h**0.5
    target = torch.randint(0, v, (2 * b, t))
    prompt = torch.randint(1, t // 2, (2 * b,))
    for i in range(2 * b):  # prompt tokens and right padding are ignored
        target[i, : prompt[i]] = -100
        target[i, t - int(torch.randint(0, 3, ())) :] = -100
    bvec = torch.randn(v, dtype=dtype) if bias else None
    cu = torch.tensor([0, 0, 1, 1] * (b // 4) + [0] * (b % 4))
    ru = torch.tensor([0, 1, 0, 1] * (b // 4) + [1] * (b % 4))
    return hidden, ref_hidden, weight, target, bvec, cu, ru


@pytest.mark.parametrize("average_log_prob", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_module_matches_reference_with_ref_hidden(seed, average_log_prob, bias):
    hidden, ref_hidden, weight, target, b, cu, ru = _batch(b=5, bias=bias)
    leaves = [hidden.requires_grad_(), weight.requires_grad_()] + ([b.requires_grad_()] if bias else [])
    mod = FusedLinearSafeDPOLoss(beta=0.2, delta=4.0, average_log_prob=average_log_prob, impl="torch")
    loss, _, metrics = mod(weight, hidden, target, b, ref_hidden, chosen_unsafe=cu, rejected_unsafe=ru,
                           return_metrics=True)
    ref, ref_metrics = reference_fused_safedpo(
        weight, hidden, target, cu, ru, bias=b, ref_input=ref_hidden,
        beta=0.2, delta=4.0, average_log_prob=average_log_prob,
    )
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = torch.autograd.grad(ref, leaves)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    for k, v in ref_metrics.items():
        torch.testing.assert_close(metrics[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_ref_hidden_and_precomputed_ref_logps_agree(seed):
    hidden, ref_hidden, weight, target, b, cu, ru = _batch(b=4)
    mod = FusedLinearSafeDPOLoss(impl="torch")
    a, _, ma = mod(weight, hidden, target, b, ref_hidden, chosen_unsafe=cu, rejected_unsafe=ru, return_metrics=True)
    with torch.no_grad():
        ref_seq = sequence_logps(linear_logprobs(ref_hidden, weight, target, bias=b), target)
    c, _, mc = mod(weight, hidden, target, b, chosen_unsafe=cu, rejected_unsafe=ru, ref_chosen_logps=ref_seq[:4],
                   ref_rejected_logps=ref_seq[4:], return_metrics=True)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    for k in ma:
        torch.testing.assert_close(ma[k], mc[k], rtol=0, atol=0)


def test_separate_reference_head(seed):
    hidden, ref_hidden, weight, target, b, cu, ru = _batch(b=4)
    ref_weight = weight + 0.05 * torch.randn_like(weight)
    ref_bias = torch.randn_like(b)
    mod = FusedLinearSafeDPOLoss(impl="torch")
    loss, _ = mod(weight, hidden, target, b, ref_hidden, ref_weight, ref_bias, chosen_unsafe=cu, rejected_unsafe=ru)
    ref, _ = reference_fused_safedpo(weight, hidden, target, cu, ru, bias=b, ref_input=ref_hidden,
                                     ref_weight=ref_weight, ref_bias=ref_bias)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)


def test_float32_module_close_to_float64(seed):
    hidden, ref_hidden, weight, target, b, cu, ru = _batch(b=4, dtype=torch.float32)
    hidden.requires_grad_()
    loss, _ = FusedLinearSafeDPOLoss(impl="torch")(weight, hidden, target, b, ref_hidden, chosen_unsafe=cu,
                                                   rejected_unsafe=ru)
    assert loss.dtype == torch.float32
    h64 = hidden.detach().double().requires_grad_()
    ref, _ = reference_fused_safedpo(weight.double(), h64, target, cu, ru, bias=b.double(),
                                     ref_input=ref_hidden.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(loss, hidden)
    (g_ref,) = torch.autograd.grad(ref, h64)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)


def test_all_dropped_batch_backpropagates_zero(seed):
    hidden, ref_hidden, weight, target, b, _, _ = _batch(b=4)
    ones = torch.ones(4, dtype=torch.bool)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss, _, metrics = FusedLinearSafeDPOLoss(impl="torch")(weight, hidden, target, ref_input=ref_hidden, chosen_unsafe=ones,
                                                          rejected_unsafe=ones, return_metrics=True)
    loss.backward()
    assert loss.item() == 0.0 and metrics["pairs/kept"].item() == 0
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_fully_ignored_sequence_has_zero_logp_not_nan(seed):
    hidden, ref_hidden, weight, target, b, cu, ru = _batch(b=4)
    target[1] = -100
    target[5] = -100
    for avg in (False, True):
        loss, _, metrics = FusedLinearSafeDPOLoss(average_log_prob=avg, impl="torch")(
            weight, hidden, target, ref_input=ref_hidden, chosen_unsafe=cu, rejected_unsafe=ru, return_metrics=True
        )
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    tok = linear_logprobs(hidden, weight, target)
    assert sequence_logps(tok, target, average=True)[1].item() == 0.0


def test_packed_layout_equals_padded(seed):
    hidden, ref_hidden, weight, target, b, cu, ru = _batch(b=4, t=9)
    lengths = [9 - int(torch.randint(0, 4, ())) for _ in range(8)]
    packed_h = torch.cat([hidden[i, :n] for i, n in enumerate(lengths)])
    packed_ref = torch.cat([ref_hidden[i, :n] for i, n in enumerate(lengths)])
    padded_target = target.clone()
    for i, n in enumerate(lengths):
        padded_target[i, n:] = -100
    packed_t = torch.cat([target[i, :n] for i, n in enumerate(lengths)])
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).int()
    mod = FusedLinearSafeDPOLoss(impl="torch")
    a, _ = mod(weight, hidden, padded_target, b, ref_hidden, chosen_unsafe=cu, rejected_unsafe=ru)
    c, _ = mod(weight, packed_h[None], packed_t[None], b, packed_ref[None], chosen_unsafe=cu, rejected_unsafe=ru,
               cu_seqlens=cu_seqlens)
    torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    avg = packed_sequence_logps(linear_logprobs(packed_h, weight, packed_t), packed_t, cu_seqlens, average=True)
    ref_avg = sequence_logps(linear_logprobs(hidden, weight, padded_target), padded_target, average=True)
    torch.testing.assert_close(avg, ref_avg, rtol=1e-12, atol=1e-12)


def test_dpo_module_equals_safedpo_with_safe_flags_and_no_margin(seed):
    hidden, ref_hidden, weight, target, b, _, _ = _batch(b=4)
    zeros = torch.zeros(4)
    a, _ = FusedLinearSafeDPOLoss(delta=0.0, impl="torch")(weight, hidden, target, ref_input=ref_hidden,
                                                       chosen_unsafe=zeros, rejected_unsafe=zeros)
    c, _, m = FusedLinearDPOLoss(impl="torch")(weight, hidden, target, ref_input=ref_hidden, return_metrics=True)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert "rewards/accuracies" in m


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(_input=a["_input"][:7]), "even number of rows"),
        (lambda a: a.update(_input=a["_input"][0]), r"\(2B, T, H\)"),
        (lambda a: a.update(chosen_unsafe=torch.tensor([0, 3, 1, 0])), "chosen_unsafe"),
        (lambda a: a.update(ref_input=None), "ref_input"),
        (lambda a: a.update(ref_input=None, ref_chosen_logps=torch.zeros(4)), "both or neither"),
        (lambda a: a.update(ref_input=None, ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(3)),
         "ref_chosen_logps"),
        (lambda a: a.update(cu_seqlens=torch.tensor([0, 3, 5])), "cu_seqlens"),
    ],
)
def test_module_bad_input(mutate, match):
    hidden, ref_hidden, weight, target, b, cu, ru = _batch(b=4)
    args = dict(lin_weight=weight, _input=hidden, target=target, chosen_unsafe=cu, rejected_unsafe=ru,
                ref_input=ref_hidden)
    mutate(args)
    if args["_input"].shape[0] == 7:
        args["target"] = target[:7]
        args["ref_input"] = ref_hidden[:7]
    if args["_input"].dim() == 2 and args.get("cu_seqlens") is None:
        args["target"] = target[0]
        args["ref_input"] = ref_hidden[0]
    with pytest.raises((ValueError, TypeError), match=match):
        FusedLinearSafeDPOLoss(impl="torch")(**args)


@pytest.mark.parametrize("kwargs,match", [(dict(beta=0), "beta"), (dict(delta=-1), "delta"), (dict(impl="x"), "impl")])
def test_module_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedLinearSafeDPOLoss(**kwargs)
