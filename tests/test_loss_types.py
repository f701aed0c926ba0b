"""Every loss type (SafeDAA) against the installed peers and a pair-by-pair float64 reference.

* delta = 0 on all-safe pairs: equal to TRL's ``DPOTrainer`` loss (its ``_compute_loss`` called unbound
  on a stand-in ``self`` and a stand-in model that returns given per-token log-probs) and to Liger's
  ``LigerFusedLinearDPOFunction.preference_loss_fn`` (where Liger has the type), values and
  gradients, within 1e-6 in float64 and 1e-5 in float32;
* with swaps, drops and delta > 0: equal to a reference written pair by pair from the table in
  docs/losses.md (``b -> b + s * delta``), values and gradients in float64.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from safedpo_kernels import LOSS_TYPES, dpo_loss, safedpo_loss

LIGER_TYPES = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
               "apo_down", "discopop")
TRL_TYPES = LOSS_TYPES  # TRL 1.x has every one of ours
SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3}
AVERAGED = ("ipo", "sigmoid_norm")


def _tokens(b: int, t: int, dtype: torch.dtype):
    """Per-token log-probs (2B, T-1) with zeros outside the completion, the completion mask (2B, T)
    (TRL's: first token always prompt), and reference sequence log-probs (2B,)."""
    completion = torch.zeros(2 * b, t, dtype=torch.long)
    for i in range(2 * b):
        start = int(torch.randint(1, t // 2, ()))
        end = t - int(torch.randint(0, 2, ()))
        completion[i, start:end] = 1
    shift = completion[:, 1:]
    tok = (-3 * torch.rand(2 * b, t - 1, dtype=dtype)) * shift
    ref = (tok.sum(1) + 0.5 * torch.randn(2 * b, dtype=dtype)).detach()
    return tok.requires_grad_(), completion, ref


class _StandInModel(torch.nn.Module):
    """What TRL's fused-LM-head forward returns, from given per-token log-probs."""

    def __init__(self, token_logps):
        super().__init__()
        self.token_logps = token_logps

    def forward(self, **kwargs):
        lp = self.token_logps
        zeros = torch.zeros_like(lp.detach())
        return types.SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros,
                                     is_top1=torch.zeros_like(zeros, dtype=torch.bool))


def trl_loss(loss_types, token_logps, completion, ref, *, beta, label_smoothing=0.0, loss_weights=None,
             discopop_tau=0.05):
    """TRL 1.x DPOTrainer._compute_loss on a batch [chosen; rejected] with precomputed reference log-probs."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    model = _StandInModel(token_logps)
    b = ref.shape[0] // 2
    identity = lambda x: x  # noqa: E731
    stand_in = types.SimpleNamespace(
        model=model, accelerator=types.SimpleNamespace(device=token_logps.device, gather_for_metrics=identity,
                                                       gather=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=list(loss_types), loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, args=types.SimpleNamespace(discopop_tau=discopop_tau),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "ref_chosen_logps": ref[:b], "ref_rejected_logps": ref[b:]}
    return trl_dpo.DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)


def liger_loss(loss_type, pc, pr, rc, rr, *, beta, label_smoothing=0.0, discopop_tau=0.05):
    dpo = pytest.importorskip("liger_kernel.chunked_loss.dpo_loss")
    full_target = torch.zeros(2 * pc.shape[0], 1)
    loss, _, _ = dpo.LigerFusedLinearDPOFunction.preference_loss_fn(
        pc, pr, full_target, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
        discopop_tau=discopop_tau)
    return loss


def _ours_from_tokens(loss_type, tok, completion, ref, *, beta, label_smoothing, use_dpo):
    b = ref.shape[0] // 2
    seq = tok.sum(1)
    refs = ref
    if loss_type in AVERAGED:  # the functional API takes per-token means for these (TRL divides by length)
        n = completion.sum(1).clamp(min=1).to(seq.dtype)
        seq, refs = seq / n, ref / n
    if use_dpo:
        return dpo_loss(seq[:b], seq[b:], refs[:b], refs[b:], beta=beta, loss_type=loss_type,
                        label_smoothing=label_smoothing)
    safe = torch.zeros(b, dtype=torch.bool)
    return safedpo_loss(seq[:b], seq[b:], refs[:b], refs[b:], safe, safe, beta=beta, delta=0.0,
                        loss_type=loss_type, label_smoothing=label_smoothing)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("loss_type", TRL_TYPES)
def test_delta_zero_all_safe_equals_trl(seed, loss_type, dtype, tol):
    beta = 0.1 if loss_type not in ("ipo", "sppo_hard") else 0.3
    ls = SMOOTHING.get(loss_type, 0.0)
    tok, completion, ref = _tokens(7, 13, dtype)
    expected = trl_loss([loss_type], tok, completion, ref, beta=beta, label_smoothing=ls)
    (g_expected,) = torch.autograd.grad(expected, tok)
    for use_dpo in (False, True):
        got = _ours_from_tokens(loss_type, tok, completion, ref, beta=beta, label_smoothing=ls, use_dpo=use_dpo)
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
        (g,) = torch.autograd.grad(got, tok)
        torch.testing.assert_close(g, g_expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("loss_type", LIGER_TYPES)
def test_delta_zero_all_safe_equals_liger(seed, loss_type, dtype, tol):
    beta = 0.1 if loss_type != "sppo_hard" else 0.3
    ls = SMOOTHING.get(loss_type, 0.0)
    b = 9
    leaves = [(-20 * torch.rand(b, dtype=dtype)).requires_grad_() for _ in range(2)]
    refs = [(x.detach() + torch.randn(b, dtype=dtype)).requires_grad_() for x in leaves]
    args = (*leaves, *refs)
    expected = liger_loss(loss_type, *args, beta=beta, label_smoothing=ls)
    g_expected = torch.autograd.grad(expected, args)
    safe = torch.zeros(b, dtype=torch.bool)
    got = safedpo_loss(*args, safe, safe, beta=beta, delta=0.0, loss_type=loss_type, label_smoothing=ls)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    for a, e in zip(torch.autograd.grad(got, args), g_expected):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    # Reference-free: Liger's use_ref_model=False is reference log-probs of 0.
    zero = torch.zeros(b, dtype=dtype)
    expected_free = liger_loss(loss_type, leaves[0], leaves[1], None, None, beta=beta, label_smoothing=ls)
    got_free = safedpo_loss(leaves[0], leaves[1], None, None, safe, safe, beta=beta, delta=0.0,
                            loss_type=loss_type, label_smoothing=ls)
    torch.testing.assert_close(got_free, expected_free, rtol=tol, atol=tol)
    torch.testing.assert_close(got_free, safedpo_loss(leaves[0], leaves[1], zero, zero, safe, safe, beta=beta,
                                                      delta=0.0, loss_type=loss_type, label_smoothing=ls),
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_rpo_nll_term_equals_trl_sigmoid_plus_sft(seed, dtype, tol):
    """TRL's RPO: loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]; ours: rpo_alpha with token counts."""
    alpha, beta = 0.7, 0.2
    tok, completion, ref = _tokens(6, 11, dtype)
    expected = trl_loss(["sigmoid", "sft"], tok, completion, ref, beta=beta, loss_weights=[1.0, alpha])
    (g_expected,) = torch.autograd.grad(expected, tok)
    b = 6
    seq, counts = tok.sum(1), completion[:, 1:].sum(1)
    safe = torch.zeros(b, dtype=torch.bool)
    got = safedpo_loss(seq[:b], seq[b:], ref[:b], ref[b:], safe, safe, beta=beta, delta=0.0, rpo_alpha=alpha,
                       chosen_token_counts=counts[:b], rejected_token_counts=counts[b:])
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    (g,) = torch.autograd.grad(got, tok)
    # Outside the completion the stand-in's log-probs are constants 0 (the kernels give them no
    # gradient); TRL's "sft" term indexes them away, our token sums include the zeros.
    mask = completion[:, 1:].bool()
    torch.testing.assert_close(g[mask], g_expected[mask], rtol=tol, atol=tol)


def test_nll_term_with_averaged_logps_is_the_same_token_mean(seed):
    b = 5
    tok, completion, ref = _tokens(b, 12, torch.float64)
    counts = completion[:, 1:].sum(1)
    seq = tok.sum(1)
    safe = torch.zeros(b, dtype=torch.bool)
    kw = dict(beta=0.1, delta=0.0, rpo_alpha=1.0, chosen_token_counts=counts[:b], rejected_token_counts=counts[b:],
              return_metrics=True)
    _, m_sum = safedpo_loss(seq[:b], seq[b:], ref[:b], ref[b:], safe, safe, **kw)
    avg, ravg = seq / counts, ref / counts
    _, m_avg = safedpo_loss(avg[:b], avg[b:], ravg[:b], ravg[b:], safe, safe, average_log_prob=True, **kw)
    expected = -tok[:b].sum() / counts[:b].sum()
    torch.testing.assert_close(m_sum["nll_loss"].double(), expected.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(m_avg["nll_loss"].double(), expected.detach(), rtol=1e-6, atol=0)


# --- pair-by-pair float64 reference (docs/losses.md table), independent of the vectorized code ---

def _ls(x):  # log sigmoid, written out
    return -torch.log1p(torch.exp(-x)) if x >= 0 else x - torch.log1p(torch.exp(x))


def _sig(x):
    return torch.exp(_ls(x))


def _reference_pair(kind, rw, rl, s, *, beta, delta, ls, tau):
    """One ordered pair: winner/loser log-ratios rw, rl (0-dim float64), s = 1 on safe-vs-unsafe."""
    a, b = beta * rw, beta * rl + s * delta
    u = a - b
    if kind in ("sigmoid", "sigmoid_norm"):
        return -(1 - ls) * _ls(u) - ls * _ls(-u)
    if kind == "hinge":
        return torch.clamp(1 - u, min=0)
    if kind == "ipo":
        return (u / beta - 1 / (2 * beta)) ** 2
    if kind == "robust":
        return ((1 - ls) * -_ls(u) + ls * _ls(-u)) / (1 - 2 * ls)
    if kind == "exo_pair":
        return _sig(u) * (_ls(u) - math.log(1 - ls)) + _sig(-u) * (_ls(-u) - math.log(ls))
    if kind == "discopop":
        m = _sig(u / tau)
        return -_ls(u) * (1 - m) + torch.exp(-u) * m
    if kind == "apo_zero":
        return 1 - _sig(a) + _sig(b)
    if kind == "apo_down":
        return _sig(a) + 1 - _sig(u)
    if kind == "sppo_hard":
        return (a / beta - 1 / (2 * beta)) ** 2 + (b / beta + 1 / (2 * beta)) ** 2
    if kind == "nca_pair":
        return -_ls(a) - 0.5 * _ls(-a) - 0.5 * _ls(-b)
    if kind == "bco_pair":
        return -_ls(a) - _ls(-b)
    raise AssertionError(kind)


def reference_safedaa(pc, pr, rc, rr, cu, ru, *, loss_type, beta, delta, ls=0.0, tau=0.05, normalizer=None):
    terms = []
    for i in range(pc.shape[0]):
        hw, hl = int(cu[i]), int(ru[i])
        if hw and hl:
            continue  # dropped
        if hw:  # swapped: the safe loser becomes the winner
            rw, rl = pr[i] - rr[i], pc[i] - rc[i]
        else:
            rw, rl = pc[i] - rc[i], pr[i] - rr[i]
        terms.append(_reference_pair(loss_type, rw, rl, hw ^ hl, beta=beta, delta=delta, ls=ls, tau=tau))
    total = torch.stack(terms).sum() if terms else pc.sum() * 0
    return total / (normalizer if normalizer is not None else max(len(terms), 1))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("delta", [0.0, 2.5])
def test_safedaa_matches_pair_by_pair_reference(seed, loss_type, delta):
    b = 23
    beta = 0.25
    ls = SMOOTHING.get(loss_type, 0.0)
    pc, pr = ((-15 * torch.rand(b, dtype=torch.float64)).requires_grad_() for _ in range(2))
    rc, rr = ((x.detach() + torch.randn(b, dtype=torch.float64)).requires_grad_() for x in (pc, pr))
    cu = torch.tensor([0, 0, 1, 1] + torch.randint(0, 2, (b - 4,)).tolist())
    ru = torch.tensor([0, 1, 0, 1] + torch.randint(0, 2, (b - 4,)).tolist())
    got = safedpo_loss(pc, pr, rc, rr, cu, ru, beta=beta, delta=delta, loss_type=loss_type, label_smoothing=ls)
    ref = reference_safedaa(pc, pr, rc, rr, cu, ru, loss_type=loss_type, beta=beta, delta=delta, ls=ls)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(torch.autograd.grad(got, (pc, pr, rc, rr)), torch.autograd.grad(ref, (pc, pr, rc, rr))):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_delta_only_touches_safe_vs_unsafe_pairs_and_penalizes_them(seed, loss_type):
    b = 16
    ls = SMOOTHING.get(loss_type, 0.0)
    pc, pr = (-15 * torch.rand(b, dtype=torch.float64) for _ in range(2))
    rc, rr = pc + torch.randn(b, dtype=torch.float64), pr + torch.randn(b, dtype=torch.float64)
    cu, ru = torch.tensor([0, 0, 1, 1] * 4), torch.tensor([0, 1, 0, 1] * 4)
    kw = dict(beta=0.2, loss_type=loss_type, label_smoothing=ls, reduction="none")
    a = safedpo_loss(pc, pr, rc, rr, cu, ru, delta=0.0, **kw)
    c = safedpo_loss(pc, pr, rc, rr, cu, ru, delta=3.0, **kw)
    sv = (cu ^ ru).bool()
    assert torch.equal(a[~sv], c[~sv])
    # The margin makes the unsafe loser look better, so the loss cannot decrease (strictly for most g).
    assert bool((c[sv] >= a[sv] - 1e-12).all())
    dropped = (cu & ru).bool()
    assert torch.all(c[dropped] == 0)


def test_sigmoid_label_smoothing_is_conservative_dpo(seed):
    b = 8
    pc, pr, rc, rr = (torch.randn(b, dtype=torch.float64) for _ in range(4))
    safe = torch.zeros(b, dtype=torch.bool)
    got = safedpo_loss(pc, pr, rc, rr, safe, safe, beta=0.3, delta=0.0, label_smoothing=0.2)
    u = 0.3 * ((pc - rc) - (pr - rr))
    expected = (-(0.8) * torch.nn.functional.logsigmoid(u) - 0.2 * torch.nn.functional.logsigmoid(-u)).mean()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="dpo"), "loss_type"),
        (dict(loss_type="exo_pair"), "label_smoothing"),
        (dict(loss_type="exo_pair", label_smoothing=1.0), "label_smoothing"),
        (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
        (dict(label_smoothing=float("nan")), "label_smoothing"),
        (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
        (dict(loss_type="discopop", discopop_tau=float("inf")), "discopop_tau"),
    ],
)
def test_bad_loss_options_name_the_argument(kwargs, match):
    z = torch.zeros(3)
    with pytest.raises(ValueError, match=match):
        safedpo_loss(z, z, z, z, torch.tensor([0, 1, 0]), torch.tensor([0, 0, 1]), **kwargs)
    with pytest.raises(ValueError, match=match):
        dpo_loss(z, z, z, z, **kwargs)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_float32_values_and_gradients_close_to_float64(seed, loss_type):
    """float32 inputs: the loss is computed in float32; against the float64 reference on the same
    (float32-representable) inputs the error is float32 rounding, well inside 1e-5 relative."""
    b, beta = 19, 0.25
    ls = SMOOTHING.get(loss_type, 0.0)
    base = [(-15 * torch.rand(b)), (-15 * torch.rand(b))]
    base += [base[0] + torch.randn(b), base[1] + torch.randn(b)]
    cu = torch.tensor([0, 0, 1, 1] + torch.randint(0, 2, (b - 4,)).tolist())
    ru = torch.tensor([0, 1, 0, 1] + torch.randint(0, 2, (b - 4,)).tolist())
    x32 = [t.clone().requires_grad_() for t in base]
    x64 = [t.double().requires_grad_() for t in base]
    kw = dict(beta=beta, delta=1.5, loss_type=loss_type, label_smoothing=ls)
    got = safedpo_loss(*x32, cu, ru, **kw)
    ref = reference_safedaa(*x64, cu, ru, loss_type=loss_type, beta=beta, delta=1.5, ls=ls)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(got, x32), torch.autograd.grad(ref, x64)):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-6)


def test_bco_pair_running_mean_through_the_reference_offsets(seed):
    """docs/losses.md: older TRL's bco_pair subtracted a running reward mean delta from both rewards;
    passing ref + delta/beta reproduces it exactly."""
    b, beta, running_mean = 7, 0.2, 0.37
    pc, pr, rc, rr = (torch.randn(b, dtype=torch.float64) for _ in range(4))
    safe = torch.zeros(b, dtype=torch.bool)
    got = safedpo_loss(pc, pr, rc + running_mean / beta, rr + running_mean / beta, safe, safe, beta=beta,
                       delta=0.0, loss_type="bco_pair")
    a, c = beta * (pc - rc), beta * (pr - rr)
    expected = (-torch.nn.functional.logsigmoid(a - running_mean)
                - torch.nn.functional.logsigmoid(-(c - running_mean))).mean()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
