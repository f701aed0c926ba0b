"""SafeDPO on TRL's ``DPOTrainer``: same datasets, config, logging and callbacks, SafeDPO loss, no logits.

Install with ``pip install safedpo-kernels[trl]``. Usage (see docs/integrations.md)::

    pairs, _ = load_pairs("PKU-Alignment/PKU-SafeRLHF-30K")       # prompt, chosen, rejected + unsafe flags
    config = SafeDPOConfig(output_dir="out", beta=0.1, delta=10.0, precompute_ref_log_probs=True)
    trainer = SafeDPOTrainer(model, args=config, train_dataset=pairs, processing_class=tokenizer)
    trainer.train()

What changes with respect to ``DPOTrainer``:

* the dataset must carry ``chosen_unsafe`` / ``rejected_unsafe`` (bool, 1 = unsafe) next to TRL's
  ``prompt`` / ``chosen`` / ``rejected``, with ``chosen`` the **helpfulness** winner; they travel
  through TRL's tokenization and collator to the loss, which applies T(D) (keep / swap / drop) and
  the safety margin ``delta`` (paper Eq. 12);
* ``compute_loss`` and ``compute_ref_log_probs`` (used by ``precompute_ref_log_probs=True``) score
  the completion tokens with :func:`safedpo_kernels.linear_logprobs` on the last hidden states, which
  are captured from the model's root forward run with ``logits_to_keep=1`` (DDP-safe);
* the reference is either precomputed (``precompute_ref_log_probs=True``, the reference model is
  then not kept) or a live frozen ``ref_model``;
* logged metrics: TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
  ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``num_tokens`` (means over the pairs kept
  by T(D)) plus ``safety/safe_vs_unsafe_frac``, ``pairs/kept``, ``pairs/swapped``, ``pairs/dropped``.
  TRL's ``entropy``, ``logits/*`` and ``mean_token_accuracy`` need full-vocabulary statistics and are
  not logged.

Only TRL's default sigmoid loss on summed log-probs maps onto SafeDPO: other ``loss_type``,
``ld_alpha``, ``use_weighting``, ``f_divergence_type``, ``label_smoothing``, vision datasets and
PEFT models raise instead of being silently ignored. FSDP2 / ZeRO-3: see ``integrations.hf``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

try:
    import trl as _trl
    from trl import DPOConfig, DPOTrainer
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "safedpo_kernels.integrations.trl needs TRL (and accelerate, datasets): "
        "pip install safedpo-kernels[trl]"
    ) from exc

import torch
from torch import nn

from safedpo_kernels._checks import IMPLS, check_beta_delta, check_choice
from safedpo_kernels.integrations._common import (
    LossOnlyPredictionMixin,
    batch_reference_logps,
    gather_mean,
    model_sequence_logps,
    safedpo_from_logps,
)

#: The TRL version these overrides were written and tested against (its DPOTrainer extension points:
#: ``compute_loss``, ``compute_ref_log_probs``, ``_set_signature_columns_if_needed``, the
#: ``completion_mask`` collator).
TESTED_TRL = "1.16.0"
FLAG_COLUMNS = ("chosen_unsafe", "rejected_unsafe")
_IGNORE = -100  # TRL marks non-completion tokens with -100


def _trl_version() -> tuple[int, ...]:
    parts = []
    for p in _trl.__version__.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


if _trl_version() < (1, 16):  # pragma: no cover
    raise ImportError(
        f"safedpo_kernels.integrations.trl needs trl>=1.16 (the DPOTrainer extension points it overrides), "
        f"found {_trl.__version__}: pip install -U 'safedpo-kernels[trl]'"
    )


@dataclass
class SafeDPOConfig(DPOConfig):
    """TRL's ``DPOConfig`` plus the SafeDPO options.

    delta: safety margin (logit units, >= 0) on safe-vs-unsafe pairs; ``beta`` is TRL's.
    average_log_prob: mean instead of sum of completion token log-probs. impl: "auto" | "torch" |
    "triton" for :func:`safedpo_kernels.linear_logprobs`.
    """

    delta: float = field(default=10.0, metadata={"help": "SafeDPO safety margin Delta (logit units, >= 0)."})
    average_log_prob: bool = field(default=False, metadata={"help": "Mean instead of sum of token log-probs."})
    impl: str = field(default="auto", metadata={"help": "linear_logprobs implementation: auto, torch, triton."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_beta_delta(self.beta, self.delta)
        check_choice("impl", self.impl, IMPLS)
        unsupported = {
            "loss_type": (self.loss_type, ["sigmoid"]),
            "ld_alpha": (self.ld_alpha, None),
            "use_weighting": (self.use_weighting, False),
            "f_divergence_type": (self.f_divergence_type, "reverse_kl"),
            "label_smoothing": (self.label_smoothing, 0.0),
        }
        for name, (value, expected) in unsupported.items():
            if value != expected:
                raise ValueError(f"{name}: SafeDPO supports only {expected!r}, got {value!r}")
        if self.loss_weights not in (None, [1.0]):
            raise ValueError(f"loss_weights: SafeDPO supports only None, got {self.loss_weights!r}")


class _WithSafetyFlags:
    """Wraps TRL's preference collator to also return ``chosen_unsafe`` / ``rejected_unsafe`` (B,) bool."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        for col in FLAG_COLUMNS:
            if col in examples[0]:
                batch[col] = torch.tensor([bool(e[col]) for e in examples], dtype=torch.bool)
        return batch


class SafeDPOTrainer(LossOnlyPredictionMixin, DPOTrainer):
    """TRL ``DPOTrainer`` that trains SafeDPO and never materializes the logits.

    Arguments are those of ``trl.DPOTrainer``; ``args`` must be a :class:`SafeDPOConfig` and
    ``train_dataset`` / ``eval_dataset`` must have ``chosen_unsafe`` and ``rejected_unsafe`` columns
    (``safedpo_kernels.data.load_pairs`` makes them from PKU-SafeRLHF). With
    ``precompute_ref_log_probs=False`` pass ``ref_model`` (a frozen copy of the policy) unless the
    policy can be reloaded from ``model.config.name_or_path``, as TRL does.
    """

    _tag_names = ["trl", "dpo", "safedpo"]
    _name = "SafeDPO"

    def __init__(self, model: Any, ref_model: nn.Module | None = None, args: SafeDPOConfig | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None, **kwargs: Any) -> None:
        if args is None:
            args = SafeDPOConfig(output_dir="safedpo-output")
        if not isinstance(args, SafeDPOConfig):
            raise TypeError(f"args: expected safedpo_kernels.integrations.trl.SafeDPOConfig, got {type(args).__name__}")
        if kwargs.get("peft_config") is not None or hasattr(model, "peft_config"):
            raise NotImplementedError("PEFT models are not supported by the SafeDPO TRL integration yet")
        for name, ds in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            _check_flag_columns(name, ds)
        super().__init__(model, ref_model=ref_model, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, **kwargs)
        if self._is_vision_dataset:
            raise NotImplementedError("vision datasets are not supported by the SafeDPO TRL integration")
        self.data_collator = _WithSafetyFlags(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for col in FLAG_COLUMNS:
            if col not in self._signature_columns:
                self._signature_columns.append(col)

    def _labels(self, inputs: dict[str, Any]) -> torch.Tensor:
        return inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, _IGNORE)

    def _sequence_logps(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        return model_sequence_logps(model, inputs, self._labels(inputs), ignore_index=_IGNORE,
                                    average=self.args.average_log_prob, impl=self.args.impl)

    @torch.no_grad()
    def compute_ref_log_probs(self, model: nn.Module, inputs: dict[str, Any]):
        """Reference ``(chosen, rejected)`` (B,) log-probs of one padded batch with the fused path.

        TRL calls this for ``precompute_ref_log_probs=True``; ``model`` is the reference (or the
        initial policy)."""
        was_training = model.training
        model.eval()
        try:
            seq = self._sequence_logps(model, inputs)
        finally:
            model.train(was_training)
        return seq.chunk(2, dim=0)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        """SafeDPO loss of one TRL preference batch (chosen rows first) plus the metrics."""
        mode = "train" if self.model.training else "eval"
        policy = self._sequence_logps(model, inputs)
        ref = batch_reference_logps(inputs) if self.precompute_ref_logps else None
        if ref is None:
            if self.ref_model is None:
                raise ValueError(
                    "ref_model: no reference model and no precomputed reference log-probs in the batch; pass "
                    "ref_model=... or set precompute_ref_log_probs=True"
                )
            ref = self.compute_ref_log_probs(self.ref_model, inputs)
        loss, metrics = safedpo_from_logps(policy, ref[0], ref[1], inputs, beta=self.beta, delta=self.args.delta)
        # TRL's own metric store: DPOTrainer.log averages it and adds the "eval_" prefix.
        names = sorted(k for k in metrics if k != "loss")  # Trainer logs the loss itself
        values = gather_mean(self.accelerator)(torch.stack([metrics[k].float() for k in names]))
        for name, value in zip(names, values.tolist()):
            self._metrics[mode][name].append(value)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if return_outputs:
            b = policy.shape[0] // 2
            return loss, {"chosen_logps": policy[:b].detach(), "rejected_logps": policy[b:].detach()}
        return loss


def _check_flag_columns(name: str, dataset: Any) -> None:
    if dataset is None:
        return
    datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
    for ds in datasets:
        cols = getattr(ds, "column_names", None)
        if cols is None:
            first = next(iter(ds))
            cols = list(first)
        missing = [c for c in FLAG_COLUMNS if c not in cols]
        if missing:
            raise ValueError(
                f"{name}: missing unsafe-flag columns {missing} (bool, 1 = unsafe response); "
                "load PKU-SafeRLHF-style data with safedpo_kernels.data.load_pairs, which adds them"
            )
