"""Hidden states and the output-embedding weight of a transformers causal LM, never its logits.

Every integration (plain loop, ``transformers.Trainer``, TRL) computes per-sequence log-probs the
same way: run the decoder backbone to get the final (normed) hidden states ``(rows, T, H)``, take
``lm_head.weight`` ``(V, H)`` (the input embedding itself when embeddings are tied, so its gradient
lands on the one shared parameter), then call :func:`safedpo_kernels.linear_logprobs` on the shifted
pair ``hidden[:, :-1]`` / ``labels[:, 1:]``. The ``(rows, T, V)`` logits never exist.

Where to call what:

* :func:`hidden_states_and_head_weight` calls the backbone directly. Use it in a single-process
  loop, or **inside the forward of the module that is the FSDP2 root** (see
  :class:`SequenceLogpsModel`).
* :func:`forward_hidden_states` runs the model's own (possibly DDP-wrapped) root forward with
  ``logits_to_keep=1`` and captures the backbone output with a forward hook: the logits it builds
  are ``(rows, 1, V)``. The Trainer and TRL integrations use it so that DDP sees a normal forward.

FSDP2 rule (from ``shared/RECIPE_NOTES.md``, checked with 2 ranks against a single process): the
lm_head weight may only be used **inside the forward of the FSDP root module** (or of a method
registered with ``torch.distributed.fsdp.register_fsdp_forward_method``). Outside it the parameter
is a sharded ``DTensor``; ``weight.full_tensor()`` there runs but yields gradients that are never
reduced (off by ~100%), and ``module.unshard()`` + calling submodules does the same. Wrap the LM in
:class:`SequenceLogpsModel`, ``fully_shard`` each decoder layer and then the wrapper. The helpers
below raise instead of silently using a sharded weight.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch import nn

from safedpo_kernels.fused import packed_sequence_logps, sequence_logps
from safedpo_kernels.integrations.heads import OutputHead, output_head, unwrap_model
from safedpo_kernels.logprobs import linear_logprobs

class HiddenStatesAndHead(NamedTuple):
    """``hidden`` (rows, T, H) final hidden states, and the output head (see :class:`OutputHead`):
    ``weight`` (V, H), ``bias`` (V,) or None, ``logit_scale`` (float), ``softcap`` (float or None)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float = 1.0
    softcap: float | None = None


def get_backbone(model: nn.Module) -> nn.Module:
    """The decoder of a transformers causal LM (``model.model`` for Llama), wrappers stripped.

    Looks at ``get_decoder()`` first, then ``base_model_prefix``. Raises TypeError for a model that
    has neither (e.g. a plain ``nn.Module``).
    """
    lm = unwrap_model(model)
    decoder = lm.get_decoder() if callable(getattr(lm, "get_decoder", None)) else None
    if decoder is None or decoder is lm:
        prefix = getattr(lm, "base_model_prefix", "")
        decoder = getattr(lm, prefix, None) if prefix else None
    if not isinstance(decoder, nn.Module) or decoder is lm:
        raise TypeError(
            f"model: expected a transformers causal LM with a decoder backbone (get_decoder() or "
            f"base_model_prefix), got {type(lm).__name__}"
        )
    return decoder


def hidden_states_and_head_weight(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **model_kwargs: Any,
) -> HiddenStatesAndHead:
    """Final hidden states and lm_head weight of a causal LM, running only its backbone (no logits).

    Args:
        model: a transformers causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, a PEFT model...).
        input_ids: (rows, T) long. attention_mask: (rows, T) 0/1 or None.
        model_kwargs: passed to the backbone (``position_ids``, ...); ``use_cache`` is forced off.

    Returns:
        ``HiddenStatesAndHead(hidden (rows, T, H) in the model dtype, weight (V, H), bias (V,) or None,
        logit_scale, softcap)``: pass all of them on (``linear_logprobs(hidden, weight, labels,
        bias=bias, logit_scale=logit_scale, softcap=softcap)``); for Gemma 2, Cohere, Granite... the
        raw ``lm_head.weight`` alone gives a wrong loss (see ``integrations.heads``).

    FSDP2 / DeepSpeed ZeRO-3: call this only inside the forward of the root module (see the module
    docstring); outside it the weight is sharded and this raises RuntimeError.
    """
    head = output_head(model)
    backbone = get_backbone(model)
    model_kwargs["use_cache"] = False
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return HiddenStatesAndHead(hidden, *head)


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def forward_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """Final hidden states (rows, T, H) from the model's **root** forward (through DDP etc.).

    Calls ``model(input_ids, attention_mask, logits_to_keep=1, use_cache=False, **model_kwargs)``
    and captures the backbone's ``last_hidden_state`` with a forward hook, so a DDP wrapper prepares
    its gradient reduction as usual while the logits built are only (rows, 1, V). Raises TypeError
    for a model whose forward has no ``logits_to_keep`` (it would build the full logits).
    """
    lm = unwrap_model(model)
    if not _accepts(lm.forward, "logits_to_keep"):
        raise TypeError(
            f"model: {type(lm).__name__}.forward has no logits_to_keep argument, so its forward would build "
            "the full (rows, T, V) logits; use hidden_states_and_head_weight inside your own forward instead"
        )
    captured: list[torch.Tensor] = []

    def hook(_module, _args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = get_backbone(lm).register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False, **model_kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"model: expected the backbone to run once per forward, it ran {len(captured)} times")
    return captured[0]


def causal_lm_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
    average: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Sequence log-probs (rows,) float32 of HF-style labels from unshifted hidden states.

    ``weight`` / ``bias`` / ``logit_scale`` / ``softcap``: the output head (:func:`output_head`).

    Padded layout: hidden (rows, T, H), labels (rows, T) aligned with ``input_ids``
    (``ignore_index`` on prompt and padding); ``hidden[:, :-1]`` predicts ``labels[:, 1:]`` and the
    token log-probs of every non-ignored label are summed (or with ``average`` averaged) per row.

    Packed layout (``PackedPairCollator``): hidden (1, total, H), labels (1, total) with the first
    token of every sequence ignored, ``cu_seqlens`` (S + 1,) sequence offsets; returns (S,). The
    model must have run with ``position_ids`` restarting at each sequence, no attention mask and
    ``use_cache=False`` (transformers only detects packed sequences then; otherwise attention
    silently crosses sequence boundaries).
    """
    if hidden.dim() != 3 or labels.dim() != 2 or hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"hidden / labels: expected (rows, T, H) and (rows, T), got {tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    labels = labels.to(hidden.device)
    if cu_seqlens is None:
        hidden, target = hidden[:, :-1], labels[:, 1:]
    else:
        if hidden.shape[0] != 1:
            raise ValueError(
                f"hidden: expected one packed row (1, total, H) with cu_seqlens, got {tuple(hidden.shape)}"
            )
        # Shift left and pad, so position t predicts target[t] and cu_seqlens still index positions.
        target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)
    # Under autocast (e.g. TRL's default bf16=True with fp32 weights) the backbone may hand back
    # hidden states in another dtype than lm_head.weight. The fused head runs outside autocast in
    # the weight's dtype: its backward recomputes logits, which must match the forward's exactly.
    with torch.autocast(hidden.device.type, enabled=False):
        tok = linear_logprobs(hidden.to(weight.dtype), weight, target, bias=bias, ignore_index=ignore_index,
                              logit_scale=logit_scale, softcap=softcap, impl=impl)
    if cu_seqlens is None:
        return sequence_logps(tok, target, ignore_index=ignore_index, average=average)
    return packed_sequence_logps(tok.reshape(-1), target.reshape(-1), cu_seqlens, ignore_index=ignore_index,
                                 average=average)


class SequenceLogpsModel(nn.Module):
    """A causal LM whose forward returns per-sequence log-probs: the FSDP2/DDP-safe root module.

    ``forward(input_ids, attention_mask, labels, **model_kwargs) -> (rows,) float32``: backbone, then
    :func:`causal_lm_sequence_logps` on the lm_head weight, all inside this module's forward. Under
    FSDP2, ``fully_shard`` each decoder layer and then this wrapper (its root), so the lm_head weight
    the loss sees is the unsharded compute weight and its gradient is reduce-scattered by FSDP; the
    SafeDPO loss on the (rows,) result can then be computed outside. Tied embeddings stay tied as
    long as embeddings and lm_head live in the same (root) FSDP unit.

    Args:
        lm: a transformers causal LM. ignore_index, average_log_prob, impl: as in
            :func:`causal_lm_sequence_logps`.
    """

    def __init__(self, lm: nn.Module, *, ignore_index: int = -100, average_log_prob: bool = False,
                 impl: str = "auto"):
        super().__init__()
        self.lm = lm
        self.ignore_index = int(ignore_index)
        self.average_log_prob = bool(average_log_prob)
        self.impl = impl
        # Lets accelerate / FSDP auto-wrap policies find the decoder layer class.
        self._no_split_modules = getattr(lm, "_no_split_modules", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                **model_kwargs: Any) -> torch.Tensor:
        """input_ids / attention_mask / labels (rows, T) -> (rows,) float32 sequence log-probs.

        Packed batches: input_ids / labels / position_ids (1, total) (in ``model_kwargs``), no
        attention_mask, ``cu_seqlens`` (S + 1,) -> (S,)."""
        if labels is None:
            raise ValueError("labels: expected (rows, T) HF-style labels with ignore_index on prompt and padding")
        out = hidden_states_and_head_weight(self.lm, input_ids, attention_mask, **model_kwargs)
        return causal_lm_sequence_logps(out.hidden, out.weight, labels, bias=out.bias, logit_scale=out.logit_scale,
                                        softcap=out.softcap, cu_seqlens=cu_seqlens, ignore_index=self.ignore_index,
                                        average=self.average_log_prob, impl=self.impl)
