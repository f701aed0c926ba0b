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


# --- Liger compatibility, reference-free, loss types, NLL, per-pair outputs (issues 11, 12, 14) ---

import numpy as np  # noqa: E402

from safedpo_kernels import LOSS_TYPES, safedpo_loss  # noqa: E402
from safedpo_kernels.reference import reference_linear_logprobs  # noqa: E402

FLAGS_CU = torch.tensor([0, 0, 1, 1, 0])
FLAGS_RU = torch.tensor([0, 1, 0, 1, 1])


def _seq_ref(hidden, weight, target, bias=None, average=False, **transform):
    tok = reference_linear_logprobs(hidden, weight, target, bias=bias, **transform)
    return sequence_logps(tok, target, average=average), tok


def test_constructor_takes_ligers_positional_order():
    mod = FusedLinearSafeDPOLoss(-1, 0.2, 0.5, True, False, False, True, 4, "hinge", 0.0, 0.07, delta=2.0,
                                 impl="torch")
    assert (mod.ignore_index, mod.beta, mod.alpha, mod.compute_nll_loss, mod.compiled, mod.use_ref_model,
            mod.average_log_prob, mod.chunk_size, mod.loss_type, mod.label_smoothing, mod.discopop_tau,
            mod.delta) == (-1, 0.2, 0.5, True, False, False, True, 4, "hinge", 0.0, 0.07, 2.0)
    dpo = FusedLinearDPOLoss(-1, 0.2, 0.5, True, False, False, True, 4, "ipo")
    assert dpo.loss_type == "ipo" and dpo.averages_log_probs
    # numpy scalars as a config file or numpy code would pass them
    assert FusedLinearSafeDPOLoss(beta=np.float32(0.25), delta=np.float64(1.0)).beta == 0.25


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(ignore_index=-100.0), TypeError, "ignore_index"),
        (dict(ignore_index=True), TypeError, "ignore_index"),
        (dict(alpha=-1.0), ValueError, "alpha"),
        (dict(compute_nll_loss=1), TypeError, "compute_nll_loss"),
        (dict(compiled="yes"), TypeError, "compiled"),
        (dict(use_ref_model=None), TypeError, "use_ref_model"),
        (dict(average_log_prob=0), TypeError, "average_log_prob"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(loss_type="kto"), ValueError, "loss_type"),
        (dict(loss_type="robust", label_smoothing=0.7), ValueError, "label_smoothing"),
        (dict(beta=float("inf")), ValueError, "beta"),
        (dict(delta=float("nan")), ValueError, "delta"),
        (dict(logit_scale=0.0), ValueError, "logit_scale"),
        (dict(softcap=-1.0), ValueError, "softcap"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FusedLinearSafeDPOLoss(**kwargs)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_through_the_module_equals_the_functional_loss(seed, loss_type):
    hidden, ref_hidden, weight, target, b, _, _ = _batch(b=5)
    ls = {"robust": 0.1, "exo_pair": 1e-3}.get(loss_type, 0.0)
    mod = FusedLinearSafeDPOLoss(beta=0.3, loss_type=loss_type, label_smoothing=ls, delta=1.5, impl="torch")
    hidden.requires_grad_()
    loss, aux = mod(weight, hidden, target, b, ref_hidden, chosen_unsafe=FLAGS_CU, rejected_unsafe=FLAGS_RU)
    average = loss_type in ("ipo", "sigmoid_norm")  # averaged automatically, as TRL does
    h64 = hidden.detach().clone().requires_grad_()
    seq, _ = _seq_ref(h64, weight, target, b, average=average)
    with torch.no_grad():
        ref_seq, _ = _seq_ref(ref_hidden, weight, target, b, average=average)
    expected = safedpo_loss(seq[:5], seq[5:], ref_seq[:5], ref_seq[5:], FLAGS_CU, FLAGS_RU, beta=0.3, delta=1.5,
                            loss_type=loss_type, label_smoothing=ls)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux[0], seq[:5].detach(), rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(loss, hidden)
    (g_ref,) = torch.autograd.grad(expected, h64)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("packed", [False, True])
def test_per_pair_outputs_logits_means_and_nll_in_callers_order(seed, packed):
    """Swapped and dropped pairs present: per-pair tensors are the caller's rows (helpfulness order);
    the NLL is over the T(D) winners' tokens; logits means equal those of the materialized logits."""
    hidden, ref_hidden, weight, target, b, _, _ = _batch(b=5, t=9)
    mod = FusedLinearSafeDPOLoss(beta=0.2, delta=3.0, compute_nll_loss=True, alpha=0.4, impl="torch",
                                 logit_scale=0.7)
    kw = dict(chosen_unsafe=FLAGS_CU, rejected_unsafe=FLAGS_RU, return_metrics=True)
    if packed:
        lengths = [9 - int(torch.randint(0, 3, ())) for _ in range(10)]
        x = torch.cat([hidden[i, :n] for i, n in enumerate(lengths)])[None]
        rx = torch.cat([ref_hidden[i, :n] for i, n in enumerate(lengths)])[None]
        y = torch.cat([target[i, :n] for i, n in enumerate(lengths)])[None]
        cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
        loss, aux, metrics = mod(weight, x, y, b, rx, cu_seqlens=cu_seqlens, **kw)
        rows = [(x[0, cu_seqlens[i]:cu_seqlens[i + 1]], y[0, cu_seqlens[i]:cu_seqlens[i + 1]]) for i in range(10)]
    else:
        loss, aux, metrics = mod(weight, hidden, target, b, ref_hidden, **kw)
        rows = [(hidden[i], target[i]) for i in range(10)]
    seq, ref_seq, nll_num, nll_den, logit_means = [], [], 0.0, 0, []
    winners = [0, 1, 7, 3, 4]  # row of each pair's winner after T(D); pair 3 (row 3/8) is dropped
    for i, (h_i, y_i) in enumerate(rows):
        tok = reference_linear_logprobs(h_i, weight, y_i, bias=b, logit_scale=0.7)
        seq.append(tok.sum())
        ref_seq.append(reference_linear_logprobs(rx[0, cu_seqlens[i]:cu_seqlens[i + 1]] if packed else ref_hidden[i],
                                                 weight, y_i, bias=b, logit_scale=0.7).sum())
        if i in winners and i != 3:
            nll_num -= tok.sum()
            nll_den += int((y_i != -100).sum())
        logit_means.append(0.7 * (h_i @ weight.T + b))
    seq, ref_seq = torch.stack(seq), torch.stack(ref_seq)
    chosen_mean = torch.cat([m.reshape(-1, m.shape[-1]) for m in logit_means[:5]]).mean()
    rejected_mean = torch.cat([m.reshape(-1, m.shape[-1]) for m in logit_means[5:]]).mean()
    expected_nll = nll_num / nll_den
    expected = {
        "chosen_logps": seq[:5], "rejected_logps": seq[5:], "chosen_logits_mean": chosen_mean,
        "rejected_logits_mean": rejected_mean, "nll_loss": expected_nll,
        "chosen_rewards": 0.2 * (seq[:5] - ref_seq[:5]), "rejected_rewards": 0.2 * (seq[5:] - ref_seq[5:]),
    }
    for (name, value), got in zip(expected.items(), aux):
        torch.testing.assert_close(got.double(), value.double(), rtol=1e-6 if "mean" in name else 1e-10,
                                   atol=1e-10, msg=name)
    pref = safedpo_loss(seq[:5], seq[5:], ref_seq[:5], ref_seq[5:], FLAGS_CU, FLAGS_RU, beta=0.2, delta=3.0)
    torch.testing.assert_close(loss, pref + 0.4 * expected_nll, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["nll_loss"].double(), expected_nll, rtol=1e-6, atol=0)
    assert metrics["pairs/swapped"].item() == 1 and metrics["pairs/dropped"].item() == 1


def test_softcap_reaches_the_log_probs(seed):
    hidden, ref_hidden, weight, target, b, _, _ = _batch(b=4)
    mod = FusedLinearDPOLoss(impl="torch", softcap=2.0, logit_scale=1.5)
    _, aux = mod(weight, hidden, target, b, ref_hidden)
    seq, _ = _seq_ref(hidden, weight, target, b, logit_scale=1.5, softcap=2.0)
    torch.testing.assert_close(aux[0], seq[:4], rtol=1e-10, atol=1e-12)


def test_ref_bias_without_ref_weight_is_used_with_the_policy_weight(seed):
    hidden, ref_hidden, weight, target, b, cu, ru = _batch(b=4)
    ref_bias = torch.randn_like(b)
    mod = FusedLinearSafeDPOLoss(impl="torch")
    flags = dict(chosen_unsafe=cu, rejected_unsafe=ru)
    a, aux_a = mod(weight, hidden, target, b, ref_hidden, None, ref_bias, **flags)
    c, aux_c = mod(weight, hidden, target, b, ref_hidden, weight, ref_bias, **flags)
    d, _ = mod(weight, hidden, target, b, ref_hidden, **flags)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    torch.testing.assert_close(aux_a[5], aux_c[5], rtol=0, atol=0)
    assert not torch.equal(a, d)  # the reference bias really changed the reference


def test_reference_free_module(seed):
    hidden, ref_hidden, weight, target, b, cu, ru = _batch(b=4)
    mod = FusedLinearSafeDPOLoss(use_ref_model=False, impl="torch")
    loss, aux = mod(weight, hidden, target, b, chosen_unsafe=cu, rejected_unsafe=ru)
    seq, _ = _seq_ref(hidden, weight, target, b)
    expected = safedpo_loss(seq[:4], seq[4:], None, None, cu, ru)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux[5], 0.1 * seq[:4], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="ref_input: given but use_ref_model=False"):
        mod(weight, hidden, target, b, ref_hidden, chosen_unsafe=cu, rejected_unsafe=ru)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        mod(weight, hidden, target, b, chosen_unsafe=cu, rejected_unsafe=ru, ref_chosen_logps=seq[:4],
            ref_rejected_logps=seq[4:])


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda m, w, x, y, b, r, f: m(w, x[..., :-1], y, b, r, **f), ValueError, "_input"),
        (lambda m, w, x, y, b, r, f: m(w[:, :-1], x, y, b, r, **f), ValueError, "_input|lin_weight"),
        (lambda m, w, x, y, b, r, f: m(w, x, y[:, :-1], b, r, **f), ValueError, "target"),
        (lambda m, w, x, y, b, r, f: m(w, x, y.float(), b, r, **f), TypeError, "target"),
        (lambda m, w, x, y, b, r, f: m(w, x, y + 1000, b, r, **f), ValueError, "target"),
        (lambda m, w, x, y, b, r, f: m(w, x, y, b[:-1], r, **f), ValueError, "bias"),
        (lambda m, w, x, y, b, r, f: m(w, x, y, b, r[..., :-1], **f), ValueError, "ref_input"),
        (lambda m, w, x, y, b, r, f: m(w, x, y, b, r, w[:, :-1], **f), ValueError, "ref_input|ref_weight"),
        (lambda m, w, x, y, b, r, f: m(w, x, y, b, None, w, **f), ValueError, "ref_input"),
        (lambda m, w, x, y, b, r, f: m(w, x, y, b, r, num_kept_pairs=-2, **f), ValueError, "num_kept_pairs"),
        (lambda m, w, x, y, b, r, f: m(w, x, y, b, r, num_nll_tokens=3, **f), ValueError, "num_nll_tokens"),
        (lambda m, w, x, y, b, r, f: m(w, x, y, b, r, chosen_unsafe=f["chosen_unsafe"]), TypeError,
         "rejected_unsafe"),
        (lambda m, w, x, y, b, r, f: m(w, x, y, f["chosen_unsafe"], f["rejected_unsafe"]), TypeError,
         "keyword-only"),
        (lambda m, w, x, y, b, r, f: m(w, x, y, b, r, chosen_unsafe=torch.tensor([0, 1]),
                                       rejected_unsafe=f["rejected_unsafe"]), ValueError, "chosen_unsafe"),
    ],
)
def test_forward_errors_name_the_callers_arguments(call, exc, match):
    hidden, ref_hidden, weight, target, b, cu, ru = _batch(b=4)
    with pytest.raises(exc, match=match):
        call(FusedLinearSafeDPOLoss(impl="torch"), weight, hidden, target, b, ref_hidden,
             dict(chosen_unsafe=cu, rejected_unsafe=ru))


def test_sequence_logps_checks_target_shape_and_ignore_index():
    with pytest.raises(TypeError, match="ignore_index"):
        sequence_logps(torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long), ignore_index=-100.9)
    with pytest.raises(TypeError, match="ignore_index"):
        packed_sequence_logps(torch.zeros(9), torch.zeros(9, dtype=torch.long), torch.tensor([0, 4, 9]),
                              ignore_index=True)
    with pytest.raises(ValueError, match="target"):
        sequence_logps(torch.zeros(2, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        packed_sequence_logps(torch.zeros(9), torch.zeros(8, dtype=torch.long), torch.tensor([0, 4, 9]))


def test_compiled_and_chunk_size_are_no_ops(seed):
    hidden, ref_hidden, weight, target, b, cu, ru = _batch(b=4)
    flags = dict(chosen_unsafe=cu, rejected_unsafe=ru)
    a, _ = FusedLinearSafeDPOLoss(impl="torch")(weight, hidden, target, b, ref_hidden, **flags)
    c, _ = FusedLinearSafeDPOLoss(compiled=False, chunk_size=3, impl="torch")(weight, hidden, target, b, ref_hidden,
                                                                             **flags)
    assert torch.equal(a, c)


def test_per_pair_logps_and_rewards_are_differentiable(seed):
    hidden, ref_hidden, weight, target, b, cu, ru = _batch(b=4)
    hidden.requires_grad_()
    _, aux = FusedLinearSafeDPOLoss(impl="torch")(weight, hidden, target, b, ref_hidden, chosen_unsafe=cu,
                                                  rejected_unsafe=ru)
    (g,) = torch.autograd.grad(aux[0].sum() + aux[6].sum(), hidden)
    h64 = hidden.detach().clone().requires_grad_()
    seq, _ = _seq_ref(h64, weight, target, b)
    (g_ref,) = torch.autograd.grad(seq[:4].sum() + 0.1 * seq[4:].sum(), h64)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert not aux[2].requires_grad and not aux[4].requires_grad


@pytest.mark.parametrize("module_cls", [FusedLinearSafeDPOLoss, FusedLinearDPOLoss])
def test_empty_batch_gives_zero_loss_and_empty_outputs(module_cls):
    w = torch.randn(11, 4, requires_grad=True)
    x = torch.randn(0, 5, 4, requires_grad=True)
    y = torch.zeros(0, 5, dtype=torch.long)
    flags = dict(chosen_unsafe=torch.zeros(0), rejected_unsafe=torch.zeros(0)) if module_cls is FusedLinearSafeDPOLoss else {}
    loss, aux = module_cls(use_ref_model=False, compute_nll_loss=True, impl="torch")(w, x, y, **flags)
    assert loss.item() == 0.0 and all(torch.isfinite(a).all() for a in aux)
    assert aux[0].shape == aux[5].shape == (0,)
    loss.backward()
    assert torch.all(w.grad == 0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_triton_path_through_the_module_matches_float64(seed, loss_type):
    """impl="triton" (Triton interpreter on the CPU), with swaps, drops, the NLL term and a soft cap."""
    pytest.importorskip("triton")
    hidden, ref_hidden, weight, target, b, _, _ = _batch(b=5, t=6, h=16, v=37, dtype=torch.float32)
    kw = dict(beta=0.2, delta=2.0, loss_type=loss_type, compute_nll_loss=True, alpha=0.3, softcap=3.0)
    flags = dict(chosen_unsafe=FLAGS_CU, rejected_unsafe=FLAGS_RU)
    leaves = (hidden.requires_grad_(), weight.requires_grad_())
    loss, aux = FusedLinearSafeDPOLoss(impl="triton", **kw)(weight, hidden, target, b, ref_hidden, **flags)
    grads = torch.autograd.grad(loss, leaves)
    leaves64 = tuple(t.detach().double().requires_grad_() for t in leaves)
    ref, aux_ref = FusedLinearSafeDPOLoss(impl="torch", **kw)(leaves64[1], leaves64[0], target, b.double(),
                                                              ref_hidden.double(), **flags)
    grads_ref = torch.autograd.grad(ref, leaves64)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for a, r in zip(aux, aux_ref):
        torch.testing.assert_close(a.detach().double(), r.detach(), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6)
