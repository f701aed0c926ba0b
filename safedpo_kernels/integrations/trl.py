"""SafeDPO on TRL's ``DPOTrainer``: same config, datasets, tokenization, PEFT, logging; SafeDPO loss, no logits.

Install with ``pip install "safedpo-kernels[trl]"`` (from a clone or a built wheel). Usage (see
docs/integrations.md)::

    from trl import DPOConfig
    from peft import LoraConfig
    from safedpo_kernels.integrations import SafeDPOTrainer

    pairs, _ = load_pairs("PKU-Alignment/PKU-SafeRLHF-30K")  # prompt, chosen, rejected + unsafe flags
    trainer = SafeDPOTrainer(model, args=DPOConfig(output_dir="out", beta=0.1), train_dataset=pairs,
                             processing_class=tokenizer, peft_config=LoraConfig(r=16), delta=10.0)
    trainer.train()

What changes with respect to ``DPOTrainer``:

* the dataset carries two unsafe flags per pair (bool or 0/1, 1 = unsafe; columns
  ``chosen_unsafe`` / ``rejected_unsafe`` by default, renamed with ``chosen_unsafe_column`` /
  ``rejected_unsafe_column``) next to TRL's ``prompt`` / ``chosen`` / ``rejected``, with ``chosen``
  the **helpfulness** winner; the loss applies T(D) (keep / swap / drop) and the safety margin
  ``delta`` (paper Eq. 12) to every ``loss_type``;
* ``args`` is a plain ``trl.DPOConfig`` (or :class:`SafeDPOConfig`, which adds the SafeDPO options
  as fields for command-line parsing); ``delta``, the column names, ``rpo_alpha``,
  ``reference_free``, ``average_log_prob``, ``impl`` and ``prompt_template`` are trainer keywords;
* ``compute_loss`` and ``compute_ref_log_probs`` score the completion tokens with
  :func:`safedpo_kernels.linear_logprobs` on the last hidden states (captured from the model's
  root forward run with ``logits_to_keep=1``, DDP-safe) and the model's output head (Gemma 2
  soft-capping, Cohere / Granite logit scaling included);
* the loss of an optimizer step is the mean over the pairs T(D) keeps in all its micro-batches on
  all ranks, so gradient accumulation and data parallelism do not change the update;
* the reference is as in TRL: precomputed (``precompute_ref_log_probs=True``), a live ``ref_model``,
  or for PEFT the policy with its adapters disabled (``peft_config``; a ``PeftModel`` gets TRL's
  "ref" copy of its adapter); or none with ``reference_free=True``;
* logged: TRL's ``rewards/*``, ``logps/*``, ``num_tokens`` (means over the pairs kept by T(D)) plus
  ``safety/safe_vs_unsafe_frac``, ``pairs/kept``, ``pairs/swapped``, ``pairs/dropped`` (and
  ``nll_loss``). TRL's ``entropy``, ``logits/*`` and ``mean_token_accuracy`` need full-vocabulary
  statistics and are not logged.

Refused at construction rather than silently ignored: ``ld_alpha``, ``use_weighting``,
``f_divergence_type`` other than ``reverse_kl``, ``loss_type`` ``aot`` / ``aot_unpaired``, vision
datasets, a PEFT adapter on ``lm_head``, a head the fused path cannot reproduce. FSDP2 / ZeRO-3: see
``integrations.hf``.
"""

from __future__ import annotations

import contextlib
import copy
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

from safedpo_kernels.integrations._common import (
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

#: The TRL version these overrides were written and tested against (its DPOTrainer extension points:
#: ``compute_loss``, ``compute_ref_log_probs``, ``_set_signature_columns_if_needed``, the
#: ``completion_mask`` collator).
TESTED_TRL = "1.16.0"
_IGNORE = -100  # TRL marks non-completion tokens with -100
#: TRL options with no SafeDPO counterpart: name -> the only accepted value.
_UNSUPPORTED = {"ld_alpha": None, "use_weighting": False, "f_divergence_type": "reverse_kl"}


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
    """TRL's ``DPOConfig`` plus the SafeDPO options as fields (for ``TrlParser`` / command lines).

    A plain ``DPOConfig`` works as well: pass these as :class:`SafeDPOTrainer` keywords instead.
    """

    delta: float = field(default=10.0, metadata={"help": "SafeDPO safety margin Delta (logit units, >= 0)."})
    chosen_unsafe_column: str = field(default="chosen_unsafe", metadata={"help": "Unsafe flag of `chosen`."})
    rejected_unsafe_column: str = field(default="rejected_unsafe", metadata={"help": "Unsafe flag of `rejected`."})
    rpo_alpha: float | None = field(default=None, metadata={"help": "Weight of the NLL (RPO) term."})
    reference_free: bool = field(default=False, metadata={"help": "Reference log-probs taken as 0."})
    average_log_prob: bool = field(default=False, metadata={"help": "Mean instead of sum of token log-probs."})
    impl: str = field(default="auto", metadata={"help": "linear_logprobs implementation: auto, torch, triton."})
    prompt_template: str | None = field(default=None, metadata={"help": "Template with {prompt} for prompts."})


#: Trainer keyword -> default (also the SafeDPOConfig fields).
_SAFEDPO_OPTIONS = {"delta": 10.0, "chosen_unsafe_column": "chosen_unsafe", "rejected_unsafe_column": "rejected_unsafe",
                    "rpo_alpha": None, "reference_free": False, "average_log_prob": False, "impl": "auto",
                    "prompt_template": None}


class _WithSafetyFlags:
    """Wraps TRL's preference collator to also return ``chosen_unsafe`` / ``rejected_unsafe`` (B,) bool,
    read from the configured columns (bool or 0/1; anything else raises naming the column)."""

    def __init__(self, collator: Any, columns: tuple[str, str]) -> None:
        self.collator = collator
        self.columns = columns

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from safedpo_kernels.data.schema import as_flag

        batch = self.collator(examples)
        for key, col in zip(("chosen_unsafe", "rejected_unsafe"), self.columns):
            if col in examples[0]:
                batch[key] = torch.tensor([as_flag(e[col], col) for e in examples], dtype=torch.bool)
        return batch


class SafeDPOTrainer(SafeDPOTrainerMixin, DPOTrainer):
    """TRL ``DPOTrainer`` that trains SafeDPO and never materializes the logits.

    Positional arguments are ``trl.DPOTrainer``'s (``model, ref_model, args, data_collator,
    train_dataset, eval_dataset, processing_class, ...``), including ``peft_config``. ``args``: a
    ``trl.DPOConfig`` (its ``beta``, ``loss_type`` (a name or TRL's list, ``"sft"`` for the NLL
    term), ``loss_weights``, ``label_smoothing``, ``discopop_tau`` and ``precompute_ref_log_probs``
    are used) or :class:`SafeDPOConfig`.

    Keyword-only SafeDPO options (default: the :class:`SafeDPOConfig` field, else the value shown):
        delta (10.0): safety margin (logit units, >= 0) on safe-vs-unsafe pairs.
        chosen_unsafe_column / rejected_unsafe_column ("chosen_unsafe" / "rejected_unsafe"): the
            dataset's unsafe-flag columns (bool or 0/1, 1 = unsafe).
        rpo_alpha (None): weight of the NLL term on the T(D) winners (RPO; same as adding "sft"
            to ``loss_type`` with that weight).
        reference_free (False): reference log-probs taken as 0; no reference model is loaded.
        average_log_prob (False): per-token mean instead of sum of completion log-probs.
        impl ("auto"): :func:`safedpo_kernels.linear_logprobs` implementation.
        prompt_template (None): TRL's tokenization of the prompt as is (or the chat template of a
            conversational dataset); a string with one ``{prompt}`` (e.g.
            ``safedpo_kernels.data.DEFAULT_TEMPLATE``, the template of
            ``tokenize_pairs`` / :class:`SafeDPOHFTrainer`) wraps each text prompt first.
    """

    _tag_names = ["trl", "dpo", "safedpo"]
    _name = "SafeDPO"

    def __init__(self, model: Any, ref_model: nn.Module | None = None, args: DPOConfig | None = None,
                 data_collator: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, compute_metrics: Any = None, callbacks: Any = None,
                 optimizers: tuple = (None, None), quantization_config: Any = None, peft_config: Any = None, *,
                 delta: float | None = None, chosen_unsafe_column: str | None = None,
                 rejected_unsafe_column: str | None = None, rpo_alpha: float | None = None,
                 reference_free: bool | None = None, average_log_prob: bool | None = None, impl: str | None = None,
                 prompt_template: str | None = None) -> None:
        if ref_model is not None and not isinstance(ref_model, nn.Module):
            raise TypeError(
                f"ref_model: expected a frozen reference model (nn.Module) or None, got {type(ref_model).__name__}; "
                "SafeDPOTrainer takes TRL's order (model, ref_model, args, ...): pass the config as args=..."
            )
        args = _check_args(args)
        given = {"delta": delta, "chosen_unsafe_column": chosen_unsafe_column,
                 "rejected_unsafe_column": rejected_unsafe_column, "rpo_alpha": rpo_alpha,
                 "reference_free": reference_free, "average_log_prob": average_log_prob, "impl": impl,
                 "prompt_template": prompt_template}
        opts = _resolve_options(args, given)
        self._flag_columns = (opts["chosen_unsafe_column"], opts["rejected_unsafe_column"])
        self._objective = ObjectiveOptions(
            beta=args.beta, delta=opts["delta"], loss_types=tuple(args.loss_type), loss_weights=args.loss_weights,
            label_smoothing=args.label_smoothing, discopop_tau=args.discopop_tau,
            reference_free=opts["reference_free"], rpo_alpha=opts["rpo_alpha"],
            average_log_prob=opts["average_log_prob"], impl=opts["impl"],
        )
        peft = peft_config is not None or (isinstance(model, nn.Module) and is_peft_model(model))
        if isinstance(model, nn.Module):
            check_model_head("model", model)
        if ref_model is not None:
            if opts["reference_free"]:
                raise ValueError("ref_model: given with reference_free=True; pass one or the other")
            check_model_head("ref_model", ref_model)
        elif not (opts["reference_free"] or peft or args.precompute_ref_log_probs) and isinstance(model, nn.Module) \
                and not getattr(getattr(model, "config", None), "_name_or_path", ""):
            raise ValueError(
                "ref_model: no reference: pass ref_model=..., set precompute_ref_log_probs=True, pass a "
                "peft_config (reference = adapters disabled) or reference_free=True (TRL would reload the policy "
                "from model.config.name_or_path, which is empty)"
            )
        train_dataset = _prepare_pairs("train_dataset", train_dataset, self._flag_columns, opts["prompt_template"])
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: _prepare_pairs(f"eval_dataset[{k!r}]", v, self._flag_columns, opts["prompt_template"])
                            for k, v in eval_dataset.items()}
        else:
            eval_dataset = _prepare_pairs("eval_dataset", eval_dataset, self._flag_columns, opts["prompt_template"])
        if opts["reference_free"] and ref_model is None and not peft and not args.precompute_ref_log_probs:
            # TRL would load a reference model; "precomputing" zeros (no forward) avoids it.
            args = copy.copy(args)
            args.precompute_ref_log_probs = True
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config)
        if self._is_vision_dataset:
            raise NotImplementedError("train_dataset: vision datasets are not supported by the SafeDPO TRL integration")
        check_model_head("model", self.model)  # after TRL applied peft_config / loaded a model id
        self.data_collator = _WithSafetyFlags(self.data_collator, self._flag_columns)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for col in self._flag_columns:
            if col not in self._signature_columns:
                self._signature_columns.append(col)

    def _labels(self, inputs: dict[str, Any]) -> torch.Tensor:
        return inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, _IGNORE)

    def _sequence_logps(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        return model_sequence_logps(model, inputs, self._labels(inputs), ignore_index=_IGNORE,
                                    impl=self._objective.impl)

    @torch.no_grad()
    def compute_ref_log_probs(self, model: nn.Module, inputs: dict[str, Any]):
        """Reference ``(chosen, rejected)`` (B,) summed log-probs of one padded batch with the fused path.

        TRL calls this for ``precompute_ref_log_probs=True`` with the reference (or the initial
        policy); for a PEFT policy without ``ref_model`` the adapters are disabled (or TRL's "ref"
        adapter is active). Zeros with ``reference_free``."""
        if self._objective.reference_free:
            zeros = torch.zeros(inputs["input_ids"].shape[0] // 2, device=inputs["input_ids"].device)
            return zeros, zeros.clone()
        from trl.models.utils import disable_gradient_checkpointing

        peft_ctx = (peft_reference(self.model) if self.ref_model is None and is_peft_model(self.model)
                    else contextlib.nullcontext())
        was_training = model.training
        model.eval()
        try:
            with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), peft_ctx:
                seq = self._sequence_logps(model, inputs)
        finally:
            model.train(was_training)
        return seq.chunk(2, dim=0)

    def _reference(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._objective.reference_free:
            return None
        if self.precompute_ref_logps:
            ref = batch_reference_logps(inputs)
            if ref is None:
                raise ValueError("inputs: precompute_ref_log_probs=True but the batch has no ref_chosen_logps")
            return ref
        if self.ref_model is not None:
            return self.compute_ref_log_probs(self.ref_model, inputs)
        if is_peft_model(self.model):
            return self.compute_ref_log_probs(self.model, inputs)
        raise ValueError("ref_model: no reference model, no precomputed reference log-probs and not a PEFT model")

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: WindowCounts | None = None):
        """SafeDPO loss of one TRL preference batch (chosen rows first) plus the metrics.

        ``num_items_in_batch``: the optimizer step's :class:`WindowCounts` (the Trainer passes it);
        None (evaluation, direct calls): the mean over this batch's kept pairs."""
        if num_items_in_batch is not None and not isinstance(num_items_in_batch, WindowCounts):
            raise TypeError(f"num_items_in_batch: expected WindowCounts or None, got {type(num_items_in_batch)}")
        mode = "train" if self.model.training else "eval"
        labels = self._labels(inputs)
        policy = self._sequence_logps(model, inputs)
        counts = label_token_counts(labels, None, _IGNORE)
        cu, ru = batch_flags(inputs)
        loss, metrics = safedpo_objective(policy, counts, self._reference(inputs), cu, ru, self._objective,
                                          num_items_in_batch)
        loss = loss * self._loss_scale(num_items_in_batch)
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


def _check_args(args: Any) -> DPOConfig:
    if args is None:
        return SafeDPOConfig(output_dir="safedpo-output")
    if not isinstance(args, DPOConfig):
        cls = type(args)
        hint = (". SafeDPOHFConfig is the config of SafeDPOHFTrainer (the transformers.Trainer integration)"
                if cls.__name__ == "SafeDPOHFConfig" else "")
        raise TypeError(f"args: SafeDPOTrainer (TRL) takes a trl.DPOConfig (or SafeDPOConfig), got "
                        f"{cls.__module__}.{cls.__qualname__}{hint}")
    for name, expected in _UNSUPPORTED.items():
        value = getattr(args, name, expected)
        if value != expected:
            raise ValueError(f"args.{name}: SafeDPO supports only {expected!r}, got {value!r}")
    return args


def _resolve_options(args: DPOConfig, given: dict[str, Any]) -> dict[str, Any]:
    """Trainer keywords, else SafeDPOConfig fields, else defaults; a keyword that contradicts a
    non-default SafeDPOConfig field raises."""
    out = {}
    for name, default in _SAFEDPO_OPTIONS.items():
        from_config = getattr(args, name, default) if isinstance(args, SafeDPOConfig) else default
        value = given[name]
        if value is None:
            out[name] = from_config
        elif from_config != default and value != from_config:
            raise ValueError(f"{name}: the trainer keyword ({value!r}) contradicts args.{name} ({from_config!r})")
        else:
            out[name] = value
    for name in ("chosen_unsafe_column", "rejected_unsafe_column"):
        if not isinstance(out[name], str) or not out[name]:
            raise TypeError(f"{name}: expected a column name (str), got {out[name]!r}")
    template = out["prompt_template"]
    if template is not None and (not isinstance(template, str) or template.count("{prompt}") != 1):
        raise ValueError(f"prompt_template: expected None or a str with exactly one '{{prompt}}', got {template!r}")
    return out


def _prepare_pairs(name: str, dataset: Any, flag_columns: tuple[str, str], template: str | None) -> Any:
    """Check a TRL preference dataset (text columns, flag columns and values); apply ``template``."""
    if dataset is None:
        return None
    cols = getattr(dataset, "column_names", None)
    if cols is None:
        try:
            cols = list(next(iter(dataset)))
        except (StopIteration, TypeError):
            raise ValueError(f"{name}: expected a non-empty datasets.Dataset of preference pairs") from None
    if "chosen_input_ids" in cols and "chosen" not in cols:
        raise ValueError(
            f"{name}: this looks like tokenize_pairs output (chosen_input_ids, no text); the TRL trainer tokenizes "
            "prompt/chosen/rejected itself: pass the pairs from load_pairs, or use SafeDPOHFTrainer for "
            "pre-tokenized data"
        )
    check_columns(name, cols, ("chosen", "rejected"), "TRL preference",
                  f"(prompt/chosen/rejected, text or conversational), got {cols}")
    check_columns(
        name, cols, flag_columns, "unsafe-flag",
        "(bool or 0/1, 1 = unsafe response); load PKU-SafeRLHF-style data with safedpo_kernels.data.load_pairs, "
        "which adds them, or name your columns with chosen_unsafe_column= / rejected_unsafe_column=",
    )
    if callable(getattr(dataset, "unique", None)):  # a map-style Dataset: check every value once
        from safedpo_kernels.data.schema import as_flag

        for col in flag_columns:
            for value in dataset.unique(col):
                as_flag(value, col)
    if template is not None:
        first = next(iter(dataset))
        if not isinstance(first.get("prompt"), str):
            raise ValueError(f"prompt_template: {name} has no text 'prompt' column (a conversational dataset uses "
                             "the tokenizer's chat template instead)")
        dataset = dataset.map(lambda row: {"prompt": template.replace("{prompt}", row["prompt"])})
    return dataset
