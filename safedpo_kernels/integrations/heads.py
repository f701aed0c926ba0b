"""What a transformers causal LM's output head does: ``lm_head`` weight and bias, then a logit transform.

The fused log-probs compute ``z = hidden @ weight.T + bias`` and then
``softcap * tanh(logit_scale * z / softcap)`` (or ``logit_scale * z`` without a cap), see
:func:`safedpo_kernels.linear_logprobs`. Most families (Llama, Qwen, Mistral, ...) use the plain head
(``logit_scale=1``, no cap); the families below transform their logits after ``lm_head``, which this
module reads from the model exactly as its ``forward`` in ``transformers`` does:

===========================================  ======================================================
class (``transformers``)                     head
===========================================  ======================================================
Gemma2/3/3n/4, VaultGemma, NanoChat, Beam    ``softcap = config.final_logit_softcapping`` (None: no cap)
RecurrentGemma                               ``softcap = config.logits_soft_cap``
Cohere, Cohere2, Cohere2Moe, CohereCompass   ``logit_scale = model.logit_scale`` (``config.logit_scale``)
Granite, GraniteSWA, GraniteMoe(+SWA,        ``logit_scale = 1 / config.logits_scaling``
Hybrid, Shared)
MiniCPM3                                     ``logit_scale = 1 / config.logits_scaling`` (hidden / s)
HyperCLOVAX                                  ``logit_scale = config.logits_scaling``
FalconH1                                     ``logit_scale = model.model.lm_head_multiplier``
===========================================  ======================================================

Passing a raw ``lm_head.weight`` to the fused loss for these models computes a different (wrong)
loss without any error; always take the head from :func:`output_head` (or
``hidden_states_and_head_weight``) and pass its ``logit_scale`` / ``softcap`` on. A model of
another class whose config carries a logit-transform field (:data:`LOGIT_TRANSFORM_FIELDS`), a PEFT
adapter on ``lm_head``, or a custom head module is refused with a ValueError rather than trained
wrongly. :func:`verify_output_head` checks the description of any model against its own forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

#: Config fields that, set to anything but None / 1.0, change the logits after ``lm_head``. A model
#: class not listed in this module's table that sets one of them is refused.
LOGIT_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logits_soft_cap",
                          "output_logit_soft_cap", "output_multiplier", "lm_head_multiplier", "logit_softcapping",
                          "unpadded_vocab_size")


class OutputHead(NamedTuple):
    """The output head of a causal LM: logits = ``softcap * tanh(logit_scale * (h @ weight.T + bias) / softcap)``.

    ``weight`` (V, H) and ``bias`` (V,) or None are the lm_head parameters themselves (the input
    embedding when tied); ``logit_scale`` a positive float; ``softcap`` a positive float or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float = 1.0
    softcap: float | None = None


def _text_config(lm: nn.Module) -> Any:
    config = getattr(lm, "config", None)
    if config is not None and callable(getattr(config, "get_text_config", None)):
        return config.get_text_config()
    return config


def _final_softcap(lm: nn.Module) -> tuple[float, float | None]:
    return 1.0, getattr(_text_config(lm), "final_logit_softcapping", None)


def _cohere(lm: nn.Module) -> tuple[float, float | None]:
    return getattr(lm, "logit_scale", _text_config(lm).logit_scale), None


def _divide_by_logits_scaling(lm: nn.Module) -> tuple[float, float | None]:
    return 1.0 / _text_config(lm).logits_scaling, None


#: Model class name -> (logit_scale, softcap) as its forward applies them after lm_head.
_HEAD_TRANSFORMS: dict[str, Callable[[nn.Module], tuple[float, float | None]]] = {
    **dict.fromkeys(("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM", "Gemma4ForCausalLM",
                     "VaultGemmaForCausalLM", "NanoChatForCausalLM", "BeamForCausalLM"), _final_softcap),
    "RecurrentGemmaForCausalLM": lambda lm: (1.0, _text_config(lm).logits_soft_cap),
    **dict.fromkeys(("CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM",
                     "CohereCompassForCausalLM"), _cohere),
    **dict.fromkeys(("GraniteForCausalLM", "GraniteSWAForCausalLM", "GraniteMoeForCausalLM",
                     "GraniteMoeSWAForCausalLM", "GraniteMoeHybridForCausalLM", "GraniteMoeSharedForCausalLM",
                     "MiniCPM3ForCausalLM"), _divide_by_logits_scaling),
    "HyperCLOVAXForCausalLM": lambda lm: (float(_text_config(lm).logits_scaling), None),
    "FalconH1ForCausalLM": lambda lm: (float(lm.model.lm_head_multiplier), None),
}


def strip_wrappers(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / accelerate ``.module`` wrappers (a PEFT model stays a PEFT model)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / accelerate ``.module`` wrappers and a PEFT wrapper (-> base model)."""
    model = strip_wrappers(model)
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        model = get_base()
    return model


def _check_unsharded(name: str, t: torch.Tensor) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()  # noqa: N806
    if isinstance(t, DTensor):
        raise RuntimeError(
            f"{name} is a sharded DTensor (FSDP2): the lm_head weight may only be used inside the forward of "
            "the FSDP root module. Wrap the LM in safedpo_kernels.integrations.SequenceLogpsModel, "
            "fully_shard each decoder layer and then the wrapper, and call the wrapper (see RECIPE_NOTES)."
        )
    if t.numel() == 0 or (name.endswith("weight") and t.dim() != 2):
        raise RuntimeError(
            f"{name} has shape {tuple(t.shape)}: the parameter looks partitioned (DeepSpeed ZeRO-3?); "
            "use it only inside the root module's forward, where it is gathered."
        )


def _check_factor(lm: nn.Module, name: str, value: Any, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"model: {type(lm).__name__} has {name}={value!r}; expected a finite float > 0"
            + (" or None" if allow_none else "")
        )
    return float(value)


def output_head(model: nn.Module) -> OutputHead:
    """``OutputHead(weight (V, H), bias (V,) or None, logit_scale, softcap)`` of a causal LM's output head.

    With tied embeddings ``weight`` is the input-embedding Parameter itself, so gradients from the
    loss and from the embedding lookup accumulate on one tensor. ``logit_scale`` / ``softcap`` say
    what the model's forward does to the logits after ``lm_head`` (see the module docstring); pass
    both to :func:`safedpo_kernels.linear_logprobs` or the fused loss modules.

    Raises:
        TypeError: no output embedding. ValueError: a logit transform this module does not know
        (a config field in :data:`LOGIT_TRANSFORM_FIELDS` on an unlisted model class), a PEFT
        adapter on ``lm_head`` (it would be ignored), or a head that is not a plain linear layer.
        RuntimeError: the weight is sharded (FSDP2 outside the root's forward, ZeRO-3).
    """
    lm = unwrap_model(model)
    head = lm.get_output_embeddings() if callable(getattr(lm, "get_output_embeddings", None)) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"model: expected a causal LM with an output embedding (lm_head), got {type(lm).__name__}")
    if hasattr(head, "base_layer") and hasattr(head, "active_adapters"):
        raise ValueError(
            f"model: lm_head carries a PEFT adapter ({type(head).__name__}); the fused log-probs read "
            "lm_head.weight directly, so the adapter would never be used or trained. Remove 'lm_head' from "
            "target_modules (train it fully with modules_to_save=['lm_head'] if needed)."
        )
    base = getattr(head, "original_module", head)  # PEFT modules_to_save wrapper: the wrapped copy's class
    if type(base).forward is not nn.Linear.forward:
        raise ValueError(
            f"model: lm_head is a {type(base).__name__} with its own forward, not a plain nn.Linear; the fused "
            "log-probs compute hidden @ lm_head.weight.T (+ bias) and cannot reproduce it"
        )
    cls = type(lm).__name__
    if cls in _HEAD_TRANSFORMS:
        scale, cap = _HEAD_TRANSFORMS[cls](lm)
    else:
        config = _text_config(lm)
        for field in LOGIT_TRANSFORM_FIELDS:
            value = getattr(config, field, None) if config is not None else None
            if value is not None and value != 1.0 and not (field == "unpadded_vocab_size"
                                                          and value >= head.weight.shape[0]):
                raise ValueError(
                    f"model.config.{field}={value!r}: {cls} may transform its logits after lm_head in a way "
                    "safedpo_kernels does not know; supported transforms: "
                    f"{', '.join(sorted(_HEAD_TRANSFORMS))} (see safedpo_kernels.integrations.heads)"
                )
        scale, cap = 1.0, None
    scale = _check_factor(lm, "logit_scale", scale, allow_none=False)
    cap = _check_factor(lm, "softcap", cap, allow_none=True)
    weight, bias = head.weight, getattr(head, "bias", None)
    _check_unsharded("lm_head.weight", weight)
    return OutputHead(weight, bias, scale, cap)


def head_logits(hidden: torch.Tensor, head: OutputHead) -> torch.Tensor:
    """Eager logits of ``head`` on ``hidden`` (..., H) -> (..., V): the formula of :class:`OutputHead`."""
    z = hidden @ head.weight.T
    if head.bias is not None:
        z = z + head.bias
    if head.softcap is None:
        return z * head.logit_scale
    return head.softcap * torch.tanh(z * (head.logit_scale / head.softcap))


@torch.no_grad()
def verify_output_head(model: nn.Module, *, rtol: float = 1e-4, seed: int = 0) -> OutputHead:
    """Check :func:`output_head` against the model's own forward; returns the head, raises ValueError if not equal.

    Runs the model once on a (1, 2) input with the backbone's output replaced by random hidden
    states scaled so the logits are large (a soft-cap or scale would show), and compares its
    logits with :func:`head_logits` in float64. Costs one forward of two tokens; single process
    only (not under FSDP / ZeRO-3).
    """
    from safedpo_kernels.integrations.model import get_backbone

    head = output_head(model)
    lm = unwrap_model(model)
    backbone = get_backbone(lm)
    gen = torch.Generator().manual_seed(seed)
    w = head.weight.detach()
    probe = torch.randn(1, 2, w.shape[1], generator=gen, dtype=torch.float64)
    z = probe @ w.double().T
    # Logits of std ~ 3 x the cap (or ~ 10 without one) make the transform far larger than rounding.
    target_std = (3.0 * head.softcap if head.softcap is not None else 10.0) / head.logit_scale
    probe = probe * (target_std / z.std().clamp_min(1e-12))
    probe_model = probe.to(w.dtype)

    def replace(_module, _args, output):
        if hasattr(output, "last_hidden_state"):
            output.last_hidden_state = probe_model.to(output.last_hidden_state.device)
            return output
        return (probe_model.to(output[0].device), *output[1:])

    handle = backbone.register_forward_hook(replace)
    was_training = lm.training
    lm.eval()
    try:
        ids = torch.zeros(1, 2, dtype=torch.long, device=w.device)
        logits = lm(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
        lm.train(was_training)
    expected = head_logits(probe_model.double(), OutputHead(w.double(), None if head.bias is None else
                                                            head.bias.detach().double(), head.logit_scale,
                                                            head.softcap))
    err = (logits.double().cpu() - expected.cpu()).abs().max().item()
    scale = expected.abs().max().item()
    if not err <= rtol * scale:
        raise ValueError(
            f"model: {type(lm).__name__}'s logits differ from the head description {head.logit_scale=}, "
            f"{head.softcap=} by {err:.3e} (logits up to {scale:.3e}); its forward transforms the logits in a "
            "way safedpo_kernels does not know"
        )
    return head
