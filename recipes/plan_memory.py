#!/usr/bin/env python
"""Per-GPU memory plan of a train_safedpo.py config, from the model config alone (meta device, no weights).

    python recipes/plan_memory.py --config recipes/configs/llama2_13b_8x80gb.yaml --gpus 8 --gpu-mem 80
    python recipes/plan_memory.py --config recipes/configs/tiny_cpu.yaml --measure   # check the terms

What is counted (FSDP2 as the recipe sets it up; "GB" here means GiB, 2**30 bytes):
  parameters   fp32 master shards                                   4 P / N
  gradients    fp32 shards of the trained parameters (LoRA: adapters) 4 T / N
  optimizer    AdamW exp_avg + exp_avg_sq, fp32 shards               8 T / N
  reference    live full fine-tune: a second fp32-sharded copy       4 P / N  (precompute, LoRA: 0)
  gathers      the root unit (embeddings, head, final norm) gathered for the whole step in the compute
               dtype, two decoder layers in flight (current + prefetched), one layer's unsharded
               gradient in the compute dtype and in fp32 for the reduce-scatter
  root grads   the root unit's unsharded gradients (compute dtype + the fp32 reduce-scatter input),
               alive at the end of the backward
  head grads   the fused loss's fp32 grad-weight accumulator (V x H) and its compute-dtype copy
  activations  per-layer checkpointing: each layer's input (tokens x hidden, compute dtype) is kept;
               backward recomputes one layer at a time: its activations and their gradients (without
               checkpointing: every layer's). SwiGLU keeps 3 x intermediate values per token with
               Liger's kernel, 4 x without; the final norm keeps 2 x hidden
  loss path    last hidden state + its gradient and the chunk buffers of linear_logprobs; never
               tokens x vocab (the naive logits are printed for comparison)
  eval         the forward-only eval / reference-precompute pass (eval_batch_size pairs): only its
               excess over the training transients is added (they never coexist)
  NCCL         communicator buffers (multi-GPU): 1 GiB
  context      CUDA context and library workspaces: 1.5 GiB
  fragment.    caching-allocator fragmentation: 10 % of the transient terms
A stated safety margin of 10 % of the total is required below the GPU memory for "FITS".
P: parameters counted on the meta model (tied weights once); T: trained parameters; N = --gpus;
tokens = the worst micro-batch per GPU: 2 x micro_batch_size x max_length for pair objectives.

--measure: the terms checked against a measurement at the config's architecture scaled down (CPU) or
at a few real layers (GPU); see ``measure``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

try:  # python recipes/plan_memory.py (the folder is on sys.path) or import recipes.plan_memory
    from train_safedpo import _decoder_layers, load_config
except ImportError:  # pragma: no cover - import as a package module
    from recipes.train_safedpo import _decoder_layers, load_config

GB = 2**30  # GiB: GPU memory sizes ("80 GB" cards hold 80 GiB) are quoted in binary units
CONTEXT_GB = 1.5
NCCL_GB = 1.0
FRAGMENTATION = 0.10
SAFETY_MARGIN = 0.10
CHUNK_BUFFER_BYTES = 3 * 64 * 2**20  # linear_logprobs' torch path: 3 live fp32 (chunk x vocab) buffers

# Public config.json values of the models the shipped configs name, so the planner runs offline.
KNOWN_CONFIGS = {
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                     vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
    "meta-llama/Llama-2-13b-hf": dict(model_type="llama", hidden_size=5120, intermediate_size=13824,
                                      num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                                      vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
    "Qwen/Qwen2.5-1.5B": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                              max_position_embeddings=131072, tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                            max_position_embeddings=131072, tie_word_embeddings=False),
}
KNOWN_CONFIGS["meta-llama/Llama-2-7b-chat-hf"] = KNOWN_CONFIGS["meta-llama/Llama-2-7b-hf"]
KNOWN_CONFIGS["meta-llama/Llama-2-13b-chat-hf"] = KNOWN_CONFIGS["meta-llama/Llama-2-13b-hf"]
KNOWN_CONFIGS["Qwen/Qwen2.5-1.5B-Instruct"] = KNOWN_CONFIGS["Qwen/Qwen2.5-1.5B"]
KNOWN_CONFIGS["Qwen/Qwen2.5-7B-Instruct"] = KNOWN_CONFIGS["Qwen/Qwen2.5-7B"]


def hf_config(cfg: dict):
    """The transformers config of ``cfg``: model_config, a local folder, a known hub id, or the hub."""
    from transformers import AutoConfig

    if cfg["model_config"] is not None:
        kwargs = dict(cfg["model_config"])
        kwargs.setdefault("vocab_size", 32000)
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    name = cfg["model_name_or_path"]
    if Path(name).is_dir() or name not in KNOWN_CONFIGS:
        return AutoConfig.from_pretrained(name, revision=cfg["model_revision"],
                                          trust_remote_code=cfg["trust_remote_code"])
    kwargs = dict(KNOWN_CONFIGS[name])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def count_params(config) -> tuple[int, int, int]:
    """(total, per decoder layer, number of layers) counted on the meta device; tied weights once."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    layers = _decoder_layers(model)
    total = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in layers[0].parameters())
    return total, per_layer, len(layers)


def layer_activation_values(config, liger: bool) -> int:
    """Values per token one decoder layer keeps for backward (flash/SDPA attention: no T x T)."""
    h, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    kvd = kv * (getattr(config, "head_dim", None) or h // heads)
    norms = 2 * h if liger else 4 * h  # Liger's RMSNorm saves input + rstd only
    attn = 2 * h + 2 * kvd + h + 2 * h  # q, k (+ rotated q, k), v, attention output, o_proj and residual
    mlp = 3 * i if liger else 4 * i  # gate, up, product (+ act(gate) without Liger's SwiGLU)
    return norms + attn + mlp + h


def trained_params(cfg: dict, config, total: int) -> int:
    """Parameters with gradients and optimizer state: all, or the LoRA adapters (counted on the meta model)."""
    if cfg.get("peft") is None:
        return total
    from recipes.loading import empty_shell  # importable: train_safedpo put the checkout on sys.path
    from recipes.lora import inject_lora

    lm = inject_lora(empty_shell(config), cfg["peft"])
    return sum(p.numel() for p in lm.parameters() if p.requires_grad)


def plan(cfg: dict, gpus: int, gpu_mem_gb: float) -> dict:
    """The memory plan of a validated recipe config on ``gpus`` GPUs of ``gpu_mem_gb`` GB each."""
    if gpus < 1 or gpu_mem_gb <= 0:
        raise ValueError(f"gpus / gpu_mem: expected >= 1 and > 0, got {gpus} / {gpu_mem_gb}")
    config = hf_config(cfg)
    total, per_layer, n_layers = count_params(config)
    trained = trained_params(cfg, config, total)
    root = total - per_layer * n_layers
    compute_bytes = 4 if cfg["mixed_precision"] == "fp32" else 2  # auto on GPU -> bf16
    rows = 2 if cfg["objective"] != "sft" or cfg["sft_responses"] == "both" else 1
    tokens = rows * cfg["micro_batch_size"] * cfg["max_length"]
    h, vocab = config.hidden_size, config.vocab_size
    act_layer = layer_activation_values(config, cfg["liger_kernels"]) * compute_bytes * tokens
    final_norm = 2 * tokens * h * compute_bytes  # the final RMSNorm saves its input and its output
    if cfg["activation_checkpointing"]:
        activations = n_layers * tokens * h * compute_bytes + 2 * act_layer + final_norm  # inputs + one recompute
    else:
        activations = n_layers * act_layer + act_layer + final_norm
    full_ft = trained == total
    live_copy = cfg["reference_mode"] == "live" and cfg["objective"] != "sft" and full_ft and not cfg.get(
        "reference_free", False)
    gathers = root * compute_bytes + 2 * per_layer * compute_bytes + per_layer * (compute_bytes + 4)
    root_trained = root if full_ft else 0  # LoRA: the root unit (embeddings, head) is frozen
    loss_path = tokens * h * (compute_bytes + 4) + CHUNK_BUFFER_BYTES
    head_grads = vocab * h * (4 + (compute_bytes if compute_bytes != 4 else 0)) if full_ft else 0
    eval_tokens = 2 * cfg["eval_batch_size"] * cfg["max_length"]
    eval_layer = (3 * h + 2 * max(config.intermediate_size, 3 * h)) * compute_bytes * eval_tokens
    eval_peak = eval_layer + eval_tokens * h * compute_bytes * 2 + CHUNK_BUFFER_BYTES
    transient = activations + loss_path + head_grads + root_trained * (compute_bytes + 4)
    parts = {
        "parameters (fp32 shards)": 4 * total / gpus,
        "gradients (fp32 shards)": 4 * trained / gpus,
        "optimizer (AdamW fp32 shards)": 8 * trained / gpus,
        "reference model": 4 * total / gpus if live_copy else 0.0,
        "gathers + reduce buffers": gathers,
        "root unit unsharded grads": root_trained * (compute_bytes + 4),
        "head grad buffers (fp32 + copy)": head_grads,
        "activations (checkpointed)" if cfg["activation_checkpointing"] else "activations": activations,
        "loss path (fused head)": loss_path,
        "eval / precompute excess": max(0.0, eval_peak - transient),
        "NCCL buffers": NCCL_GB * GB if gpus > 1 else 0.0,
        "CUDA context, workspaces": CONTEXT_GB * GB,
        "fragmentation (10% of transients)": FRAGMENTATION * (transient + gathers),
    }
    parts_gb = {k: v / GB for k, v in parts.items()}
    total_gb = sum(parts_gb.values())
    naive_logits_gb = tokens * vocab * (compute_bytes + 4 + 4) / GB  # logits, fp32 upcast, fp32 grad
    return {
        "model": cfg["model_name_or_path"] or cfg["model_config"]["model_type"],
        "params_b": total / 1e9, "trained_params_b": trained / 1e9, "layers": n_layers, "gpus": gpus,
        "gpu_mem_gb": gpu_mem_gb, "tokens_per_gpu_microbatch": tokens,
        "compute_dtype": "fp32" if compute_bytes == 4 else "bf16", "reference_mode": cfg["reference_mode"],
        "parts_gb": parts_gb, "total_gb": total_gb, "safety_margin": SAFETY_MARGIN,
        "total_with_margin_gb": total_gb * (1 + SAFETY_MARGIN),
        "fits": total_gb * (1 + SAFETY_MARGIN) <= gpu_mem_gb, "naive_logits_extra_gb": naive_logits_gb,
    }


def format_plan(p: dict) -> str:
    lines = [f"{p['model']}: {p['params_b']:.2f}B parameters, {p['layers']} layers, {p['gpus']} GPUs x "
             f"{p['gpu_mem_gb']:g} GiB, {p['tokens_per_gpu_microbatch']} tokens per GPU micro-batch, "
             f"{p['compute_dtype']} compute, reference {p['reference_mode']}"]
    width = max(len(k) for k in p["parts_gb"])
    lines += [f"  {k:<{width}}  {v:7.2f} GiB" for k, v in p["parts_gb"].items()]
    lines.append(f"  {'total per GPU':<{width}}  {p['total_gb']:7.2f} GiB")
    lines.append(f"  {'+ ' + format(p['safety_margin'], '.0%') + ' safety margin':<{width}}  "
                 f"{p['total_with_margin_gb']:7.2f} GiB  -> {'FITS' if p['fits'] else 'DOES NOT FIT'} in "
                 f"{p['gpu_mem_gb']:g} GiB")
    lines.append(f"  (materialized logits would add {p['naive_logits_extra_gb']:.2f} GiB)")
    return "\n".join(lines)


def _scaled_config(config, max_hidden: int = 256, max_vocab: int = 4096):
    """The same architecture scaled down for a CPU check: hidden <= max_hidden (head_dim kept), vocab <= max_vocab."""
    from transformers import AutoConfig

    d = config.to_dict()
    h, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    f = max(1, h // max_hidden)
    new_heads = max(1, heads // f)
    d.update(hidden_size=new_heads * head_dim, intermediate_size=max(8, config.intermediate_size // f),
             num_attention_heads=new_heads, num_key_value_heads=max(1, min(new_heads, kv // f)), head_dim=head_dim,
             vocab_size=min(config.vocab_size, max_vocab))
    model_type = d.pop("model_type")
    return AutoConfig.for_model(model_type, **{k: v for k, v in d.items() if k not in ("transformers_version",)})


def _saved_bytes(fn) -> tuple[int, object]:
    """Bytes of the distinct non-parameter storages autograd saves for backward while ``fn()`` runs."""
    seen: dict[int, int] = {}
    skip: set[int] = set()

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip:
            seen[ptr] = storage.nbytes()
        return t

    def run():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return fn()
    return run, seen, skip


def measure(cfg: dict, layers: int = 2, max_cpu_tokens: int = 4096) -> dict:
    """Measured vs predicted bytes of the activation, checkpointed-activation and gradient terms.

    The model is the config's architecture with ``layers`` decoder layers (CPU: also scaled to hidden
    <= 256 and at most ``max_cpu_tokens`` tokens), fp32 on CPU, the config's compute dtype on GPU.
    Activations are measured as the distinct storages autograd saves for backward (saved-tensor hooks:
    exact, unlike process RSS); gradients as the bytes of ``.grad`` after a backward; on a GPU also
    ``torch.cuda.max_memory_allocated`` around one layer's forward and around the fused head's
    forward + backward (loss path + head grad buffers).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from transformers import AutoModelForCausalLM

    from safedpo_kernels import linear_logprobs

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    config = hf_config(cfg)
    if not cuda:
        config = _scaled_config(config)
    config.num_hidden_layers = layers
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if cuda and cfg["mixed_precision"] != "fp32" else torch.float32
    nbytes = 2 if dtype == torch.bfloat16 else 4
    rows = 2 * cfg["micro_batch_size"] if cfg["objective"] != "sft" else cfg["micro_batch_size"]
    seq = cfg["max_length"] if cuda else max(8, min(cfg["max_length"], max_cpu_tokens // rows))
    tokens = rows * seq
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    if cfg.get("peft") is not None:
        from recipes.lora import inject_lora

        lm = inject_lora(lm, cfg["peft"]).to(device)
    base = lm.model
    ids = torch.randint(0, config.vocab_size, (rows, seq), device=device)
    pos = torch.arange(seq, device=device)[None].expand(rows, -1)
    h = config.hidden_size
    out: dict[str, tuple[float, float]] = {}

    # 1. one decoder layer, no checkpointing
    hidden = torch.randn(rows, seq, h, device=device, dtype=dtype, requires_grad=True)
    pe = base.rotary_emb(hidden, pos)
    layer = base.layers[0]
    run, seen, skip = _saved_bytes(lambda: layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=pe))
    skip.update(p.untyped_storage().data_ptr() for p in lm.parameters())
    skip.update({hidden.untyped_storage().data_ptr()} | {t.untyped_storage().data_ptr() for t in pe})
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    y = run()
    y = y[0] if isinstance(y, tuple) else y
    predicted_layer = layer_activation_values(config, liger=False) * nbytes * tokens
    out["activations, one layer (saved for backward)"] = (predicted_layer, sum(seen.values()) + hidden.numel() * nbytes)
    if cuda:
        out["activations, one layer (CUDA allocated after forward)"] = (
            predicted_layer - h * nbytes * tokens, torch.cuda.memory_allocated() - before - y.numel() * nbytes)
    del y, seen

    # 2. every layer checkpointed: only each layer's input is kept
    for i, lay in enumerate(base.layers):
        base.layers[i] = checkpoint_wrapper(lay)
    embeds = base.embed_tokens(ids)  # not detached: the embedding gets its gradient too
    run, seen, skip = _saved_bytes(lambda: base(inputs_embeds=embeds, position_ids=pos, use_cache=False))
    skip.update(p.untyped_storage().data_ptr() for p in lm.parameters())
    last = run().last_hidden_state
    predicted = len(base.layers) * tokens * h * nbytes + 2 * tokens * h * nbytes  # layer inputs + final norm
    out["activations, checkpointed (layer inputs + final norm)"] = (predicted, sum(seen.values()))

    # 3. gradients of the trained parameters after a backward through the fused head
    target = torch.where(torch.rand(rows, seq - 1, device=device) < 0.3, -100, ids[:, 1:])
    head = lm.get_output_embeddings()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    tok = linear_logprobs(last[:, :-1], head.weight, target, ignore_index=-100)
    tok.sum().backward()
    trained = [p for p in lm.parameters() if p.requires_grad]
    out["gradients (trained parameters, param dtype)"] = (sum(p.numel() for p in trained) * nbytes,
                                                          sum(p.grad.numel() * p.grad.element_size()
                                                              for p in trained if p.grad is not None))
    if cuda:
        full = cfg.get("peft") is None
        predicted = (tokens * h * (nbytes + 4) + CHUNK_BUFFER_BYTES
                     + (config.vocab_size * h * (4 + (nbytes if nbytes != 4 else 0)) if full else 0))
        out["loss path + head grad buffers (CUDA peak)"] = (predicted, torch.cuda.max_memory_allocated() - start)
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "layers": layers, "tokens": tokens,
            "hidden_size": h, "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
            "terms": {k: {"predicted_mib": a / 2**20, "measured_mib": b / 2**20,
                          "measured_over_predicted": (b / a) if a else float("nan")} for k, (a, b) in out.items()}}


def format_measure(m: dict) -> str:
    lines = [f"--measure on {m['device']} ({m['dtype']}): {m['layers']} layers, hidden {m['hidden_size']}, "
             f"intermediate {m['intermediate_size']}, vocab {m['vocab_size']}, {m['tokens']} tokens"]
    width = max(len(k) for k in m["terms"])
    lines.append(f"  {'term':<{width}}  {'predicted':>11}  {'measured':>11}  ratio")
    for k, v in m["terms"].items():
        lines.append(f"  {k:<{width}}  {v['predicted_mib']:8.2f} MiB  {v['measured_mib']:8.2f} MiB  "
                     f"{v['measured_over_predicted']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--measure", action="store_true",
                        help="check the activation / gradient (GPU: also loss-path) terms against a measurement")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.measure:
        m = measure(cfg)
        print(json.dumps(m, indent=2) if args.json else format_measure(m))
        return 0
    p = plan(cfg, args.gpus, args.gpu_mem)
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    return 0 if p["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
