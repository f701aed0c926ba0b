"""Triton kernels for per-token log-probs of a linear head (no autograd here; see triton_logprobs).

* ``forward_logprobs(hidden, weight, labels, bias, logit_scale=, softcap=)`` -> (logp, lse,
  one_minus_p): online LSE over vocabulary blocks; also the forward-only entry for reference models.
* ``backward_logprobs(grad_logp, hidden, weight, bias, labels, lse, one_minus_p, needs=...)`` -> (dh, dw, db).
* ``frozen_forward(...)``: frozen-head forward that also returns d logp / d hidden (frozen.py).
* ``KERNEL_VARIANTS`` / ``get_variant``: the selectable kernel variants (variants.py).
* ``config``: the block-size table; ``targets.compile_targets()``: every compiled specialization.
"""

from safedpo_kernels.kernels.backward import backward_logprobs, filter_eps
from safedpo_kernels.kernels.common import INTERPRETING
from safedpo_kernels.kernels.forward import finish_logprobs, forward_logprobs
from safedpo_kernels.kernels.frozen import frozen_forward
from safedpo_kernels.kernels.variants import KERNEL_VARIANTS, VARIANTS, KernelStats, KernelVariant, get_variant

__all__ = [
    "INTERPRETING",
    "KERNEL_VARIANTS",
    "VARIANTS",
    "KernelStats",
    "KernelVariant",
    "backward_logprobs",
    "filter_eps",
    "finish_logprobs",
    "forward_logprobs",
    "frozen_forward",
    "get_variant",
]
