"""What the Trainer and TRL integrations share: batch -> sequence log-probs -> SafeDPO objective + metrics,
the kept-pair count of an optimizer step, and the PEFT reference."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from safedpo_kernels._checks import IMPLS, check_beta_delta, check_choice, check_ignore_index
from safedpo_kernels.integrations.heads import output_head, strip_wrappers, unwrap_model
from safedpo_kernels.integrations.model import causal_lm_sequence_logps, forward_hidden_states
from safedpo_kernels.losses import (
    AVERAGED_LOSS_TYPES,
    LABEL_SMOOTHING_LOSS_TYPES,
    LOSS_TYPES,
    check_loss_options,
    count_kept_pairs,
    safedpo_loss,
    safety_transform,
)

#: Batch keys that are not model inputs (everything else in a batch is passed to the model's forward).
NON_MODEL_KEYS = frozenset(
    {"labels", "completion_mask", "chosen_unsafe", "rejected_unsafe", "ref_chosen_logps", "ref_rejected_logps",
     "cu_seqlens"}
)
#: The NLL (SFT / RPO) term's name in TRL's ``loss_type`` list.
NLL_LOSS_TYPE = "sft"


@dataclass(frozen=True)
class ObjectiveOptions:
    """The SafeDPO objective of a trainer, validated once at construction.

    ``loss_types`` / ``loss_weights``: the weighted sum of SafeDPO losses (any of
    ``safedpo_kernels.LOSS_TYPES``, T(D) and the margin ``delta`` applied to each) and ``"sft"``
    (TRL's name for the NLL term: the token-mean NLL of the T(D) winners); ``rpo_alpha`` adds
    ``rpo_alpha * NLL`` (RPO). ``label_smoothing`` goes to the loss types that read it (cDPO for
    "sigmoid", "robust", "exo_pair"). ``reference_free``: reference log-probs are 0.
    """

    beta: float = 0.1
    delta: float = 10.0
    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    reference_free: bool = False
    rpo_alpha: float | None = None
    average_log_prob: bool = False
    impl: str = "auto"
    ignore_index: int = -100

    def __post_init__(self) -> None:
        check_beta_delta(self.beta, self.delta)
        check_choice("impl", self.impl, IMPLS)
        object.__setattr__(self, "ignore_index", check_ignore_index("ignore_index", self.ignore_index))
        types = (self.loss_types,) if isinstance(self.loss_types, str) else tuple(self.loss_types)
        allowed = (*LOSS_TYPES, NLL_LOSS_TYPE)
        for t in types:
            if t not in allowed:
                raise ValueError(f"loss_type: expected one of {list(allowed)} (or a list of them), got {t!r}")
        weights = (1.0,) * len(types) if self.loss_weights is None else tuple(self.loss_weights)
        if len(weights) != len(types):
            raise ValueError(f"loss_weights: expected {len(types)} weights (one per loss_type), got {list(weights)}")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
                raise ValueError(f"loss_weights: expected finite numbers, got {list(weights)}")
        if not any(t != NLL_LOSS_TYPE and w != 0 for t, w in zip(types, weights)):
            raise ValueError(f"loss_type: {list(types)} with loss_weights {list(weights)} has no preference loss "
                             "with a nonzero weight; add e.g. 'sigmoid'")
        rpo = self.rpo_alpha
        if rpo is not None and (isinstance(rpo, bool) or not isinstance(rpo, numbers.Real)
                                or not math.isfinite(rpo) or rpo < 0):
            raise ValueError(f"rpo_alpha: expected None or a finite number >= 0, got {rpo!r}")
        if self.label_smoothing != 0 and not set(types) & set(LABEL_SMOOTHING_LOSS_TYPES):
            raise ValueError(f"label_smoothing: none of loss_type {list(types)} uses it (only "
                             f"{list(LABEL_SMOOTHING_LOSS_TYPES)} do), got {self.label_smoothing!r}; pass 0.0")
        for t in types:
            if t != NLL_LOSS_TYPE:
                check_loss_options(self.beta, t, self._smoothing(t), self.discopop_tau)
        object.__setattr__(self, "loss_types", types)
        object.__setattr__(self, "loss_weights", tuple(float(w) for w in weights))

    def _smoothing(self, loss_type: str) -> float:
        return self.label_smoothing if loss_type in LABEL_SMOOTHING_LOSS_TYPES else 0.0

    @property
    def nll_weight(self) -> float:
        """Total weight of the NLL term: ``rpo_alpha`` plus the weights of "sft" entries."""
        return float(self.rpo_alpha or 0.0) + sum(w for t, w in zip(self.loss_types, self.loss_weights)
                                                  if t == NLL_LOSS_TYPE)


class WindowCounts(NamedTuple):
    """Normalizers of one optimizer step, summed over its micro-batches and all data-parallel ranks:
    ``kept_pairs`` (pairs T(D) keeps) and ``winner_tokens`` (scored tokens of their T(D) winners,
    the NLL term's denominator). Passed by the Trainer to ``compute_loss`` as ``num_items_in_batch``."""

    kept_pairs: torch.Tensor
    winner_tokens: torch.Tensor


def label_token_counts(labels: torch.Tensor, cu_seqlens: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Scored tokens per sequence (rows,) long: padded HF labels (rows, T) (the first position is never a
    target), or one packed row (1, total) with ``cu_seqlens`` (S + 1,) -> (S,)."""
    scored = labels[:, 1:] != ignore_index
    if cu_seqlens is None:
        return scored.sum(-1)
    csum = torch.cat([scored.new_zeros(1, dtype=torch.long), scored.reshape(-1).long().cumsum(0)])
    ends = (cu_seqlens.to(labels.device).long() - 1).clamp(min=0)  # target t + 1 sits at position t
    return csum[ends[1:]] - csum[ends[:-1]]


def winner_token_count(counts: torch.Tensor, chosen_unsafe: torch.Tensor, rejected_unsafe: torch.Tensor) -> torch.Tensor:
    """Scored tokens of the T(D) winners of the kept pairs (0-dim long), from (2B,) per-row counts."""
    b = counts.shape[0] // 2
    t = safety_transform(chosen_unsafe.bool().to(counts.device), rejected_unsafe.bool().to(counts.device))
    winner = torch.where(t.swap, counts[b:], counts[:b])
    return torch.where(t.keep, winner, torch.zeros_like(winner)).sum()


def model_sequence_logps(
    model: nn.Module,
    batch: Mapping[str, Any],
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    average: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """(2B,) sequence log-probs of ``labels`` under ``model`` via its root forward (DDP-safe, no logits).

    ``batch`` holds ``input_ids`` (2B, T), ``attention_mask`` and any other model inputs (keys in
    :data:`NON_MODEL_KEYS` are not passed to the model), or a packed batch: ``input_ids`` /
    ``position_ids`` (1, total) and ``cu_seqlens`` (2B + 1,). The head's logit transform
    (:func:`output_head`) is applied.
    """
    kwargs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS and k not in ("input_ids", "attention_mask")}
    hidden = forward_hidden_states(model, batch["input_ids"], batch.get("attention_mask"), **kwargs)
    head = output_head(model)
    return causal_lm_sequence_logps(hidden, head.weight, labels, bias=head.bias, logit_scale=head.logit_scale,
                                    softcap=head.softcap, cu_seqlens=batch.get("cu_seqlens"),
                                    ignore_index=ignore_index, average=average, impl=impl)


def batch_reference_logps(batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Precomputed ``(ref_chosen_logps, ref_rejected_logps)`` (B,) from a batch, or None if absent."""
    rc, rr = batch.get("ref_chosen_logps"), batch.get("ref_rejected_logps")
    if rc is None and rr is None:
        return None
    if rc is None or rr is None:
        raise ValueError("batch: expected both ref_chosen_logps and ref_rejected_logps or neither")
    return rc, rr


def batch_flags(batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen_unsafe, rejected_unsafe)`` (B,) from a batch; ValueError naming the missing key."""
    for key in ("chosen_unsafe", "rejected_unsafe"):
        if key not in batch:
            raise ValueError(
                f"batch: expected a '{key}' (B,) bool tensor (1 = unsafe) next to the token ids; "
                "load the data with safedpo_kernels.data.load_pairs, which adds the unsafe flags"
            )
    return batch["chosen_unsafe"], batch["rejected_unsafe"]


def window_counts(batches: Sequence[Mapping[str, Any]], labels_of: Callable[[Mapping[str, Any]], torch.Tensor],
                  ignore_index: int, accelerator: Any, device: torch.device) -> WindowCounts:
    """:class:`WindowCounts` of the micro-batches of one optimizer step, summed over all processes."""
    kept = torch.zeros((), dtype=torch.long)
    tokens = torch.zeros((), dtype=torch.long)
    for batch in batches:
        cu, ru = batch_flags(batch)
        kept += count_kept_pairs(cu, ru).cpu()
        counts = label_token_counts(labels_of(batch), batch.get("cu_seqlens"), ignore_index)
        tokens += winner_token_count(counts, cu, ru).cpu()
    both = torch.stack([kept, tokens]).to(device)
    if accelerator is not None and accelerator.num_processes > 1:
        both = accelerator.gather(both.unsqueeze(0)).reshape(-1, 2).sum(0)
    return WindowCounts(both[0], both[1])


def safedpo_objective(
    policy_logps: torch.Tensor,
    token_counts: torch.Tensor,
    reference: tuple[torch.Tensor, torch.Tensor] | None,
    chosen_unsafe: torch.Tensor,
    rejected_unsafe: torch.Tensor,
    opts: ObjectiveOptions,
    counts: WindowCounts | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The trainers' loss and metrics from summed (2B,) policy log-probs (chosen rows first).

    ``token_counts`` (2B,) scored tokens per row; ``reference``: summed (B,) reference log-probs, or
    None with ``reference_free``. Scores are sums, or per-token means with ``average_log_prob`` and
    for the loss types TRL defines on means (``ipo``, ``sigmoid_norm``). Every preference loss is
    this call's sum over kept pairs divided by ``counts.kept_pairs`` (the optimizer step's count)
    when given, else by this call's kept pairs; the NLL term likewise by ``counts.winner_tokens``.
    Metrics are this call's (those of the first preference loss, plus ``nll_loss``).
    """
    if policy_logps.shape[0] % 2:
        raise ValueError(f"input_ids: expected 2B rows (B chosen then B rejected), got {policy_logps.shape[0]}")
    b = policy_logps.shape[0] // 2
    dev = policy_logps.device
    cu, ru = chosen_unsafe.to(dev), rejected_unsafe.to(dev)
    counts_long = token_counts.to(dev)
    per_token = counts_long.clamp(min=1).to(policy_logps.dtype)
    if opts.reference_free:
        ref = None
    elif reference is None:
        raise ValueError("reference: expected reference log-probs (precomputed or from a reference model)")
    else:
        ref = torch.cat([reference[0].to(dev), reference[1].to(dev)]).to(policy_logps.dtype)
    nll_weight = opts.nll_weight
    total = None
    metrics: dict[str, torch.Tensor] = {}
    for loss_type, weight in zip(opts.loss_types, opts.loss_weights):
        if loss_type == NLL_LOSS_TYPE or weight == 0:
            continue
        average = opts.average_log_prob or loss_type in AVERAGED_LOSS_TYPES
        pol = policy_logps / per_token if average else policy_logps
        r = None if ref is None else (ref / per_token if average else ref)
        nll_kwargs = {}
        if nll_weight and not metrics:  # the NLL term rides on the first preference loss: w * (L + a / w * NLL)
            nll_kwargs = dict(rpo_alpha=nll_weight / weight, chosen_token_counts=counts_long[:b],
                              rejected_token_counts=counts_long[b:], average_log_prob=average,
                              num_nll_tokens=None if counts is None else counts.winner_tokens.to(dev).clamp(min=1))
        loss, m = safedpo_loss(
            pol[:b], pol[b:], None if r is None else r[:b], None if r is None else r[b:], cu, ru,
            beta=opts.beta, delta=opts.delta, loss_type=loss_type, label_smoothing=opts._smoothing(loss_type),
            discopop_tau=opts.discopop_tau, return_metrics=True,
            num_kept_pairs=None if counts is None else counts.kept_pairs.to(dev).clamp(min=1), **nll_kwargs,
        )
        if not metrics:
            metrics = m
        total = weight * loss if total is None else total + weight * loss
    return total, metrics


@contextlib.contextmanager
def peft_reference(model: nn.Module) -> Iterator[None]:
    """The reference of a PEFT policy: its "ref" adapter when it has one (TRL's copy of a loaded
    adapter), else the policy with adapters disabled (the base model)."""
    peft_model = strip_wrappers(model)
    if "ref" in getattr(peft_model, "peft_config", {}):
        previous = peft_model.active_adapter
        peft_model.set_adapter("ref")
        try:
            yield
        finally:
            peft_model.set_adapter(previous)
    else:
        with peft_model.disable_adapter():
            yield


def is_peft_model(model: nn.Module) -> bool:
    """A ``peft.PeftModel`` (possibly inside DDP / accelerate wrappers)."""
    model = strip_wrappers(model)
    return hasattr(model, "peft_config") and callable(getattr(model, "disable_adapter", None))


def check_model_head(name: str, model: nn.Module) -> None:
    """Construction-time check of a policy / reference: a causal LM whose head the fused path supports
    and whose forward takes ``logits_to_keep``; errors name the argument."""
    from safedpo_kernels.integrations.model import _accepts

    try:
        output_head(model)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name}: {exc}") from exc
    lm = unwrap_model(model)
    if not _accepts(lm.forward, "logits_to_keep"):
        raise TypeError(
            f"{name}: {type(lm).__name__}.forward has no logits_to_keep argument, so its forward would build the "
            "full (rows, T, V) logits; the integrations need a transformers causal LM"
        )


def check_columns(name: str, columns: Sequence[str], required: Sequence[str], what: str, hint: str) -> None:
    """ValueError ``"{name}: missing {what} columns [...] {hint}"`` when a ``required`` column is not in ``columns``."""
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"{name}: missing {what} columns {missing} {hint}")


class MetricsBuffer:
    """Per-mode lists of metric values between two ``Trainer.log`` calls, averaged when logged.

    ``add(metrics, reduce)`` appends each 0-dim tensor after ``reduce`` (e.g. a cross-process mean);
    ``pop(mode)`` returns the means and clears the mode.
    """

    def __init__(self) -> None:
        self._values: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def add(self, mode: str, metrics: Mapping[str, torch.Tensor],
            reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        names = sorted(metrics)
        stacked = torch.stack([metrics[k].detach().float().reshape(()) for k in names])
        if reduce is not None:
            stacked = reduce(stacked)
        for name, value in zip(names, stacked.tolist()):
            self._values[mode][name].append(value)

    def pop(self, mode: str) -> dict[str, float]:
        out = {k: sum(v) / len(v) for k, v in self._values[mode].items() if v}
        self._values[mode].clear()
        return out


def gather_mean(accelerator: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A reduce function for :meth:`MetricsBuffer.add`: mean over processes (one all-gather per step)."""

    def reduce(stacked: torch.Tensor) -> torch.Tensor:
        gathered = accelerator.gather(stacked.to(accelerator.device).unsqueeze(0))
        return gathered.reshape(-1, stacked.numel()).mean(0).cpu()

    return reduce


class SafeDPOTrainerMixin:
    """Shared by both trainers (mixed in before ``transformers.Trainer`` / TRL's ``DPOTrainer``).

    * ``_get_num_items_in_batch``: the Trainer calls it once per optimizer step with the step's
      micro-batches (``get_batch_samples``), as it does for token counts; here it returns
      :class:`WindowCounts` (kept pairs and winner tokens over the micro-batches and all ranks),
      which the Trainer passes to ``compute_loss`` as ``num_items_in_batch``.
    * ``compute_loss`` divides by those counts and multiplies by the number of processes (DDP
      averages gradients over ranks), so the update is the mean over the step's kept pairs:
      independent of how they are split into micro-batches and ranks. The loss is therefore already
      scaled for gradient accumulation (``loss_is_scaled_for_ga``).
    * ``prediction_step``: evaluation returns the loss only (there are no logits).

    Subclasses define ``_labels(batch)`` and ``_ignore_index``.
    """

    loss_is_scaled_for_ga = True
    _ignore_index = -100

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        trainers = [b for b in cls.__mro__ if b.__name__ == "Trainer" and b.__module__.startswith("transformers")]
        if trainers and not hasattr(trainers[0], "_get_num_items_in_batch"):
            raise ImportError(
                f"{cls.__name__} needs a transformers.Trainer that counts items per optimizer step "
                "(Trainer._get_num_items_in_batch, transformers >= 4.56): pip install -U transformers"
            )

    def _labels(self, batch: Mapping[str, Any]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> WindowCounts | None:
        if not batch_samples:
            return None
        return window_counts(batch_samples, self._labels, self._ignore_index, self.accelerator, device)

    def _loss_scale(self, counts: WindowCounts | None) -> float:
        return float(self.accelerator.num_processes) if counts is not None else 1.0

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """Evaluation: the SafeDPO loss only (there are no logits to return)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
