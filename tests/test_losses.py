"""safedpo_loss / dpo_loss against the pair-by-pair float64 reference, values, gradients, metrics."""

import itertools

import pytest
import torch

from safedpo_kernels import dpo_loss, safedpo_loss, safety_transform
from safedpo_kernels.reference import reference_dpo_loss, reference_safedpo_loss

ALL_FLAG_COMBOS = list(itertools.product([0, 1], repeat=2))


def _logps(b, dtype=torch.float64):
    # Sequence log-probs are negative and of order tens; the ref is close to the policy.
    pc = (-20 * torch.rand(b, dtype=dtype)).requires_grad_()
    pr = (-20 * torch.rand(b, dtype=dtype)).requires_grad_()
    rc = (pc.detach() + torch.randn(b, dtype=dtype)).requires_grad_()
    rr = (pr.detach() + torch.randn(b, dtype=dtype)).requires_grad_()
    return pc, pr, rc, rr


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("delta", [0.0, 10.0, 2.5])
def test_safedpo_matches_reference_values_and_grads(seed, reduction, delta):
    b = 37
    pc, pr, rc, rr = _logps(b)
    # Every flag combination present, plus random ones.
    cu = torch.tensor([c for c, _ in ALL_FLAG_COMBOS] + torch.randint(0, 2, (b - 4,)).tolist())
    ru = torch.tensor([r for _, r in ALL_FLAG_COMBOS] + torch.randint(0, 2, (b - 4,)).tolist())
    kw = dict(beta=0.3, delta=delta, reduction=reduction, return_metrics=True)
    loss, metrics = safedpo_loss(pc, pr, rc, rr, cu.bool(), ru.bool(), **kw)
    ref, ref_metrics = reference_safedpo_loss(pc, pr, rc, rr, cu, ru, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(loss) if reduction == "none" else torch.tensor(1.0, dtype=loss.dtype)
    g = torch.autograd.grad((loss * weights).sum(), (pc, pr, rc, rr))
    g_ref = torch.autograd.grad((ref * weights).sum(), (pc, pr, rc, rr))
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    for key, value in ref_metrics.items():
        torch.testing.assert_close(metrics[key], value, rtol=1e-6, atol=1e-6, msg=key)
    n_drop = int((cu.bool() & ru.bool()).sum())
    assert metrics["pairs/dropped"].item() == n_drop
    assert metrics["pairs/kept"].item() == b - n_drop
    assert metrics["pairs/swapped"].item() == int((cu.bool() & ~ru.bool()).sum())
    assert metrics["safety/safe_vs_unsafe_frac"].item() == pytest.approx((cu ^ ru).sum().item() / b)


@pytest.mark.parametrize("cu,ru", ALL_FLAG_COMBOS)
def test_each_flag_combination_by_hand(cu, ru):
    """One pair per case, formula written out: keep / swap / drop and where delta applies."""
    beta, delta = 0.5, 3.0
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-4.0, -7.0, -5.0, -6.0))
    loss = safedpo_loss(pc, pr, rc, rr, torch.tensor([cu]), torch.tensor([ru]), beta=beta, delta=delta)
    r_c, r_r = beta * (-4.0 + 5.0), beta * (-7.0 + 6.0)
    sig = torch.nn.functional.logsigmoid
    expected = {
        (0, 0): r_c - r_r,
        (0, 1): r_c - r_r - delta,
        (1, 0): r_r - r_c - delta,  # swapped: rejected becomes the winner
        (1, 1): None,  # dropped
    }[(cu, ru)]
    expected = torch.tensor(0.0 if expected is None else -sig(torch.tensor([expected], dtype=torch.float64)).item(),
                            dtype=torch.float64)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_delta_changes_only_safe_vs_unsafe_pairs(seed):
    pc, pr, rc, rr = (t.detach() for t in _logps(8))
    cu = torch.tensor([0, 0, 1, 1, 0, 0, 1, 0])
    ru = torch.tensor([0, 1, 0, 1, 0, 1, 0, 0])
    a = safedpo_loss(pc, pr, rc, rr, cu, ru, delta=0.0, reduction="none")
    b = safedpo_loss(pc, pr, rc, rr, cu, ru, delta=10.0, reduction="none")
    sv = (cu ^ ru).bool()
    assert torch.equal(a[~sv], b[~sv])
    assert bool((b[sv] > a[sv]).all())


def test_delta_zero_all_safe_equals_dpo(seed):
    pc, pr, rc, rr = _logps(11)
    zeros = torch.zeros(11, dtype=torch.bool)
    a = safedpo_loss(pc, pr, rc, rr, zeros, zeros, beta=0.2, delta=0.0)
    b = dpo_loss(pc, pr, rc, rr, beta=0.2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref = reference_dpo_loss(pc, pr, rc, rr, beta=0.2)
    torch.testing.assert_close(b, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_dropped_batch_is_zero_and_backpropagates(reduction):
    pc, pr, rc, rr = _logps(4)
    ones = torch.ones(4, dtype=torch.bool)
    loss, metrics = safedpo_loss(pc, pr, rc, rr, ones, ones, reduction=reduction, return_metrics=True)
    assert torch.all(loss == 0)
    loss.sum().backward()
    for t in (pc, pr, rc, rr):
        assert t.grad is not None and torch.all(t.grad == 0)
    assert metrics["pairs/kept"].item() == 0 and metrics["pairs/dropped"].item() == 4
    assert all(torch.isfinite(v) for v in metrics.values())


def test_dropped_pair_with_nonfinite_logps_does_not_poison_gradients():
    pc = torch.tensor([-3.0, float("nan")], requires_grad=True)
    pr = torch.tensor([-4.0, float("-inf")], requires_grad=True)
    ref = torch.tensor([-3.5, -3.5])
    loss = safedpo_loss(pc, pr, ref, ref, torch.tensor([0, 1]), torch.tensor([1, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(pc.grad).all() and pc.grad[1] == 0


def test_nonfinite_kept_pair_gives_nonfinite_loss():
    pc = torch.tensor([-3.0, float("nan")])
    pr = torch.tensor([-4.0, -5.0])
    loss = safedpo_loss(pc, pr, pr, pr, torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert torch.isnan(loss)


def test_float32_inputs_give_float32_loss(seed):
    pc, pr, rc, rr = (t.detach().float() for t in _logps(5))
    flags = torch.tensor([0, 1, 0, 1, 1])
    loss = safedpo_loss(pc, pr, rc, rr, flags, flags.flip(0))
    assert loss.dtype == torch.float32
    ref = reference_safedpo_loss(*(t.double() for t in (pc, pr, rc, rr)), flags, flags.flip(0))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)


def test_safety_transform_masks():
    cu = torch.tensor([False, False, True, True])
    ru = torch.tensor([False, True, False, True])
    t = safety_transform(cu, ru)
    assert t.keep.tolist() == [True, True, True, False]
    assert t.swap.tolist() == [False, False, True, False]
    assert t.safe_vs_unsafe.tolist() == [False, True, True, False]


def test_integer_and_float_flags_accepted():
    pc, pr, rc, rr = (t.detach() for t in _logps(3))
    a = safedpo_loss(pc, pr, rc, rr, torch.tensor([1, 0, 1]), torch.tensor([0, 0, 1]))
    b = safedpo_loss(pc, pr, rc, rr, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0]))
    c = safedpo_loss(pc, pr, rc, rr, torch.tensor([True, False, True]), torch.tensor([False, False, True]))
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(beta=0.0), ValueError, "beta"),
        (dict(beta=-1.0), ValueError, "beta"),
        (dict(delta=-0.5), ValueError, "delta"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(chosen_unsafe=torch.tensor([0, 2, 1])), ValueError, "chosen_unsafe"),
        (dict(rejected_unsafe=torch.tensor([0, 1])), ValueError, "rejected_unsafe"),
        (dict(ref_chosen_logps=torch.zeros(4)), ValueError, "ref_chosen_logps"),
        (dict(policy_chosen_logps=torch.zeros(3, dtype=torch.long)), TypeError, "policy_chosen_logps"),
        (dict(policy_rejected_logps=torch.zeros(3, 1)), ValueError, "policy_rejected_logps"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, match):
    args = dict(
        policy_chosen_logps=torch.zeros(3), policy_rejected_logps=torch.zeros(3),
        ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(3),
        chosen_unsafe=torch.tensor([0, 1, 1]), rejected_unsafe=torch.tensor([0, 0, 1]),
    )
    opts = {k: kwargs.pop(k) for k in list(kwargs) if k in ("beta", "delta", "reduction")}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        safedpo_loss(**args, **opts)


def test_safety_transform_with_integer_flags_still_drops_both_unsafe():
    for dtype in (torch.int64, torch.int32, torch.uint8, torch.float32):
        t = safety_transform(torch.tensor([0, 0, 1, 1], dtype=dtype), torch.tensor([0, 1, 0, 1], dtype=dtype))
        assert t.keep.dtype == torch.bool and t.keep.tolist() == [True, True, True, False]
        assert t.swap.tolist() == [False, False, True, False]
        assert t.safe_vs_unsafe.tolist() == [False, True, True, False]


@pytest.mark.parametrize(
    "cu,ru,exc,match",
    [
        (torch.tensor([0, 2]), torch.tensor([0, 1]), ValueError, "chosen_unsafe"),
        (torch.tensor([0, 1]), torch.tensor([-1, 1]), ValueError, "rejected_unsafe"),
        (torch.tensor([0, 1]), torch.tensor([0, 1, 1]), ValueError, "rejected_unsafe"),
        ([0, 1], torch.tensor([0, 1]), TypeError, "chosen_unsafe"),
        (torch.zeros(2, 1), torch.zeros(2), ValueError, "chosen_unsafe"),
    ],
)
def test_safety_transform_rejects_other_values_naming_the_argument(cu, ru, exc, match):
    with pytest.raises(exc, match=match):
        safety_transform(cu, ru)


def test_numpy_and_tensor_scalars_for_beta_and_delta(seed):
    np = pytest.importorskip("numpy")
    pc, pr, rc, rr = (t.detach() for t in _logps(6))
    flags = (torch.tensor([0, 1, 0, 1, 0, 0]), torch.tensor([0, 0, 1, 1, 1, 0]))
    expected = safedpo_loss(pc, pr, rc, rr, *flags, beta=0.25, delta=2.0)
    for beta, delta in ((np.float32(0.25), np.float32(2.0)), (np.float64(0.25), np.int64(2)),
                        (torch.tensor(0.25), torch.tensor(2.0))):
        torch.testing.assert_close(safedpo_loss(pc, pr, rc, rr, *flags, beta=beta, delta=delta), expected,
                                   rtol=1e-12, atol=0)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=np.float32(0.25)), dpo_loss(pc, pr, rc, rr, beta=0.25),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("kwargs,match", [(dict(beta=float("inf")), "beta"), (dict(delta=float("inf")), "delta"),
                                          (dict(delta=float("nan")), "delta")])
def test_nonfinite_beta_delta_rejected(kwargs, match):
    z = torch.zeros(2)
    with pytest.raises(ValueError, match=match):
        safedpo_loss(z, z, z, z, torch.tensor([0, 1]), torch.tensor([0, 0]), **kwargs)


def test_reference_free_is_zero_reference_and_needs_both_or_neither(seed):
    pc, pr, _, _ = _logps(5)
    flags = (torch.tensor([0, 1, 0, 1, 0]), torch.tensor([0, 0, 1, 1, 1]))
    zero = torch.zeros(5, dtype=torch.float64)
    a = safedpo_loss(pc, pr, None, None, *flags, beta=0.2, delta=1.0)
    c = safedpo_loss(pc, pr, zero, zero, *flags, beta=0.2, delta=1.0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    ref = reference_safedpo_loss(pc, pr, zero, zero, *flags, beta=0.2, delta=1.0)
    torch.testing.assert_close(a, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="both"):
        safedpo_loss(pc, pr, zero, None, *flags)
    with pytest.raises(ValueError, match="both"):
        dpo_loss(pc, pr, None, zero)


def test_count_kept_pairs():
    from safedpo_kernels import count_kept_pairs

    n = count_kept_pairs(torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 0, 1, 1, 1]))
    assert n.dtype == torch.int64 and n.dim() == 0 and int(n) == 3
    assert int(count_kept_pairs(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool))) == 0
    with pytest.raises(ValueError, match="chosen_unsafe"):
        count_kept_pairs(torch.tensor([3]), torch.tensor([0]))
