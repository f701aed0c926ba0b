"""Training-step throughput and peak memory: our fused SafeDPO loss vs the eager-logits loss, same model and batch.

    python -m benchmarks.end_to_end                         # CPU: tiny random Llama (H=256, 4 layers, V=32000)
    python -m benchmarks.end_to_end --model gpu-0.5b        # GPU: ~0.5B random Llama (H=1024, 24 layers, V=128256), bf16

A randomly initialised Llama (``transformers.LlamaForCausalLM``, no download) takes AdamW steps on
one fixed batch of B preference pairs: base model -> last hidden states -> loss -> backward -> step.

* ``fused``: ``FusedLinearSafeDPOLoss(impl="auto")`` on the hidden states and ``lm_head.weight``:
  the (tokens x vocab) logits never exist.
* ``eager``: ``safedpo_kernels.reference.reference_fused_safedpo``: logits materialized by the head,
  log-softmax, gather (what a plain PyTorch / TRL DPO step does).

Reference log-probs are precomputed once (as a DPO recipe does) and shared. Each variant runs in a
fresh process on the CPU (peak RSS) and in turn on a GPU (``max_memory_allocated``); peak memory is
above the model, its gradients' first allocation and the optimizer state (measured after warm-up
steps). Throughput = loss-carrying tokens / median step time over ``--steps`` steps. The guard:
both variants' first-step losses must agree (same initial weights and batch).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks import harness
from benchmarks.workload import BETA, DELTA, IGNORE_INDEX

MODELS = {
    # name: (hidden, layers, heads, kv heads, intermediate, vocab, dtype)
    "cpu-tiny": (256, 4, 4, 4, 688, 32000, "float32"),
    "cpu-micro": (32, 1, 2, 2, 64, 512, "float32"),  # the test suite's smoke run
    "gpu-0.5b": (1024, 24, 16, 8, 2816, 128256, "bfloat16"),
}
VARIANTS = ("fused", "eager")


def build_model(name: str, device: torch.device, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab, dtype = MODELS[name]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, dtype))
    return model


def make_batch(vocab: int, pairs: int, seq_len: int, device: torch.device, seed: int) -> dict:
    """2B rows (chosen first), HF-style labels (prompt = first quarter, ignored), flags cycling the
    four safety cases, and fixed reference log-probs."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    rows = 2 * pairs
    input_ids = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    labels = input_ids.clone()
    labels[:, : seq_len // 4] = IGNORE_INDEX
    idx = torch.arange(pairs)
    return {
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
        "chosen_unsafe": ((idx % 4 == 1) | (idx % 4 == 3)).to(device),
        "rejected_unsafe": ((idx % 4 == 2) | (idx % 4 == 3)).to(device),
        "ref_chosen_logps": (-torch.rand(pairs, generator=gen) * 10 - seq_len * 5).to(device),
        "ref_rejected_logps": (-torch.rand(pairs, generator=gen) * 10 - seq_len * 5).to(device),
    }


def loss_fn(variant: str, model, batch: dict) -> torch.Tensor:
    """One training loss on the batch: hidden states of the base model, shifted targets, SafeDPO."""
    from safedpo_kernels import FusedLinearSafeDPOLoss
    from safedpo_kernels.reference import reference_fused_safedpo

    hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state[:, :-1]
    target = batch["labels"][:, 1:]
    flags = {"chosen_unsafe": batch["chosen_unsafe"], "rejected_unsafe": batch["rejected_unsafe"]}
    refs = {"ref_chosen_logps": batch["ref_chosen_logps"], "ref_rejected_logps": batch["ref_rejected_logps"]}
    if variant == "fused":
        loss, _ = FusedLinearSafeDPOLoss(beta=BETA, delta=DELTA, ignore_index=IGNORE_INDEX, impl="auto")(
            model.lm_head.weight, hidden, target, **flags, **refs)
    elif variant == "eager":
        loss, _ = reference_fused_safedpo(model.lm_head.weight, hidden, target, **flags, **refs, beta=BETA,
                                          delta=DELTA, ignore_index=IGNORE_INDEX)
    else:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    return loss


def measure(spec: dict) -> dict:
    """Build model, optimizer and batch; warm-up steps; one measured step (peak memory); timed steps."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = build_model(spec["model"], device, spec["seed"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = make_batch(model.config.vocab_size, spec["pairs"], spec["seq_len"], device, spec["seed"])
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(spec["variant"], model, batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    try:
        for _ in range(2):  # warm-up; creates the optimizer state
            step()
        opt.zero_grad(set_to_none=True)
        harness.free_device_memory(device)
        with harness.PeakMemory(device) as pm:
            step()
        timing = harness.time_ms(step, device, reps=spec["steps"], warmup=0)
    except Exception as exc:
        return {"status": "OOM" if harness.is_oom(exc) else "error", "error": f"{type(exc).__name__}: {exc}"[:300]}
    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return {"status": "ok", "first_loss": losses[0], "extra_bytes": pm.extra_bytes, "loss_tokens": tokens,
            "positions": batch["input_ids"].numel(), "tokens_per_s": tokens / (timing["median_ms"] * 1e-3),
            "tokens_per_cpu_s": tokens / (harness.rate_ms(timing) * 1e-3),
            "params": sum(p.numel() for p in model.parameters()), **timing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="cpu-tiny (default without a GPU) or gpu-0.5b (default with one)")
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per batch (default 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 256 CPU, 1024 GPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="CPU torch threads per worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        try:
            result = measure(json.loads(args.worker))
        except Exception as exc:
            result = {"status": "OOM" if harness.is_oom(exc) else "error", "error": f"{type(exc).__name__}: {exc}"[:300]}
        harness.emit_result(result)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = args.model or ("gpu-0.5b" if device.type == "cuda" else "cpu-tiny")
    seq_len = args.seq_len or (1024 if device.type == "cuda" else 256)
    for name in ("pairs", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = harness.environment(device)
    rows = {}
    for variant in VARIANTS:
        spec = {"variant": variant, "model": model, "pairs": args.pairs, "seq_len": seq_len, "steps": args.steps,
                "seed": args.seed, "device": str(device), "threads": args.threads}
        print(f"[end_to_end] {variant}: {model}, {args.pairs} pairs x {seq_len} tokens ...", file=sys.stderr, flush=True)
        if device.type == "cpu":
            rows[variant] = harness.run_worker("benchmarks.end_to_end", spec)
        else:
            rows[variant] = measure(spec)
            harness.free_device_memory(device)
        print(f"[end_to_end] {variant}: {rows[variant]}", file=sys.stderr, flush=True)
    f, e = rows["fused"], rows["eager"]
    guard = "-"
    if f.get("status") == "ok" and e.get("status") == "ok":
        tol = 1e-4 if MODELS[model][6] == "float32" else 2e-2
        diff = abs(f["first_loss"] - e["first_loss"]) / max(1.0, abs(e["first_loss"]))
        guard = f"{'ok' if diff <= tol else '**MISMATCH**'} (first-step loss rel diff {diff:.1e}, tol {tol:.0e})"
    table = []
    for v, r in rows.items():
        if r.get("status") != "ok":
            table.append([v, f"**{r.get('status')}**", "-", "-", "-", "-", r.get("error", "")[:100]])
            continue
        table.append([v, harness.fmt(r["median_ms"], 1), harness.fmt(r.get("cpu_median_ms"), 1),
                      harness.fmt(r["tokens_per_s"], 0), harness.fmt(r["tokens_per_cpu_s"], 0),
                      harness.fmt(r["extra_bytes"] / harness.MiB, 1),
                      f"{r['first_loss']:.6f}"])
    hidden, layers, heads, kv, inter, vocab, dtype = MODELS[model]
    lines = [
        f"# End-to-end training steps: fused SafeDPO loss vs eager logits ({model})",
        "",
        f"- device: {env['device_name']}; torch {env['torch']}; commit {env['commit']}; {env['date']}; "
        f"load average at start {env['loadavg']}",
        f"- command: `{env['command']}`",
        f"- model: random LlamaForCausalLM H={hidden}, {layers} layers, {heads} heads ({kv} kv), MLP {inter}, "
        f"V={vocab}, {dtype}, {(f.get('params') or e.get('params') or 0) / 1e6:.1f} M params; AdamW lr 1e-5",
        f"- batch: {args.pairs} pairs = {2 * args.pairs} rows x {seq_len} tokens, first quarter prompt (ignored); "
        f"{f.get('loss_tokens') or e.get('loss_tokens')} loss tokens per step; precomputed reference log-probs",
        f"- time: median of {args.steps} steps after 2 warm-up steps; peak extra: "
        f"{'peak RSS (VmHWM) above the state after warm-up, fresh process per variant' if device.type == 'cpu' else 'max_memory_allocated above the state after warm-up'}",
        f"- guard: {guard}",
        "",
        harness.markdown_table(["loss", "step median ms", "CPU ms", "loss tokens/s (wall)",
                                "loss tokens/s (CPU time; GPU: = wall)", "peak extra MiB", "first-step loss"],
                               table),
        "",
    ]
    if f.get("status") == "ok" and e.get("status") == "ok":
        lines.append(f"fused/eager: throughput x{f['tokens_per_s'] / e['tokens_per_s']:.2f} (wall), "
                     f"x{f['tokens_per_cpu_s'] / e['tokens_per_cpu_s']:.2f} (CPU time), "
                     f"peak extra memory x{f['extra_bytes'] / max(e['extra_bytes'], 1):.2f}.")
        lines.append("")
    report = "\n".join(lines)
    out = harness.results_dir(args.out, device)
    (out / "end_to_end.md").write_text(report)
    harness.write_json(out / "end_to_end.json", {"env": env, "args": vars(args), "model": model, "rows": rows})
    print(report)
    print(f"written: {out / 'end_to_end.md'}")
    return 0 if guard.startswith(("ok", "-")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
