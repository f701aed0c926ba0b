"""SafeDPO with ``transformers.Trainer``: a Trainer subclass whose loss never builds the logits.

Usage (see docs/integrations.md)::

    tok_ds, _ = tokenize_pairs(pairs, tokenizer, max_length=512)
    tok_ds = add_reference_logps(tok_ds, ref_model, PaddedPairCollator(tokenizer.pad_token_id))  # optional
    trainer = SafeDPOTrainer(model, SafeDPOConfig(output_dir="out", beta=0.1, delta=10.0),
                             train_dataset=tok_ds, processing_class=tokenizer)  # or ref_model=ref_model
    trainer.train()

Batches are those of ``safedpo_kernels.data.PaddedPairCollator``: ``input_ids`` / ``attention_mask``
/ ``labels`` (2B, T) with the B chosen rows first, ``chosen_unsafe`` / ``rejected_unsafe`` (B,) and,
when the dataset carries them, ``ref_chosen_logps`` / ``ref_rejected_logps`` (B,). The policy runs
through its root forward with ``logits_to_keep=1`` (DDP-safe), the last hidden states are captured
and ``linear_logprobs`` scores the labels against ``lm_head.weight`` chunk by chunk.

Logged per step (means over the pairs kept by T(D), averaged over processes and logging steps):
``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen``, ``logps/rejected``, ``safety/safe_vs_unsafe_frac``, ``pairs/kept``,
``pairs/swapped``, ``pairs/dropped`` (``eval_``-prefixed in evaluation).

Sharded training: DDP works as is. With FSDP2 or DeepSpeed ZeRO-3 the lm_head weight is sharded
outside the root's forward and the loss raises (see ``integrations.model``); use the FSDP recipe
or :class:`~safedpo_kernels.integrations.model.SequenceLogpsModel` as the root module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import Trainer, TrainingArguments

from safedpo_kernels._checks import IMPLS, check_beta_delta, check_choice
from safedpo_kernels.integrations._common import (
    LossOnlyPredictionMixin,
    MetricsBuffer,
    batch_reference_logps,
    gather_mean,
    model_sequence_logps,
    safedpo_from_logps,
)
from safedpo_kernels.integrations.precompute import reference_sequence_logps

#: Columns of ``safedpo_kernels.data.tokenize_pairs`` that PaddedPairCollator reads (kept when
#: ``remove_unused_columns=True``).
PAIR_COLUMNS = (
    "chosen_input_ids", "chosen_labels", "chosen_attention_mask",
    "rejected_input_ids", "rejected_labels", "rejected_attention_mask",
    "chosen_unsafe", "rejected_unsafe", "ref_chosen_logps", "ref_rejected_logps",
)


@dataclass
class SafeDPOConfig(TrainingArguments):
    """``TrainingArguments`` plus the SafeDPO loss options.

    beta: KL strength (> 0). delta: safety margin in logit units (>= 0), applied to safe-vs-unsafe
    pairs. average_log_prob: mean instead of sum of token log-probs per response. impl: "auto" |
    "torch" | "triton" for :func:`safedpo_kernels.linear_logprobs`. ignore_index: label of untrained
    tokens (must match the collator's).
    """

    beta: float = field(default=0.1, metadata={"help": "SafeDPO/DPO beta (KL strength), > 0."})
    delta: float = field(default=10.0, metadata={"help": "Safety margin Delta (logit units, >= 0)."})
    average_log_prob: bool = field(default=False, metadata={"help": "Mean instead of sum of token log-probs."})
    impl: str = field(default="auto", metadata={"help": "linear_logprobs implementation: auto, torch, triton."})
    ignore_index: int = field(default=-100, metadata={"help": "Label id of prompt and padding tokens."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_beta_delta(self.beta, self.delta)
        check_choice("impl", self.impl, IMPLS)


class SafeDPOTrainer(LossOnlyPredictionMixin, Trainer):
    """``transformers.Trainer`` that trains a causal LM with SafeDPO on PaddedPairCollator batches.

    Args:
        model: the policy, a transformers causal LM (``logits_to_keep`` in its forward).
        args: a :class:`SafeDPOConfig` (default: output_dir "safedpo-output").
        ref_model: frozen reference LM. Omit it when the dataset has ``ref_chosen_logps`` /
            ``ref_rejected_logps`` columns (see :func:`add_reference_logps`).
        data_collator: default ``PaddedPairCollator(pad_token_id, ignore_index)`` with the pad id of
            ``processing_class`` (or of ``model.config``).
        Other arguments are those of ``transformers.Trainer``.
    """

    # compute_loss returns a per-micro-batch mean, so Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module,
        args: SafeDPOConfig | None = None,
        *,
        ref_model: nn.Module | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = SafeDPOConfig(output_dir="safedpo-output")
        if not isinstance(args, SafeDPOConfig):
            raise TypeError(f"args: expected a SafeDPOConfig, got {type(args).__name__}")
        if ref_model is not None and ref_model is model:
            raise ValueError("ref_model: expected a separate frozen copy of the policy, got the policy itself")
        if data_collator is None:
            data_collator = _default_collator(model, processing_class, args.ignore_index)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        # The loss is not normalized by num_items_in_batch (transformers 4.x reads this flag instead of
        # loss_is_scaled_for_ga), and no token count is needed.
        self.model_accepts_loss_kwargs = False
        self.ref_model = None
        if ref_model is not None:
            ref_model.requires_grad_(False)
            ref_model.eval()
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self._safedpo_metrics = MetricsBuffer()

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = list(PAIR_COLUMNS)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        """SafeDPO loss of one PaddedPairCollator batch; logs the metrics. ``num_items_in_batch`` is unused:
        the loss is a mean over the kept pairs of the micro-batch (see ``loss_is_scaled_for_ga``)."""
        a = self.args
        policy = model_sequence_logps(model, inputs, inputs["labels"], ignore_index=a.ignore_index,
                                      average=a.average_log_prob, impl=a.impl)
        ref = batch_reference_logps(inputs)
        if ref is None:
            if self.ref_model is None:
                raise ValueError(
                    "inputs: no ref_chosen_logps / ref_rejected_logps in the batch and no ref_model; pass "
                    "ref_model=... or add the columns with safedpo_kernels.integrations.add_reference_logps"
                )
            ref = reference_sequence_logps(self.ref_model, inputs, ignore_index=a.ignore_index,
                                           average_log_prob=a.average_log_prob, impl=a.impl)
        loss, metrics = safedpo_from_logps(policy, ref[0], ref[1], inputs, beta=a.beta, delta=a.delta)
        mode = "train" if model.training else "eval"
        # Trainer logs the loss itself ("loss" / "eval_loss").
        logged = {k: v for k, v in metrics.items() if k != "loss"}
        self._safedpo_metrics.add(mode, logged, gather_mean(self.accelerator))
        if return_outputs:
            b = policy.shape[0] // 2
            return loss, {"chosen_logps": policy[:b].detach(), "rejected_logps": policy[b:].detach()}
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the SafeDPO metrics accumulated since the last log (``eval_``-prefixed in evaluation)."""
        if any(k.startswith("eval_") for k in logs):
            logs.update({f"eval_{k}": v for k, v in self._safedpo_metrics.pop("eval").items()})
        else:
            logs.update(self._safedpo_metrics.pop("train"))
        super().log(logs, start_time)


def _default_collator(model: nn.Module, processing_class: Any, ignore_index: int):
    from safedpo_kernels.data import PaddedPairCollator

    pad = getattr(processing_class, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if pad is None:
        raise ValueError(
            "processing_class: expected a tokenizer with a pad_token_id (or model.config.pad_token_id) to build "
            "the default PaddedPairCollator; or pass data_collator=PaddedPairCollator(pad_token_id)"
        )
    return PaddedPairCollator(int(pad), ignore_index=ignore_index)
