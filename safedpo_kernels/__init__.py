"""safedpo-kernels: fused, exact and memory-lean SafeDPO training losses.

Public API (see README.md and docs/losses.md):
    linear_logprobs          per-token log-probs of a linear head, logits never materialized
    safedpo_loss, dpo_loss   SafeDPO / SafeDAA (T(D) + safety margin) and plain DPO-family losses on
                             sequence log-probs, every loss type in LOSS_TYPES
    count_kept_pairs         kept-pair count of a batch (the normalizer for exact accumulation)
    count_nll_tokens         T(D)-winner token count (the NLL term's normalizer)
    safety_transform         T(D) as keep / swap / safe-vs-unsafe masks
    FusedLinearSafeDPOLoss   drop-in for Liger's LigerFusedLinearDPOLoss: hidden states + lm_head weight
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
from safedpo_kernels.losses import (
    AVERAGED_LOSS_TYPES,
    LABEL_SMOOTHING_LOSS_TYPES,
    LOSS_TYPES,
    count_kept_pairs,
    count_nll_tokens,
    dpo_loss,
    safedpo_loss,
    safety_transform,
)

__version__ = "0.1.0"

__all__ = [
    "AVERAGED_LOSS_TYPES",
    "FusedLinearDPOLoss",
    "FusedLinearSafeDPOLoss",
    "LABEL_SMOOTHING_LOSS_TYPES",
    "LOSS_TYPES",
    "count_kept_pairs",
    "count_nll_tokens",
    "dpo_loss",
    "linear_logprobs",
    "packed_sequence_logps",
    "reference",
    "safedpo_loss",
    "safety_transform",
    "sequence_logps",
    "__version__",
]
