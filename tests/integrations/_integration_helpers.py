"""Helpers of the integration tests: offline fixture data, tiny random Llama models, eager
(logit-materializing) SafeDPO, and a CPU peak-memory meter.

Peak memory on CPU: ``peak_alloc_bytes`` runs a function under ``torch.profiler`` with
``profile_memory=True``, which records every allocation and free of PyTorch's CPU allocator
(c10::CPUAllocator, through which every tensor's storage goes) with a timestamp. The running sum of
those signed sizes is the number of tensor bytes alive, and its maximum is the peak above what was
alive when the function started. Unlike RSS it is exact, deterministic for a given program, does
not depend on glibc returning memory to the OS, and ignores Python/import noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from safedpo_kernels.reference import reference_safedpo_loss

BETA, DELTA = 0.1, 10.0


def peak_alloc_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of live CPU tensors allocated while ``fn()`` runs (relative to its start)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def make_llama(vocab: int, *, hidden: int = 32, layers: int = 2, tied: bool = False, seed: int = 0,
               dtype: torch.dtype = torch.float32, pad_token_id: int = 0):
    """A tiny random LlamaForCausalLM (eval mode: no dropout either way)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, pad_token_id=pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


def eager_sequence_logps(lm, input_ids, attention_mask, labels) -> torch.Tensor:
    """What users run today: full (rows, T, V) logits, log_softmax, gather, sum over labelled tokens."""
    logits = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), -1)
    target = labels[:, 1:]
    valid = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked)).sum(-1)


def eager_safedpo(lm, batch, ref_chosen, ref_rejected, *, beta=BETA, delta=DELTA):
    """Eager SafeDPO (materialized logits + the pair-by-pair reference loss) -> (loss, metrics)."""
    seq = eager_sequence_logps(lm, batch["input_ids"], batch["attention_mask"], batch["labels"])
    b = seq.shape[0] // 2
    return reference_safedpo_loss(seq[:b], seq[b:], ref_chosen.to(seq.dtype), ref_rejected.to(seq.dtype),
                                  batch["chosen_unsafe"], batch["rejected_unsafe"], beta=beta, delta=delta,
                                  return_metrics=True)


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a: dict, b: dict, *, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def f64(batch: dict) -> dict:
    return {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}


__all__ = ["peak_alloc_bytes", "make_llama", "eager_safedpo", "eager_sequence_logps", "grads_of",
           "assert_grads_close", "f64", "BETA", "DELTA"]
