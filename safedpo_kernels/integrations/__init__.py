"""Drop-in SafeDPO for the trainers people already use; none of them ever builds the logits.

* Trainers (imported lazily, so this module needs only torch):

  - :class:`SafeDPOTrainer` (TRL, ``pip install "safedpo-kernels[trl]"``): TRL's ``DPOTrainer`` with
    the SafeDPO loss; takes a plain ``trl.DPOConfig`` (or :class:`SafeDPOConfig`), TRL's datasets,
    ``peft_config``. Most users want this one.
  - :class:`SafeDPOHFTrainer` / :class:`SafeDPOHFConfig`: a plain ``transformers.Trainer`` on
    pre-tokenized pairs (``safedpo_kernels.data.tokenize_pairs``).

* Model helpers: :func:`output_head` / :func:`hidden_states_and_head_weight` (the lm_head weight,
  bias and logit transform: Gemma 2 soft-capping, Cohere / Granite scaling), :func:`verify_output_head`,
  :func:`forward_hidden_states`, :func:`causal_lm_sequence_logps`, :class:`SequenceLogpsModel`
  (FSDP2-safe root), and :func:`add_reference_logps` to precompute reference log-probs.
"""

from typing import Any

from safedpo_kernels.integrations.heads import OutputHead, output_head, verify_output_head
from safedpo_kernels.integrations.model import (
    HiddenStatesAndHead,
    SequenceLogpsModel,
    causal_lm_sequence_logps,
    forward_hidden_states,
    get_backbone,
    hidden_states_and_head_weight,
    unwrap_model,
)
from safedpo_kernels.integrations.precompute import add_reference_logps, reference_sequence_logps

#: Trainer classes, imported on first use (they need transformers / TRL).
_LAZY = {
    "SafeDPOTrainer": "safedpo_kernels.integrations.trl",
    "SafeDPOConfig": "safedpo_kernels.integrations.trl",
    "SafeDPOHFTrainer": "safedpo_kernels.integrations.hf",
    "SafeDPOHFConfig": "safedpo_kernels.integrations.hf",
}

__all__ = [
    "HiddenStatesAndHead",
    "OutputHead",
    "SafeDPOConfig",
    "SafeDPOHFConfig",
    "SafeDPOHFTrainer",
    "SafeDPOTrainer",
    "SequenceLogpsModel",
    "add_reference_logps",
    "causal_lm_sequence_logps",
    "forward_hidden_states",
    "get_backbone",
    "hidden_states_and_head_weight",
    "output_head",
    "reference_sequence_logps",
    "unwrap_model",
    "verify_output_head",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
