"""Global normalization (issue 11): 2 accumulated micro-batches of 2 pairs equal 1 batch of 4, with a
dropped and a swapped pair present, through the functional API and the fused modules (float32,
1e-6 relative); metrics stay per-call means."""

from __future__ import annotations

import pytest
import torch

from safedpo_kernels import (
    LOSS_TYPES,
    FusedLinearDPOLoss,
    FusedLinearSafeDPOLoss,
    count_kept_pairs,
    count_nll_tokens,
    dpo_loss,
    safedpo_loss,
)

# Pair 0 dropped (both unsafe), pair 1 all safe | pair 2 swapped, pair 3 safe-vs-unsafe.
CU = torch.tensor([1, 0, 1, 0])
RU = torch.tensor([1, 0, 0, 1])
MICRO = (slice(0, 2), slice(2, 4))
SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _logps():
    pc, pr = ((-10 * torch.rand(4)).requires_grad_() for _ in range(2))
    rc, rr = pc.detach() + torch.randn(4), pr.detach() + torch.randn(4)
    return pc, pr, rc, rr


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_functional_accumulation_equals_one_batch(seed, loss_type, as_tensor):
    pc, pr, rc, rr = _logps()
    kw = dict(beta=0.2, delta=2.0, loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0))
    full = safedpo_loss(pc, pr, rc, rr, CU, RU, **kw)
    g_full = torch.autograd.grad(full, (pc, pr))
    n = count_kept_pairs(CU, RU)
    assert n.dtype == torch.int64 and n.dim() == 0 and int(n) == 3
    total = 0.0
    for s in MICRO:
        total = total + safedpo_loss(pc[s], pr[s], rc[s], rr[s], CU[s], RU[s], num_kept_pairs=n if as_tensor else 3,
                                     **kw)
    g_acc = torch.autograd.grad(total, (pc, pr))
    torch.testing.assert_close(total, full, rtol=1e-6, atol=0)
    for a, f in zip(g_acc, g_full):
        assert _rel(a, f) < 1e-6
    # Without the global count, the per-call means weigh the micro-batches unequally: not equal.
    naive = sum(safedpo_loss(pc[s], pr[s], rc[s], rr[s], CU[s], RU[s], **kw) for s in MICRO) / 2
    assert _rel(torch.autograd.grad(naive, pc)[0], g_full[0]) > 1e-3


def test_functional_nll_term_accumulates_exactly(seed):
    pc, pr, rc, rr = _logps()
    cc, rc_counts = torch.randint(3, 9, (4,)), torch.randint(3, 9, (4,))
    kw = dict(beta=0.2, delta=2.0, rpo_alpha=0.5)
    full = safedpo_loss(pc, pr, rc, rr, CU, RU, chosen_token_counts=cc, rejected_token_counts=rc_counts, **kw)
    g_full = torch.autograd.grad(full, (pc, pr))
    n_pairs, n_tok = count_kept_pairs(CU, RU), count_nll_tokens(CU, RU, cc, rc_counts)
    # winners after T(D): pair 1 chosen, pair 2 rejected (swapped), pair 3 chosen; pair 0 dropped
    assert int(n_tok) == int(cc[1] + rc_counts[2] + cc[3])
    total = sum(safedpo_loss(pc[s], pr[s], rc[s], rr[s], CU[s], RU[s], chosen_token_counts=cc[s],
                             rejected_token_counts=rc_counts[s], num_kept_pairs=n_pairs, num_nll_tokens=n_tok, **kw)
                for s in MICRO)
    torch.testing.assert_close(total, full, rtol=1e-6, atol=0)
    for a, f in zip(torch.autograd.grad(total, (pc, pr)), g_full):
        assert _rel(a, f) < 1e-6


def test_dpo_num_pairs_accumulates_exactly(seed):
    pc, pr, rc, rr = _logps()
    full = dpo_loss(pc, pr, rc, rr, beta=0.3)
    total = sum(dpo_loss(pc[s], pr[s], rc[s], rr[s], beta=0.3, num_pairs=4) for s in MICRO)
    for a, f in zip(torch.autograd.grad(total, (pc, pr)), torch.autograd.grad(full, (pc, pr))):
        assert _rel(a, f) < 1e-6


def test_metrics_stay_per_call_means(seed):
    pc, pr, rc, rr = (t.detach() for t in _logps())
    s = MICRO[1]
    _, a = safedpo_loss(pc[s], pr[s], rc[s], rr[s], CU[s], RU[s], return_metrics=True)
    _, b = safedpo_loss(pc[s], pr[s], rc[s], rr[s], CU[s], RU[s], num_kept_pairs=17, return_metrics=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _hidden_batch(t=7, h=12, v=31):
    x = torch.randn(8, t, h)  # 4 chosen rows then 4 rejected rows
    ref_x = x + 0.1 * torch.randn_like(x)
    w = torch.randn(v, h) / h**0.5
    bias = torch.randn(v)
    y = torch.randint(0, v, (8, t))
    for i in range(8):
        y[i, : int(torch.randint(1, 3, ()))] = -100
        y[i, t - int(torch.randint(0, 3, ())):] = -100
    return x, ref_x, w, bias, y


def _rows(s: slice) -> list[int]:
    return list(range(s.start, s.stop)) + list(range(4 + s.start, 4 + s.stop))


@pytest.mark.parametrize("module_cls", [FusedLinearSafeDPOLoss, FusedLinearDPOLoss])
@pytest.mark.parametrize("compute_nll_loss", [False, True])
def test_fused_module_accumulation_equals_one_batch(seed, module_cls, compute_nll_loss):
    x, ref_x, w, bias, y = _hidden_batch()
    safe = module_cls is FusedLinearSafeDPOLoss
    mod = module_cls(beta=0.2, compute_nll_loss=compute_nll_loss, alpha=0.5, impl="torch",
                     **({"delta": 3.0} if safe else {}))
    leaves = (x.requires_grad_(), w.requires_grad_(), bias.requires_grad_())

    def call(rows, s, **norm):
        flags = dict(chosen_unsafe=CU[s], rejected_unsafe=RU[s]) if safe else {}
        return mod(w, x[rows], y[rows], bias, ref_x[rows], **flags, **norm)[0]

    full = call(list(range(8)), slice(0, 4))
    g_full = torch.autograd.grad(full, leaves)
    counts = (y != -100).sum(-1)
    if safe:
        norm = {"num_kept_pairs": count_kept_pairs(CU, RU)}
        n_tok = count_nll_tokens(CU, RU, counts[:4], counts[4:])
    else:
        norm = {"num_pairs": 4}
        n_tok = count_nll_tokens(None, None, counts[:4], counts[4:])
    if compute_nll_loss:
        norm["num_nll_tokens"] = n_tok
    total = sum(call(_rows(s), s, **norm) for s in MICRO)
    torch.testing.assert_close(total, full, rtol=1e-6, atol=0)
    for a, f in zip(torch.autograd.grad(total, leaves), g_full):
        assert _rel(a, f) < 1e-6


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_kept_pairs=-1), "num_kept_pairs"),
        (dict(num_kept_pairs=2.5), "num_kept_pairs"),
        (dict(num_kept_pairs=True), "num_kept_pairs"),
        (dict(num_kept_pairs=torch.tensor([3])), "num_kept_pairs"),
        (dict(num_kept_pairs=3, reduction="sum"), "num_kept_pairs"),
        (dict(num_nll_tokens=5), "num_nll_tokens"),
        (dict(rpo_alpha=1.0), "chosen_token_counts"),
        (dict(rpo_alpha=1.0, chosen_token_counts=torch.ones(4, dtype=torch.long),
              rejected_token_counts=torch.ones(4, dtype=torch.long), reduction="none"), "reduction"),
        (dict(rpo_alpha=-1.0), "rpo_alpha"),
    ],
)
def test_bad_normalizers_name_the_argument(kwargs, match):
    z = torch.zeros(4)
    with pytest.raises(ValueError, match=match):
        safedpo_loss(z, z, z, z, CU, RU, **kwargs)
