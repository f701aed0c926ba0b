"""One-command GPU check of the fused log-prob kernels: correctness at real sizes, then timings.

    python scripts/gpu_check.py --out benchmarks/results/gpu_check_$(date +%F).txt       # ~2-3 min on an H100
    python scripts/gpu_check.py --dry-run --out /tmp/gpu_check.txt                        # CPU interpreter, tiny

1. Correctness (bf16, fp16, fp32; N=4096, H=4096, V=128256 by default): log-probs and the
   gradients w.r.t. hidden, weight and bias of ``triton_linear_logprobs`` (default, deterministic,
   grad_filter) against a chunked float64 reference computed from the same (rounded) inputs,
   next to the same-dtype eager PyTorch error. PASS when the kernel's relative error is at most
   1.25 x eager's + eps/8 (the test-suite's rule); deterministic gradients must be bit-identical
   across two runs.
   A bf16 case with V*H > 2**31 (--int64) checks the 64-bit offsets.
2. Timing (bf16, N in --bench-n): forward+backward and forward-only, median of CUDA-event
   timings, extra peak memory (torch.cuda.max_memory_allocated above inputs and gradient outputs),
   TFLOP/s counted at 8NHV (fused: logits recomputed) or 6NHV (eager), and the share of this
   card's measured bf16 GEMM rate (an 8192^3 matmul timed in the same run).

Each section catches its own errors and the output file is written line by line, so a partial
run still leaves its numbers. Pure PyTorch + Triton: nothing to install on the GPU host.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Correctness + timing check of the Triton log-prob kernels on one GPU.")
    p.add_argument("--out", type=Path, required=True, help="file the report is written to (also printed)")
    p.add_argument("--check", default="4096,4096,128256", help="N,H,V of the correctness check")
    p.add_argument("--dtypes", default="bf16,fp16,fp32", help="dtypes of the correctness check")
    p.add_argument("--int64", default="256,16384,131200",
                   help="N,H,V of a bf16 check with V*H > 2**31 ('' to skip; skipped in --dry-run)")
    p.add_argument("--bench-n", default="4096,16384", help="token counts of the timing table ('' to skip)")
    p.add_argument("--bench-hv", default="4096,128256", help="H,V of the timing table")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per row (median reported)")
    p.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET=1 at tiny sizes (plumbing check)")
    args = p.parse_args(argv)
    args.check = _ints(args.check, 3, "--check")
    args.int64 = None if args.dry_run or not args.int64.strip() else _ints(args.int64, 3, "--int64")
    args.bench_hv = _ints(args.bench_hv, 2, "--bench-hv")
    args.bench_n = [int(x) for x in args.bench_n.split(",") if x.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in ("bf16", "fp16", "fp32")]
    if bad:
        p.error(f"--dtypes: expected a subset of bf16,fp16,fp32, got {bad}")
    if args.dry_run and args.check == [4096, 4096, 128256]:
        args.check = [48, 64, 300]
    if args.dry_run and args.bench_hv == [4096, 128256]:
        args.bench_hv = [64, 300]
        args.bench_n = [32] if args.bench_n == [4096, 16384] else args.bench_n
    return args


def _ints(text: str, n: int, name: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"{name}: expected {n} comma-separated integers, got {text!r}") from None
    if len(vals) != n or min(vals) < 1:
        raise SystemExit(f"{name}: expected {n} comma-separated integers >= 1, got {text!r}")
    return vals


class Report:
    """Prints and appends each line to the output file at once (partial runs keep their lines)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


# ------------------------------------------------------------------------------------------------
# Correctness
# ------------------------------------------------------------------------------------------------


def reference_float64(hidden, weight, bias, labels, g, chunk: int = 1024, eps: float = 0.0):
    """(logp, grad_hidden, grad_weight, grad_bias) in float64, `chunk` tokens of logits at a time,
    and the mean per-token softmax mass below ``eps`` (an upper bound of what gradient filtering
    can skip: it drops whole tiles whose probabilities are all below eps and hold no label)."""
    import torch

    w = weight.double()
    b = bias.double()
    logp = torch.empty(hidden.shape[0], dtype=torch.float64, device=hidden.device)
    gh = torch.empty(hidden.shape, dtype=torch.float64, device=hidden.device)
    gw = torch.zeros(w.shape, dtype=torch.float64, device=hidden.device)
    gb = torch.zeros(b.shape, dtype=torch.float64, device=hidden.device)
    tail = 0.0
    for s in range(0, hidden.shape[0], chunk):
        h = hidden[s : s + chunk].double()
        y = labels[s : s + chunk]
        gg = g[s : s + chunk].double()
        lsm = torch.log_softmax(h @ w.T + b, dim=-1)
        logp[s : s + chunk] = lsm.gather(1, y[:, None])[:, 0]
        p = lsm.exp_()
        tail += (p * (p < eps)).sum().item()
        grad = p.mul_(-gg[:, None])  # g * (onehot - softmax)
        grad[torch.arange(len(y), device=h.device), y] += gg
        gh[s : s + chunk] = grad @ w
        gw.addmm_(grad.T, h)
        gb += grad.sum(0)
        del lsm, grad, p
    return (logp, gh, gw, gb), tail / hidden.shape[0]


def eager_same_dtype(hidden, weight, bias, labels, g, chunk: int = 4096):
    """Eager PyTorch in the inputs' dtype (what users run today), chunked over tokens for memory."""
    import torch

    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    outs = []
    for s in range(0, h.shape[0], chunk):
        logits = h[s : s + chunk] @ w.T + b
        outs.append(torch.log_softmax(logits, -1).gather(1, labels[s : s + chunk, None])[:, 0])
        lp = outs[-1]
        lp.backward(g[s : s + chunk].to(lp.dtype))
        del logits
    return torch.cat(outs).detach().float(), h.grad, w.grad, b.grad


def run_triton(hidden, weight, bias, labels, g, **kw):
    import torch

    from safedpo_kernels.triton_logprobs import triton_linear_logprobs

    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    out = triton_linear_logprobs(h, w, labels, b, **kw)
    grads = torch.autograd.grad(out, (h, w, b), g)
    return (out.detach(), *grads)


def rel(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def make_inputs(n, h, v, device, dtype, seed=0):
    """LM-like inputs: each hidden row leans towards its label's weight row so that the target's
    probability is about 0.8 and the remaining mass is spread over the vocabulary (a flat tail:
    the hard case for gradient filtering, which skips tiles of small probabilities)."""
    import math

    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    weight = torch.randn(v, h, generator=gen) / h**0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    direction = weight[labels] / weight[labels].norm(dim=1, keepdim=True)
    noise = 0.5
    peak = math.log(v) + 1.5
    peak += (noise**2 + peak**2 / h) / 2  # the other logits' spread raises the log-partition
    hidden = noise * torch.randn(n, h, generator=gen) + peak * direction
    bias = 0.1 * torch.randn(v, generator=gen)
    g = torch.randn(n, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (hidden, weight, bias)) + (labels.to(device), g.to(device))


def check_correctness(args, device, report) -> bool:
    import torch

    n, h, v = args.check
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    report(f"## correctness: N={n} H={h} V={v}, relative L2 error vs float64 (same rounded inputs)")
    report(f"{'dtype':6} {'variant':14} {'logp':>9} {'grad_h':>9} {'grad_w':>9} {'grad_b':>9}  verdict")
    ok = True
    for name in args.dtypes:
        dtype = dtypes[name]
        try:
            hidden, weight, bias, labels, g = make_inputs(n, h, v, device, dtype)
            from safedpo_kernels.kernels import filter_eps

            ref, tail = reference_float64(hidden, weight, bias, labels, g, eps=filter_eps(dtype))
            eager = eager_same_dtype(hidden, weight, bias, labels, g)
            eager_err = [rel(x, r) for x, r in zip(eager, ref)]
            eps = torch.finfo(dtype).eps / 8 + 4 * torch.finfo(torch.float32).eps
            limit = [1.25 * e + eps for e in eager_err]
            report(f"{name:6} {'eager':14} " + " ".join(f"{e:9.2e}" for e in eager_err) + "  (baseline)")
            del eager
            for variant, kw in (("fused", {}), ("deterministic", {"deterministic": True}),
                                ("grad_filter", {"grad_filter": True})):  # fmt: skip
                out = run_triton(hidden, weight, bias, labels, g, **kw)
                errs = [rel(x, r) for x, r in zip(out, ref)]
                good = all(e <= lim for e, lim in zip(errs, limit))
                extra = ""
                if variant == "deterministic":
                    again = run_triton(hidden, weight, bias, labels, g, **kw)
                    same = all(torch.equal(a, b) for a, b in zip(out, again))
                    extra = ", bit-identical" if same else ", NOT bit-identical"
                    good = good and same
                if variant == "grad_filter":
                    extra = f", softmax mass below the filter threshold: {tail:.1e} per token"
                ok = ok and (good or variant == "grad_filter")
                verdict = ("PASS" if good else ("over eager bound (approximate mode)" if variant == "grad_filter" else "FAIL"))
                report(f"{name:6} {variant:14} " + " ".join(f"{e:9.2e}" for e in errs) + f"  {verdict}{extra}")
                del out
            del ref, hidden, weight, bias
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - report and go on
            ok = False
            report(f"{name:6} ERROR {type(exc).__name__}: {exc}".splitlines()[0])
            traceback.print_exc()
    return ok


def check_large_offsets(args, device, report) -> bool:
    """bf16 fused path where V*H > 2**31 (e.g. V=131200, H=16384): the int64 offsets at work."""
    import torch

    n, h, v = args.int64
    report(f"## int64 offsets: bf16 N={n} H={h} V={v} (V*H = {v * h:.2e}, 2**31 = {2**31:.2e})")
    try:
        hidden, weight, bias, labels, g = make_inputs(n, h, v, device, torch.bfloat16)
        ref, _ = reference_float64(hidden, weight, bias, labels, g, chunk=256)
        eager = eager_same_dtype(hidden, weight, bias, labels, g)
        limit = [1.25 * rel(x, r) + torch.finfo(torch.bfloat16).eps / 8 for x, r in zip(eager, ref)]
        del eager
        out = run_triton(hidden, weight, bias, labels, g)
        errs = [rel(x, r) for x, r in zip(out, ref)]
        good = all(e <= lim for e, lim in zip(errs, limit))
        report(f"{'bf16':6} {'fused':14} " + " ".join(f"{e:9.2e}" for e in errs) + f"  {'PASS' if good else 'FAIL'}")
        del out, ref, hidden, weight, bias
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return good
    except Exception as exc:  # noqa: BLE001
        report(f"int64 check ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        traceback.print_exc()
        return False


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def timed(fn, device, reps: int) -> float:
    """Median milliseconds of fn() over reps runs after one warm-up (CUDA events on a GPU)."""
    import torch

    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def extra_peak_mb(fn, device) -> float:
    """Peak memory of fn() above what was allocated before it, minus the gradients it returns."""
    import torch

    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    kept = sum(t.numel() * t.element_size() for t in out if t is not None) if isinstance(out, tuple) else 0
    peak = torch.cuda.max_memory_allocated() - base - kept
    del out
    return peak / 2**20


def gemm_rate(device, reps: int) -> float:
    """Measured bf16 dense TFLOP/s of an 8192^3 matmul (the roofline the goals refer to)."""
    import torch

    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = timed(lambda: a @ b, device, max(reps, 10))
    return 2 * 8192**3 / ms / 1e9


def bench(args, device, report) -> None:
    import torch

    from safedpo_kernels.kernels import forward_logprobs

    h, v = args.bench_hv
    rate = gemm_rate(device, args.reps)
    report("")
    report(f"## timing: bf16, H={h} V={v}; card bf16 GEMM rate (8192^3): {rate:.0f} TFLOP/s")
    report(f"(extra MB: peak above inputs and returned gradients; the fused rows include the float32 "
           f"grad_weight accumulator, V*H*4 bytes = {v * h * 4 / 2**20:.0f} MB)")  # fmt: skip
    report(f"{'N':>6} {'variant':22} {'ms':>9} {'extra MB':>9} {'TFLOP/s':>8} {'% GEMM':>7}")
    for n in args.bench_n:
        try:
            hidden, weight, bias, labels, g = make_inputs(n, h, v, device, torch.bfloat16)
            bias = None
            hl, wl = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

            def eager():
                lp = torch.log_softmax((hl @ wl.T).float(), -1).gather(1, labels[:, None])[:, 0]
                return torch.autograd.grad(lp, (hl, wl), g)

            def fused(**kw):
                from safedpo_kernels.triton_logprobs import triton_linear_logprobs

                def run():
                    lp = triton_linear_logprobs(hl, wl, labels, None, **kw)
                    return torch.autograd.grad(lp, (hl, wl), g)

                return run

            rows = [
                ("eager bf16 fwd+bwd", eager, 6),
                ("fused fwd+bwd", fused(), 8),
                ("fused deterministic", fused(deterministic=True), 10),
                ("fused grad_filter", fused(grad_filter=True), 8),
                ("fused forward only", lambda: (forward_logprobs(hidden, weight, labels)[0],), 2),
            ]
            for name, fn, flop_mult in rows:
                try:
                    ms = timed(fn, device, args.reps)
                    mb = extra_peak_mb(fn, device)
                    tflops = flop_mult * n * h * v / ms / 1e9
                    report(f"{n:6} {name:22} {ms:9.2f} {mb:9.0f} {tflops:8.1f} {100 * tflops / rate:6.0f}%")
                except Exception as exc:  # noqa: BLE001 - e.g. eager out of memory
                    report(f"{n:6} {name:22} ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            del hidden, weight, hl, wl
        except Exception as exc:  # noqa: BLE001
            report(f"{n:6} ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"  # fmt: skip
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import
    sys.path.insert(0, str(ROOT))
    import torch
    import triton

    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry-run for a CPU plumbing check)")
    else:
        device = torch.device("cuda")
    report = Report(args.out)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU interpreter ({platform.machine()})"
    report(f"# gpu_check: {name}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
           f"torch {torch.__version__}, triton {triton.__version__}, commit {_commit()}")  # fmt: skip
    t0 = time.time()
    ok = check_correctness(args, device, report)
    if args.int64:
        ok = check_large_offsets(args, device, report) and ok
    if args.bench_n:
        bench(args, device, report)
    report("")
    report(f"# correctness {'PASS' if ok else 'FAIL'}; total {time.time() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
