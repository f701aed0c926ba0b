"""LoRA for the FSDP2 recipe (``peft:`` config block), without a PeftModel wrapper.

The adapters are injected into the causal LM in place (``peft.inject_adapter_in_model``), so the
model keeps its class, its ``base_model_prefix`` and its output head, and FSDP2 shards base weights
(frozen) and adapters (trained) in the same units. The reference of a LoRA run is the policy with its
adapters switched off (:func:`adapters_disabled`): no second model in memory.

Initialization is deterministic and independent of the world size: each adapter matrix is drawn in
full on the CPU from a generator seeded by (seed, its index) and each rank copies its own rows, so
2 ranks start from exactly the weights 1 rank does. ``lora_B`` starts at zero (PEFT's default), so
the initial policy equals the base model.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


def inject_lora(lm: nn.Module, peft_cfg: dict) -> nn.Module:
    """LoRA layers in ``lm`` (in place, returned); every non-adapter parameter frozen.

    Raises:
        ValueError: ``peft.target_modules`` names the output head (the fused loss reads
            ``lm_head.weight`` directly) or matches no module.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = peft_cfg["target_modules"]
    if targets != "all-linear" and "lm_head" in targets:
        raise ValueError("config key 'peft.target_modules': 'lm_head' cannot carry an adapter (the fused loss "
                         "reads lm_head.weight directly, the adapter would be ignored)")
    config = LoraConfig(r=peft_cfg["r"], lora_alpha=peft_cfg["lora_alpha"], lora_dropout=peft_cfg["lora_dropout"],
                        target_modules=targets, bias=peft_cfg["bias"], exclude_modules=["lm_head"])
    try:
        lm = inject_adapter_in_model(config, lm)
    except ValueError as err:
        raise ValueError(f"config key 'peft.target_modules': {err}") from None
    for name, p in lm.named_parameters():
        p.requires_grad_(is_adapter(name))
    return lm


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """A LoRA-wrapped layer's base weight under its plain name (``q_proj.base_layer.weight`` -> ``q_proj.weight``)."""
    return name.replace(".base_layer.", ".")


@contextlib.contextmanager
def adapters_disabled(lm: nn.Module):
    """Run the base model: every LoRA layer skips its adapter (requires_grad left untouched, so FSDP2's
    view of the parameters never changes). A no-op for a model without adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in lm.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, flag in zip(layers, saved):
            m._disable_adapters = flag


def init_adapters(lm: nn.Module, seed: int) -> int:
    """PEFT's default init (A: kaiming-uniform with a=sqrt(5), B: zeros), the same on any number of
    ranks: full matrices drawn on the CPU, each rank copies its own shard. Returns the adapter count."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    count = 0
    with torch.no_grad():
        for i, (name, p) in enumerate(lm.named_parameters()):
            if not is_adapter(name):
                continue
            full = torch.zeros(tuple(p.shape), dtype=torch.float32)
            if ".lora_A." in name:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
                fan_in = full.shape[1]
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                full.uniform_(-bound, bound, generator=gen)
            if isinstance(p, DTensor):
                shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                local = p.to_local()
                if local.numel():
                    local.copy_(full[tuple(slice(o, o + s) for o, s in zip(offset, shape))])
            else:
                p.copy_(full)
            count += 1
    return count


def merged_state_dict(sd: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A full state dict with adapters -> plain model weights ``W + scaling * B @ A`` under HF names."""
    out = {}
    for key, value in sd.items():
        if is_adapter(key):
            continue
        if ".base_layer." in key and key.endswith(".weight"):
            prefix = key[: -len("base_layer.weight")]
            a, b = sd[f"{prefix}lora_A.default.weight"], sd[f"{prefix}lora_B.default.weight"]
            value = value + scaling * (b.to(torch.float32) @ a.to(torch.float32)).to(value.dtype)
        out[base_name(key)] = value
    return out
