"""Drop-in SafeDPO for the trainers people already use; none of them ever builds the logits.

* ``safedpo_kernels.integrations`` (this module, torch only): the model helpers
  :func:`hidden_states_and_head_weight`, :func:`forward_hidden_states`, :func:`causal_lm_sequence_logps`,
  :class:`SequenceLogpsModel` (FSDP2-safe root), and :func:`add_reference_logps` to precompute the
  reference log-probs of a tokenized dataset.
* ``safedpo_kernels.integrations.hf``: ``SafeDPOTrainer`` / ``SafeDPOConfig`` for ``transformers.Trainer``.
* ``safedpo_kernels.integrations.trl``: ``SafeDPOTrainer`` / ``SafeDPOConfig`` on TRL's ``DPOTrainer``
  (``pip install safedpo-kernels[trl]``).
"""

from safedpo_kernels.integrations.model import (
    HiddenStatesAndHead,
    SequenceLogpsModel,
    causal_lm_sequence_logps,
    forward_hidden_states,
    get_backbone,
    hidden_states_and_head_weight,
    output_head,
    unwrap_model,
)
from safedpo_kernels.integrations.precompute import add_reference_logps, reference_sequence_logps

__all__ = [
    "HiddenStatesAndHead",
    "SequenceLogpsModel",
    "add_reference_logps",
    "causal_lm_sequence_logps",
    "forward_hidden_states",
    "get_backbone",
    "hidden_states_and_head_weight",
    "output_head",
    "reference_sequence_logps",
    "unwrap_model",
]
