"""Triton kernels for per-token log-probs of a linear head (no autograd here; see triton_logprobs).

* ``forward_logprobs(hidden, weight, labels, bias)`` -> (logp, lse, one_minus_p): online LSE over
  vocabulary blocks; also the forward-only entry for reference models.
* ``backward_logprobs(grad_logp, hidden, weight, bias, labels, lse, one_minus_p, needs=...)`` -> (dh, dw, db).
* ``config``: the block-size table (one default per architecture, opt-in autotuning).
"""

from safedpo_kernels.kernels.backward import backward_logprobs, filter_eps
from safedpo_kernels.kernels.common import INTERPRETING
from safedpo_kernels.kernels.forward import forward_logprobs

__all__ = ["INTERPRETING", "backward_logprobs", "filter_eps", "forward_logprobs"]
