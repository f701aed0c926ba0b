"""Model loading that scales: every rank builds the model without weights and reads only its own shards.

1. :func:`empty_shell`: the causal LM with its parameters on the meta device (no memory) and its
   buffers (rotary ``inv_freq``) computed for real on the CPU.
2. The recipe applies ``fully_shard`` and ``to_empty``; :func:`restore_buffers` puts the buffers back.
3. :func:`load_own_shards`: each rank opens the checkpoint's ``*.safetensors`` files (memory-mapped)
   and copies only the rows of its own FSDP shard of each parameter, converted to the parameter's dtype.
   No rank ever holds the full model; every rank reads in parallel (no broadcast from rank 0, so no
   rank idles in a collective while another reads 26-52 GB).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

_WRAPPER = "_checkpoint_wrapped_module."


@contextlib.contextmanager
def _params_on_meta():
    """Parameters created inside go to the meta device; buffers stay real (accelerate's
    ``init_empty_weights(include_buffers=False)``, without the dependency)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        p = module._parameters[name]
        if p is not None and not p.is_meta:  # an existing meta parameter (a tie) is kept as the same object
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def empty_shell(config, *, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``config`` in float32 with meta parameters and real buffers."""
    from transformers import AutoModelForCausalLM

    with _params_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)


def snapshot_buffers(lm: nn.Module) -> list[torch.Tensor | None]:
    """Copies of the module's buffers (module order), None for buffers still on the meta device."""
    return [None if b.is_meta else b.detach().clone() for b in lm.buffers()]


def restore_buffers(lm: nn.Module, saved: list[torch.Tensor | None]) -> list[int]:
    """Copy ``saved`` back after ``to_empty``; returns the indices that had nothing saved."""
    missing = []
    with torch.no_grad():
        for i, (buf, src) in enumerate(zip(lm.buffers(), saved)):
            if src is None:
                missing.append(i)
            else:
                buf.copy_(src)
    return missing


def weights_folder(name_or_path: str, revision: str | None) -> Path | None:
    """The local folder of a model's safetensors files (downloaded to the HF cache if needed), or None
    when the checkpoint has no safetensors files (``.bin`` only: the caller falls back)."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name_or_path, revision=revision,
                                      allow_patterns=["*.safetensors", "*.safetensors.index.json", "*.json"]))
    return path if any(path.glob("*.safetensors")) else None


def load_own_shards(lm: nn.Module, folder: Path, *, tied_names: set[str] = frozenset()) -> dict[str, int]:
    """Fill every parameter (a DTensor sharded by FSDP2, or a plain tensor) of ``lm`` from the
    safetensors files in ``folder``, reading only this rank's part of each tensor.

    Names: the module's parameter names without activation-checkpoint wrappers (``model.layers.0.
    self_attn.q_proj.weight``), as ``save_pretrained`` writes them. ``tied_names``: parameters that may
    be absent from the files because they are tied to another (``lm_head.weight``).

    Returns ``{"read_bytes": ..., "total_bytes": ...}`` (this rank's share vs the whole checkpoint).

    Raises:
        ValueError: a parameter missing from the files, or stored with another shape (file named).
    """
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    files = sorted(folder.glob("*.safetensors"))
    handles = {f: safe_open(str(f), framework="pt", device="cpu") for f in files}
    where = {key: f for f, h in handles.items() for key in h.keys()}
    read = total = 0
    with torch.no_grad():
        for name, param in list(lm.named_parameters()) + list(lm.named_buffers()):
            if ".lora_A." in name or ".lora_B." in name:  # LoRA adapters: not in the base checkpoint
                continue
            key = name.replace(_WRAPPER, "").replace(".base_layer.", ".")  # a LoRA-wrapped layer's base weight
            if key not in where:
                if isinstance(param, nn.Parameter) and key not in tied_names:
                    raise ValueError(f"model_name_or_path: {folder} has no tensor {key!r} "
                                     f"(files: {[f.name for f in files]})")
                continue
            sl = handles[where[key]].get_slice(key)
            stored = tuple(sl.get_shape())
            if stored != tuple(param.shape):
                raise ValueError(f"model_name_or_path: {where[key].name} stores {key!r} with shape {stored}, "
                                 f"the model expects {tuple(param.shape)}")
            itemsize = _dtype_size(sl.get_dtype())
            total += itemsize * max(1, param.numel())
            if isinstance(param, DTensor):
                shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
                local = param.to_local()
                if local.numel() == 0:
                    continue
                part = sl[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
            else:
                local, part = param, sl[:]
            local.copy_(part.to(device=local.device, dtype=local.dtype))
            read += itemsize * part.numel()
    return {"read_bytes": read, "total_bytes": total}


def _dtype_size(name: str) -> int:
    return {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}.get(name, 4)
