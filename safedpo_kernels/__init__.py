"""safedpo-kernels: fused, exact and memory-lean SafeDPO training losses.

Public API (see README.md):
    linear_logprobs          per-token log-probs of a linear head, logits never materialized
    safedpo_loss, dpo_loss   SafeDPO (T(D) + safety margin) and plain DPO on sequence log-probs
    FusedLinearSafeDPOLoss   Liger-style module: hidden states + lm_head weight -> (loss, metrics)
    FusedLinearDPOLoss       the same for plain DPO
    sequence_logps, packed_sequence_logps   token -> sequence log-probs (padded / packed layouts)
    reference                eager PyTorch versions that materialize logits (tests, benchmarks)
"""

from safedpo_kernels import reference
from safedpo_kernels.fused import (
    FusedLinearDPOLoss,
    FusedLinearSafeDPOLoss,
    packed_sequence_logps,
    sequence_logps,
)
from safedpo_kernels.logprobs import linear_logprobs
from safedpo_kernels.losses import dpo_loss, safedpo_loss, safety_transform

__version__ = "0.1.0"

__all__ = [
    "FusedLinearDPOLoss",
    "FusedLinearSafeDPOLoss",
    "dpo_loss",
    "linear_logprobs",
    "packed_sequence_logps",
    "reference",
    "safedpo_loss",
    "safety_transform",
    "sequence_logps",
    "__version__",
]
