"""Peak memory and time of ``linear_logprobs`` forward+backward: chunked torch path vs eager logits.

    python -m benchmarks.logprobs_memory                      # N=4096, H=1024, V=32000, float32
    python -m benchmarks.logprobs_memory --n 1024 --reps 10 --out /tmp/bench

Each implementation runs in its own fresh process (the CPU's peak resident set size cannot be
reset reliably): it allocates the inputs, runs forward+backward twice (the warm-up: thread pools,
autograd engine), drops the gradients, resets the kernel's peak-RSS mark, runs forward+backward
again and reads the peak (the difference is the row's "extra memory": every buffer the
implementation needs above its inputs, gradient outputs included), then times ``--reps`` more
repetitions (median). Its outputs (log-probs and both gradients) are saved and compared, in this
parent process, with a float64 eager reference on the same inputs.

Goal (issue 2): the torch path's extra memory is at most 1/8 of the eager path's, at no more than
1.5x its time. Both ratios are printed with PASS/MISS; the table goes to
``--out/<device>-<date>/logprobs_memory.md`` (plus a JSON with every number).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import harness
from safedpo_kernels import linear_logprobs
from safedpo_kernels.reference import reference_linear_logprobs

IMPLS = ("eager", "torch")
IMPL_LABELS = {
    "eager": "eager (reference_linear_logprobs: materialized logits)",
    "torch": "torch chunked (linear_logprobs impl='torch')",
}
MEMORY_GOAL = 1 / 8
TIME_GOAL = 1.5


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, seed: int, requires_grad: bool = True):
    """hidden (n, h), weight (v, h) with logits of std ~2, labels (n,) in [0, v), upstream grad g (n,)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype).requires_grad_(requires_grad)
    weight = torch.randn(v, h, generator=gen).mul_(2.0 / h**0.5).to(dtype).requires_grad_(requires_grad)
    labels = torch.randint(0, v, (n,), generator=gen)
    g = torch.randn(n, generator=gen)
    return hidden, weight, labels, g


def forward_backward(impl: str, hidden, weight, labels, g) -> torch.Tensor:
    """One forward+backward of ``sum(g * logp)``; returns the detached log-probs."""
    hidden.grad = None
    weight.grad = None
    if impl == "eager":
        logp = reference_linear_logprobs(hidden, weight, labels)
    elif impl == "torch":
        logp = linear_logprobs(hidden, weight, labels, impl="torch")
    else:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    (logp * g.to(logp.dtype)).sum().backward()
    return logp.detach()


def worker(spec: dict) -> dict:
    """Run one case in this (fresh) process; save outputs to spec['save'] when given."""
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    dtype = getattr(torch, spec["dtype"])
    hidden, weight, labels, g = make_inputs(spec["n"], spec["h"], spec["v"], dtype, spec["seed"])
    device = torch.device("cpu")
    for _ in range(2):  # warm-up: thread pools, autograd engine, allocator state settle by the 2nd run
        forward_backward(spec["impl"], hidden, weight, labels, g)
    hidden.grad = weight.grad = None
    with harness.PeakMemory(device) as pm:
        logp = forward_backward(spec["impl"], hidden, weight, labels, g)
    timing = harness.time_ms(lambda: forward_backward(spec["impl"], hidden, weight, labels, g), device,
                             reps=spec["reps"], warmup=0)
    if spec.get("save"):
        logp = forward_backward(spec["impl"], hidden, weight, labels, g)
        torch.save({"logp": logp, "grad_hidden": hidden.grad, "grad_weight": weight.grad}, spec["save"])
    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    return {"status": "ok", "extra_bytes": pm.extra_bytes, "grad_bytes": grad_bytes, **timing}


def reference_outputs(n: int, h: int, v: int, dtype: torch.dtype, seed: int) -> dict:
    """float64 eager log-probs and gradients on the same inputs as the workers."""
    hidden, weight, labels, g = make_inputs(n, h, v, dtype, seed, requires_grad=False)
    hidden = hidden.to(torch.float64).requires_grad_(True)
    weight = weight.to(torch.float64).requires_grad_(True)
    logp = forward_backward("eager", hidden, weight, labels, g)
    return {"logp": logp, "grad_hidden": hidden.grad, "grad_weight": weight.grad}


def run(n: int, h: int, v: int, dtype: str, reps: int, seed: int, check: bool = True, threads: int | None = None) -> dict:
    """Every implementation in a fresh process, then the float64 guard. -> {impl: row}."""
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in IMPLS:
            save = str(Path(tmp) / f"{impl}.pt") if check else None
            spec = {"impl": impl, "n": n, "h": h, "v": v, "dtype": dtype, "reps": reps, "seed": seed, "save": save,
                    "threads": threads}
            print(f"[logprobs_memory] {impl}: N={n} H={h} V={v} {dtype}, {reps} reps ...", file=sys.stderr, flush=True)
            rows[impl] = harness.run_worker("benchmarks.logprobs_memory", spec)
            print(f"[logprobs_memory] {impl}: {rows[impl]}", file=sys.stderr, flush=True)
        if check:
            ref = reference_outputs(n, h, v, getattr(torch, dtype), seed)
            for impl, row in rows.items():
                if row.get("status") == "ok":
                    out = torch.load(Path(tmp) / f"{impl}.pt", weights_only=True)
                    row["check"] = harness.check_outputs(out, ref, getattr(torch, dtype))
    return rows


def summarize(rows: dict, args: argparse.Namespace, env: dict) -> tuple[str, dict]:
    """Markdown report and the goal verdicts."""
    flops = 6 * args.n * args.h * args.v  # eager; the torch path recomputes the logits: 8NHV
    table_rows = []
    for impl, row in rows.items():
        if row.get("status") != "ok":
            table_rows.append([IMPL_LABELS[impl], row.get("status"), "-", "-", "-", "-", "-", row.get("error", "")[:80]])
            continue
        executed = 8 * args.n * args.h * args.v if impl == "torch" else flops
        chk = row.get("check")
        verdict = "-" if chk is None else ("ok" if chk["ok"] else "**MISMATCH**")
        err = "-" if chk is None else harness.fmt_err(chk["max_err"])
        table_rows.append([
            IMPL_LABELS[impl], harness.fmt(row["median_ms"], 0), harness.fmt(row.get("cpu_median_ms"), 0), harness.fmt(row["extra_bytes"] / harness.MiB, 0),
            harness.fmt((row["extra_bytes"] - row["grad_bytes"]) / harness.MiB, 0),
            harness.fmt(executed / (harness.rate_ms(row) * 1e-3) / 1e9, 1), err, verdict,
        ])
    headers = ["implementation", "fwd+bwd wall median (ms)", "CPU time median (ms)", "peak extra (MiB)", "extra minus grads (MiB)",
               "GFLOP/s (executed, per CPU second)", "max rel err vs fp64", "guard"]
    goals = {}
    e, t = rows.get("eager", {}), rows.get("torch", {})
    if e.get("status") == "ok" and t.get("status") == "ok":
        mem_ratio = t["extra_bytes"] / max(e["extra_bytes"], 1)
        time_ratio = t["median_ms"] / e["median_ms"]
        cpu_ratio = t.get("cpu_median_ms", float("nan")) / e.get("cpu_median_ms", float("nan"))
        mem_ratio_no_grads = (t["extra_bytes"] - t["grad_bytes"]) / max(e["extra_bytes"] - e["grad_bytes"], 1)
        goals = {"memory_ratio": mem_ratio, "memory_goal": MEMORY_GOAL, "memory_pass": mem_ratio <= MEMORY_GOAL,
                 "memory_ratio_without_grads": mem_ratio_no_grads,
                 "time_ratio": time_ratio, "cpu_time_ratio": cpu_ratio, "time_goal": TIME_GOAL,
                 "time_pass": time_ratio <= TIME_GOAL}
    lines = [
        f"# linear_logprobs forward+backward: torch chunked path vs eager (N={args.n}, H={args.h}, V={args.v}, {args.dtype})",
        "",
        f"- machine: {env['device_name']}; workers use {args.threads or torch.get_num_threads()} torch thread(s); "
        f"torch {env['torch']}; load average at start {env['loadavg']} (other jobs shared the cores)",
        f"- commit {env['commit']}, {env['date']}",
        f"- command: `{env['command']}`",
        f"- each implementation in a fresh process; time = median of {args.reps} reps after 2 warm-up runs; "
        "peak extra = peak RSS of one fwd+bwd minus the RSS before it (peak mark reset there, glibc mmap threshold 128 KiB) (gradient outputs "
        f"included: {rows.get('torch', rows.get('eager', {})).get('grad_bytes', 0) / harness.MiB:.0f} MiB)",
        "- guard: log-probs and both gradients vs float64 eager autograd on the same inputs "
        f"(relative Frobenius error, tolerance {harness.TOLERANCE[getattr(torch, args.dtype)]:.0e})",
        "- executed FLOPs: eager 6NHV, torch chunked 8NHV (logits recomputed in backward)",
        "",
        harness.markdown_table(headers, table_rows),
        "",
    ]
    if goals:
        lines += [
            f"Goal (issue 2): memory ratio torch/eager = {goals['memory_ratio']:.3f} "
            f"(goal <= {MEMORY_GOAL:.3f}: {'PASS' if goals['memory_pass'] else 'MISS'}); "
            f"time ratio = {goals['time_ratio']:.2f}x (goal <= {TIME_GOAL}x: {'PASS' if goals['time_pass'] else 'MISS'}); "
            f"CPU-time ratio = {goals['cpu_time_ratio']:.2f}x. Without the gradient outputs (the same "
            f"{t['grad_bytes'] / harness.MiB:.0f} MiB for both) the memory ratio is {goals['memory_ratio_without_grads']:.3f}.",
            "",
        ]
    return "\n".join(lines), goals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="tokens (default 4096)")
    parser.add_argument("--h", type=int, default=1024, help="hidden size (default 1024)")
    parser.add_argument("--v", type=int, default=32000, help="vocabulary (default 32000)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions after the warm-up (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in each worker (default: torch's default, all cores); on a shared "
                             "machine --threads 1 gives timings that other processes disturb far less")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 correctness guard")
    parser.add_argument("--out", default="benchmarks/results", help="results folder (default benchmarks/results)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        try:
            result = worker(json.loads(args.worker))
        except Exception as exc:  # reported to the parent as a result, OOM included
            result = {"status": "OOM" if harness.is_oom(exc) else "error", "error": f"{type(exc).__name__}: {exc}"}
        harness.emit_result(result)
        return 0
    for name in ("n", "h", "v", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected >= 1, got {getattr(args, name)}")
    device = torch.device("cpu")
    env = harness.environment(device)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: expected >= 1, got {args.threads}")
    rows = run(args.n, args.h, args.v, args.dtype, args.reps, args.seed, check=not args.no_check, threads=args.threads)
    report, goals = summarize(rows, args, env)
    out = harness.results_dir(args.out, device)
    stem = "logprobs_memory" + (f"_threads{args.threads}" if args.threads else "")
    (out / f"{stem}.md").write_text(report)
    harness.write_json(out / f"{stem}.json", {"env": env, "args": vars(args), "rows": rows, "goals": goals})
    print(report)
    print(f"written: {out / (stem + '.md')}, {out / (stem + '.json')}")
    bad = [impl for impl, r in rows.items() if r.get("status") != "ok" or not r.get("check", {"ok": True})["ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
