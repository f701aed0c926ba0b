"""A script written the way Liger-Kernel's own tests use LigerFusedLinearDPOLoss, run twice: as written,
and with only the constructor line changed to FusedLinearSafeDPOLoss (plus the two safety flags).
With delta = 0 and every response safe it must give Liger's loss, every element of Liger's output
tuple and the same gradients (float32, 1e-5). Liger runs on the CPU with compiled=False."""

from __future__ import annotations

import pytest
import torch

liger_dpo = pytest.importorskip("liger_kernel.chunked_loss.dpo_loss")

SCRIPT = '''
import torch
from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOLoss
from safedpo_kernels import FusedLinearSafeDPOLoss, FusedLinearDPOLoss


class LigerLMHeadDPO(torch.nn.Module):
    def __init__(self, H, V, dtype, bias=False, ref_bias=False, compute_nll_loss=False, ignore_index=-100,
                 beta=0.1, average_log_prob=False, loss_type="sigmoid", label_smoothing=0.0):
        super().__init__()
        self.lin = torch.nn.Linear(in_features=H, out_features=V, bias=bias, dtype=dtype)
        self.ref_lin = torch.nn.Linear(in_features=H, out_features=V, bias=ref_bias, dtype=dtype)
        self.dpo_loss = @CONSTRUCTOR@

    def forward(self, x, ref_x, y):
        return self.dpo_loss(self.lin.weight, x, y, self.lin.bias, ref_x, self.ref_lin.weight, self.ref_lin.bias@FLAGS@)
'''
LIGER_ARGS = ("ignore_index=ignore_index, beta=beta, use_ref_model=True, compute_nll_loss=compute_nll_loss, "
              "average_log_prob=average_log_prob, loss_type=loss_type, label_smoothing=label_smoothing, "
              "compiled=False")
VARIANTS = {
    "liger": (f"LigerFusedLinearDPOLoss({LIGER_ARGS})", ""),
    "safedpo": (f"FusedLinearSafeDPOLoss({LIGER_ARGS}, delta=0.0)",
                ", chosen_unsafe=self.chosen_unsafe, rejected_unsafe=self.rejected_unsafe"),
    "dpo": (f"FusedLinearDPOLoss({LIGER_ARGS})", ""),
}


def _module_class(variant: str):
    constructor, flags = VARIANTS[variant]
    namespace: dict = {}
    exec(SCRIPT.replace("@CONSTRUCTOR@", constructor).replace("@FLAGS@", flags), namespace)  # noqa: S102
    return namespace["LigerLMHeadDPO"]


def _run(variant, weights, x, ref_x, y, safe, **kwargs):
    module = _module_class(variant)(**kwargs)
    module.chosen_unsafe = module.rejected_unsafe = safe
    with torch.no_grad():
        for name, value in weights.items():
            module.get_parameter(name).copy_(value)
    x = x.detach().clone().requires_grad_()
    loss, aux = module(x, ref_x, y)
    loss.backward()
    grads = [x.grad] + [p.grad for _, p in sorted(module.lin.named_parameters())]
    return loss, aux, grads


SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3}
# The full option grid (bias, average_log_prob, compute_nll_loss) for sigmoid; every other Liger loss
# type with the defaults.
CASES = [("sigmoid", bias, avg, nll) for bias in (False, True) for avg in (False, True) for nll in (False, True)]
CASES += [(t, False, False, False) for t in sorted(liger_dpo.LigerFusedLinearDPOLoss._SUPPORTED_LOSS_TYPES)
          if t != "sigmoid"]


@pytest.mark.parametrize("loss_type,bias,average_log_prob,compute_nll_loss", CASES)
def test_liger_script_with_one_line_changed_gives_liger_outputs(seed, loss_type, bias, average_log_prob,
                                                                 compute_nll_loss):
    label_smoothing = SMOOTHING.get(loss_type, 0.0)
    b, t, h, v = 3, 11, 16, 37
    kwargs = dict(H=h, V=v, dtype=torch.float32, bias=bias, ref_bias=bias, compute_nll_loss=compute_nll_loss,
                  beta=0.2, average_log_prob=average_log_prob, loss_type=loss_type,
                  label_smoothing=label_smoothing)
    weights = {"lin.weight": torch.randn(v, h) / h**0.5, "ref_lin.weight": torch.randn(v, h) / h**0.5}
    if bias:
        weights.update({"lin.bias": torch.randn(v), "ref_lin.bias": torch.randn(v)})
    x = torch.randn(2 * b, t, h)
    ref_x = x + 0.1 * torch.randn_like(x)
    y = torch.randint(0, v, (2 * b, t))
    for i in range(2 * b):  # a prompt and some right padding ignored, never a whole row
        y[i, : int(torch.randint(1, 4, ()))] = -100
        y[i, t - int(torch.randint(0, 3, ())):] = -100
    safe = torch.zeros(b, dtype=torch.bool)
    loss_l, aux_l, grads_l = _run("liger", weights, x, ref_x, y, safe, **kwargs)
    for variant in ("safedpo", "dpo"):
        loss, aux, grads = _run(variant, weights, x, ref_x, y, safe, **kwargs)
        torch.testing.assert_close(loss, loss_l, rtol=1e-5, atol=1e-5)
        assert len(aux) == len(aux_l) == 7
        names = ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll_loss",
                 "chosen_rewards", "rejected_rewards")
        for name, ours, theirs in zip(names, aux, aux_l):
            assert ours.shape == theirs.shape, name
            torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-5, msg=name)
        for ours, theirs in zip(grads, grads_l):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_reference_free_equals_liger_use_ref_model_false(seed):
    b, t, h, v = 2, 9, 8, 29
    w = torch.randn(v, h) / h**0.5
    x = torch.randn(2 * b, t, h)
    y = torch.randint(0, v, (2 * b, t))
    y[:, :2] = -100
    from safedpo_kernels import FusedLinearSafeDPOLoss

    liger = liger_dpo.LigerFusedLinearDPOLoss(beta=0.3, use_ref_model=False, compiled=False)
    ours = FusedLinearSafeDPOLoss(beta=0.3, use_ref_model=False, compiled=False, delta=0.0)
    safe = torch.zeros(b, dtype=torch.bool)
    loss_l, aux_l = liger(w, x, y)
    loss, aux = ours(w, x, y, chosen_unsafe=safe, rejected_unsafe=safe)
    torch.testing.assert_close(loss, loss_l, rtol=1e-5, atol=1e-5)
    for ours_t, theirs in zip(aux, aux_l):
        torch.testing.assert_close(ours_t.detach(), theirs.detach(), rtol=1e-5, atol=1e-5)
