"""SafeDPO with a plain ``transformers.Trainer``: :class:`SafeDPOHFTrainer` / :class:`SafeDPOHFConfig`.

Most users want the TRL trainer (:class:`safedpo_kernels.integrations.SafeDPOTrainer`, TRL's
datasets and tokenization); this one is for ``transformers.Trainer`` code bases and pre-tokenized
data. Usage (see docs/integrations.md)::

    tok_ds, _ = tokenize_pairs(pairs, tokenizer, max_length=512)   # safe-rlhf / chat template
    tok_ds = add_reference_logps(tok_ds, ref_model, PaddedPairCollator(tokenizer.pad_token_id))  # optional
    trainer = SafeDPOHFTrainer(model, SafeDPOHFConfig(output_dir="out", beta=0.1, delta=10.0),
                               train_dataset=tok_ds, processing_class=tokenizer)  # or ref_model=ref_model
    trainer.train()

Batches are those of ``safedpo_kernels.data.PaddedPairCollator`` (or ``PackedPairCollator``):
``input_ids`` / ``attention_mask`` / ``labels`` (2B, T) with the B chosen rows first,
``chosen_unsafe`` / ``rejected_unsafe`` (B,) and, when the dataset carries them,
``ref_chosen_logps`` / ``ref_rejected_logps`` (B,). The policy runs through its root forward with
``logits_to_keep=1`` (DDP-safe), the last hidden states are captured and ``linear_logprobs`` scores
the labels against the output head (its logit transform included) chunk by chunk.

Reference, in order: the batch's precomputed columns; ``ref_model``; for a PEFT policy the policy
with its adapters disabled; ``reference_free=True`` (reference log-probs 0). Checked at construction.

Loss normalization: the loss of an optimizer step is the mean over the pairs T(D) keeps in *all*
its micro-batches on *all* ranks (the Trainer's ``num_items_in_batch`` mechanism, counting kept
pairs), so gradient accumulation and data parallelism do not change the update.

Logged per step (means over the pairs kept by T(D), averaged over processes and logging steps):
``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen``, ``logps/rejected``, ``safety/safe_vs_unsafe_frac``, ``pairs/kept``,
``pairs/swapped``, ``pairs/dropped`` (and ``nll_loss`` with ``rpo_alpha``; ``eval_``-prefixed in
evaluation).

Sharded training: DDP works as is. With FSDP2 or DeepSpeed ZeRO-3 the lm_head weight is sharded
outside the root's forward and the loss raises (see ``integrations.model``); use the FSDP recipe
or :class:`~safedpo_kernels.integrations.model.SequenceLogpsModel` as the root module.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from safedpo_kernels.integrations._common import (
    MetricsBuffer,
    ObjectiveOptions,
    SafeDPOTrainerMixin,
    WindowCounts,
    batch_flags,
    batch_reference_logps,
    check_columns,
    check_model_head,
    gather_mean,
    is_peft_model,
    label_token_counts,
    model_sequence_logps,
    peft_reference,
    safedpo_objective,
)
from safedpo_kernels.integrations.precompute import reference_sequence_logps

#: Columns of ``safedpo_kernels.data.tokenize_pairs`` that PaddedPairCollator reads (kept when
#: ``remove_unused_columns=True``).
PAIR_COLUMNS = (
    "chosen_input_ids", "chosen_labels", "chosen_attention_mask",
    "rejected_input_ids", "rejected_labels", "rejected_attention_mask",
    "chosen_unsafe", "rejected_unsafe", "ref_chosen_logps", "ref_rejected_logps",
)
TOKENIZED_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
FLAG_COLUMNS = ("chosen_unsafe", "rejected_unsafe")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class SafeDPOHFConfig(TrainingArguments):
    """``TrainingArguments`` plus the SafeDPO loss options, for :class:`SafeDPOHFTrainer`.

    (The TRL trainer, :class:`~safedpo_kernels.integrations.SafeDPOTrainer`, takes a ``trl.DPOConfig``.)

    beta: KL strength (> 0). delta: safety margin in logit units (>= 0), applied to safe-vs-unsafe
    pairs. loss_type: one of ``safedpo_kernels.LOSS_TYPES`` (T(D) and delta apply to each);
    label_smoothing, discopop_tau: as in :func:`safedpo_kernels.safedpo_loss`. rpo_alpha: weight of
    the NLL term on the T(D) winners (RPO), None or 0 = off. reference_free: reference log-probs 0.
    average_log_prob: mean instead of sum of token log-probs per response (``ipo`` and
    ``sigmoid_norm`` always use means). impl: "auto" | "torch" | "triton" for
    :func:`safedpo_kernels.linear_logprobs`. ignore_index: label of untrained tokens (the collator's).
    """

    beta: float = field(default=0.1, metadata={"help": "SafeDPO/DPO beta (KL strength), > 0."})
    delta: float = field(default=10.0, metadata={"help": "Safety margin Delta (logit units, >= 0)."})
    loss_type: str = field(default="sigmoid", metadata={"help": "Preference loss (safedpo_kernels.LOSS_TYPES)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO / robust / exo_pair smoothing."})
    discopop_tau: float = field(default=0.05, metadata={"help": "DiscoPOP temperature."})
    rpo_alpha: float | None = field(default=None, metadata={"help": "Weight of the NLL (RPO) term."})
    reference_free: bool = field(default=False, metadata={"help": "Reference log-probs taken as 0."})
    average_log_prob: bool = field(default=False, metadata={"help": "Mean instead of sum of token log-probs."})
    impl: str = field(default="auto", metadata={"help": "linear_logprobs implementation: auto, torch, triton."})
    ignore_index: int = field(default=-100, metadata={"help": "Label id of prompt and padding tokens."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.objective()  # validate now

    def objective(self) -> ObjectiveOptions:
        """The validated loss options."""
        return ObjectiveOptions(beta=self.beta, delta=self.delta, loss_types=(self.loss_type,),
                                label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau,
                                reference_free=self.reference_free, rpo_alpha=self.rpo_alpha,
                                average_log_prob=self.average_log_prob, impl=self.impl,
                                ignore_index=self.ignore_index)


class SafeDPOHFTrainer(SafeDPOTrainerMixin, Trainer):
    """``transformers.Trainer`` that trains a causal LM with SafeDPO on PaddedPairCollator batches.

    Args:
        model: the policy, a transformers causal LM (``logits_to_keep`` in its forward) or a
            ``peft.PeftModel`` of one (only the adapters train; the reference is then the policy with
            adapters disabled unless ``ref_model`` or precomputed columns are given).
        args: a :class:`SafeDPOHFConfig` (default: output_dir "safedpo-output").
        ref_model: frozen reference LM. Omit it when the dataset has ``ref_chosen_logps`` /
            ``ref_rejected_logps`` columns (:func:`add_reference_logps`), for a PEFT policy, or with
            ``reference_free=True``.
        data_collator: default ``PaddedPairCollator(pad_token_id, ignore_index)`` with the pad id of
            ``processing_class`` (or of ``model.config``).
        train_dataset / eval_dataset: pairs tokenized by ``safedpo_kernels.data.tokenize_pairs``
            (with the ``chosen_unsafe`` / ``rejected_unsafe`` flags).
        Other arguments are those of ``transformers.Trainer``.

    Raises at construction: TypeError for another config class (e.g. TRL's ``DPOConfig``: that is
    :class:`~safedpo_kernels.integrations.SafeDPOTrainer`'s) or a model without a supported head;
    ValueError for untokenized data, missing flag columns or no reference.
    """

    def __init__(
        self,
        model: nn.Module,
        args: SafeDPOHFConfig | None = None,
        *,
        ref_model: nn.Module | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = SafeDPOHFConfig(output_dir="safedpo-output")
        if not isinstance(args, SafeDPOHFConfig):
            raise TypeError(
                f"args: SafeDPOHFTrainer (transformers.Trainer) takes a SafeDPOHFConfig, got {_describe(args)}"
                + (". For TRL's DPOConfig use safedpo_kernels.integrations.SafeDPOTrainer (the TRL trainer)"
                   if _is_trl_config(args) else "")
            )
        if isinstance(model, str) or not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a transformers causal LM instance (nn.Module), got {_describe(model)}")
        self._objective = args.objective()
        check_model_head("model", model)
        if ref_model is not None:
            if ref_model is model:
                raise ValueError("ref_model: expected a separate frozen copy of the policy, got the policy itself")
            check_model_head("ref_model", ref_model)
        peft = is_peft_model(model)
        for name, ds in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            for columns in _dataset_columns(ds):
                _check_pair_columns(name, columns, needs_reference=not (
                    args.reference_free or ref_model is not None or peft))
        if peft and ref_model is None:
            _warn_if_trained_adapter(model)
        if data_collator is None:
            data_collator = _default_collator(model, processing_class, args.ignore_index)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        if not _trainer_reads_loss_is_scaled_for_ga():
            # Older transformers decide the accumulation scaling from these two attributes only (as TRL does).
            self.model_accepts_loss_kwargs = False
            self.compute_loss_func = "loss already scaled for gradient accumulation"
        self._ignore_index = self._objective.ignore_index
        self.ref_model = None
        if ref_model is not None:
            ref_model.requires_grad_(False)
            ref_model.eval()
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self._safedpo_metrics = MetricsBuffer()

    def _labels(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["labels"]

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = list(PAIR_COLUMNS)

    def _reference(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        o = self._objective
        if o.reference_free:
            return None
        ref = batch_reference_logps(inputs)
        if ref is not None:
            return ref
        if self.ref_model is not None:
            return reference_sequence_logps(self.ref_model, inputs, ignore_index=o.ignore_index, impl=o.impl)
        if is_peft_model(model):
            with torch.no_grad(), peft_reference(model):
                seq = model_sequence_logps(model, inputs, inputs["labels"], ignore_index=o.ignore_index, impl=o.impl)
            return seq.chunk(2)
        raise ValueError(
            "inputs: no ref_chosen_logps / ref_rejected_logps in the batch and no ref_model; pass "
            "ref_model=..., add the columns with safedpo_kernels.integrations.add_reference_logps, or set "
            "reference_free=True"
        )

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: WindowCounts | None = None):
        """SafeDPO loss of one batch; logs the metrics.

        ``num_items_in_batch``: the :class:`WindowCounts` of the optimizer step (the Trainer passes
        it); the loss is then this batch's share of the step's mean over kept pairs, times the number
        of processes. None: the mean over this batch's kept pairs (evaluation)."""
        if num_items_in_batch is not None and not isinstance(num_items_in_batch, WindowCounts):
            raise TypeError(f"num_items_in_batch: expected WindowCounts or None, got {_describe(num_items_in_batch)}")
        o = self._objective
        labels = inputs["labels"]
        policy = model_sequence_logps(model, inputs, labels, ignore_index=o.ignore_index, impl=o.impl)
        counts = label_token_counts(labels, inputs.get("cu_seqlens"), o.ignore_index)
        cu, ru = batch_flags(inputs)
        loss, metrics = safedpo_objective(policy, counts, self._reference(model, inputs), cu, ru, o,
                                          num_items_in_batch)
        loss = loss * self._loss_scale(num_items_in_batch)
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


def _trainer_reads_loss_is_scaled_for_ga() -> bool:
    import inspect

    return "loss_is_scaled_for_ga" in inspect.getsource(Trainer.training_step)


def _describe(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_trl_config(args: Any) -> bool:
    return any(c.__module__.startswith("trl") and c.__name__ == "DPOConfig" for c in type(args).__mro__)


def _dataset_columns(dataset: Any) -> list[list[str]]:
    """Column names of a dataset (each of a dict of datasets); [] for None or an unknown kind."""
    if dataset is None:
        return []
    datasets = list(dataset.values()) if isinstance(dataset, dict) else [dataset]
    out = []
    for ds in datasets:
        cols = getattr(ds, "column_names", None)
        if cols is None:
            try:
                first = ds[0]
            except Exception:  # noqa: BLE001 - an iterable dataset: checked at the first batch instead
                continue
            cols = list(first) if isinstance(first, dict) else None
        if cols is not None:
            out.append(list(cols))
    return out


def _check_pair_columns(name: str, columns: list[str], *, needs_reference: bool) -> None:
    missing = [c for c in TOKENIZED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"{name}: expected tokenized pairs (columns {list(TOKENIZED_COLUMNS)}), missing {missing} in {columns}; "
            "tokenize with safedpo_kernels.data.tokenize_pairs, or use the TRL trainer "
            "(safedpo_kernels.integrations.SafeDPOTrainer), which tokenizes prompt/chosen/rejected itself"
        )
    check_columns(name, columns, FLAG_COLUMNS, "unsafe-flag", "(bool, 1 = unsafe response); "
                  "load the data with safedpo_kernels.data.load_pairs, which adds them")
    if needs_reference and not all(c in columns for c in REF_COLUMNS):
        raise ValueError(
            f"{name}: no reference: the dataset has no {list(REF_COLUMNS)} columns and no ref_model was given; "
            "pass ref_model=..., add the columns with safedpo_kernels.integrations.add_reference_logps, use a "
            "PEFT model (reference = adapters disabled), or set reference_free=True"
        )


def _warn_if_trained_adapter(model: nn.Module) -> None:
    """The adapter-disabled base is the reference: say so when the adapter is not at its zero init."""
    for name, p in model.named_parameters():
        if "lora_B" in name and p.detach().abs().max().item() > 0:
            warnings.warn(
                "model: the PEFT adapter is not at its initialization (lora_B != 0), but the reference is the "
                "policy with adapters disabled (the base model); pass ref_model=... or precompute the reference "
                "with add_reference_logps if you want the adapter as loaded as reference",
                UserWarning, stacklevel=3,
            )
            return


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


_RENAMED = {"SafeDPOTrainer": "SafeDPOHFTrainer", "SafeDPOConfig": "SafeDPOHFConfig"}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        raise ImportError(
            f"safedpo_kernels.integrations.hf.{name} was renamed {_RENAMED[name]} (the transformers.Trainer "
            f"integration); safedpo_kernels.integrations.{name} is the TRL one"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
